//! Reading the APIs' answers: the VM's address from a start API's 2xx answer, or one line saying what is wrong
//! with it; and what a refusing API said. Pure functions, fuzzed (fuzz/fuzz_targets/start_answer.rs).

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Deref,
};

/// Longest text from an API that is passed on to the user.
pub(super) const MAX_DETAIL: usize = 200;

/// Why a start API's 2xx answer gives no address: one line, for the user and the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable(pub(super) String);

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unusable {}

impl Deref for Unusable {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// What a refusing API said, for the user: a JSON `error`/`message`/`detail` field, or the first line of text.
/// HTML error pages carry nothing worth a line.
pub(super) fn error_detail(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.is_empty() || text.starts_with('<') {
        return None;
    }
    if let Ok(json) = serde_json::from_str::<serde_json::Value>(text) {
        return ["error", "message", "detail", "reason"]
            .iter()
            .find_map(|key| json.get(key)?.as_str())
            .map(short);
    }
    Some(short(text))
}

/// The first line of `text`, control characters as spaces, cut to [`MAX_DETAIL`] characters: the API's words
/// as one line a user and the journal can take.
fn short(text: &str) -> String {
    let line: String = text
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    cut(line)
}

/// `text` quoted with its control characters escaped, as the answer held it, cut to [`MAX_DETAIL`]
/// characters.
fn quoted(text: &str) -> String {
    cut(format!("{:?}", text.lines().next().unwrap_or("")))
}

fn cut(line: String) -> String {
    if line.chars().count() <= MAX_DETAIL {
        return line;
    }
    let cut: String = line.chars().take(MAX_DETAIL).collect();
    format!("{cut}…")
}

/// The VM's address from a 2xx answer, or what is wrong with the answer.
pub fn parse_answer(
    content_type: &str,
    body: &[u8],
    default_port: u16,
) -> Result<SocketAddr, Unusable> {
    let text = std::str::from_utf8(body)
        .map_err(|_| Unusable("it is not text".to_owned()))?
        .trim();
    if text.is_empty() {
        return Err(Unusable("it is empty".to_owned()));
    }
    if content_type.starts_with("application/json") || text.starts_with('{') {
        return json_answer(text, default_port);
    }
    if text.starts_with('<') {
        return Err(Unusable(
            "it is HTML, not an address (is api_url right?)".to_owned(),
        ));
    }
    if text.contains('\n') {
        return Err(Unusable(format!(
            "expected one address, got several lines: {}…",
            short(text)
        )));
    }
    match text.parse::<SocketAddr>() {
        Ok(addr) => usable(addr),
        Err(_) => usable(SocketAddr::new(parse_ip(text)?, default_port)),
    }
}

/// How the platform gave the VM, when the answer says so (the companion API does: `"how": "resumed", "ms":
/// 397`): for the journal and `status`, never a reason to refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct How {
    /// `booted`, `resumed`, `running`…: one short word.
    pub how: String,
    /// The platform's own time for it.
    pub ms: Option<u64>,
}

impl std::fmt::Display for How {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ms {
            Some(ms) => write!(f, "{} in {ms} ms", self.how),
            None => f.write_str(&self.how),
        }
    }
}

/// The `how` and `ms` fields of a JSON answer, if it has a plain word for `how`.
pub fn how(body: &[u8]) -> Option<How> {
    let answer: serde_json::Value = serde_json::from_slice(body).ok()?;
    let how = answer.get("how")?.as_str()?;
    let plain = !how.is_empty()
        && how.len() <= 16
        && how
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    plain.then(|| How {
        how: how.to_owned(),
        ms: answer.get("ms").and_then(serde_json::Value::as_u64),
    })
}

/// `{"vm_ip": "192.168.0.57", "port": 2222}`, other fields ignored. A field of the wrong type is named, with
/// what it held: the API's author reads this.
fn json_answer(text: &str, default_port: u16) -> Result<SocketAddr, Unusable> {
    use serde_json::Value;
    let answer: Value =
        serde_json::from_str(text).map_err(|e| Unusable(format!("invalid JSON ({e})")))?;
    let Value::Object(answer) = answer else {
        return Err(Unusable(format!(
            "the JSON is {}, not an object with vm_ip",
            json_kind(&answer)
        )));
    };
    let ip = match answer.get("vm_ip") {
        None | Some(Value::Null) => return Err(Unusable("the JSON has no vm_ip".to_owned())),
        Some(Value::String(ip)) if ip.trim().is_empty() => {
            return Err(Unusable("the JSON has no vm_ip".to_owned()));
        }
        Some(Value::String(ip)) => parse_ip(ip.trim())?,
        Some(other) => {
            return Err(Unusable(format!(
                "vm_ip is {} {}, not a string such as \"192.168.0.57\"",
                json_kind(other),
                short(&other.to_string())
            )));
        }
    };
    let port = match answer.get("port") {
        None | Some(Value::Null) => default_port,
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| (1..=65535).contains(&n)) => {
            n.as_u64().map_or(default_port, |n| n as u16)
        }
        Some(other) => {
            return Err(Unusable(format!(
                "port is {}, not a number from 1 to 65535",
                short(&other.to_string())
            )));
        }
    };
    usable(SocketAddr::new(ip, port))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_ip(text: &str) -> Result<IpAddr, Unusable> {
    text.parse().map_err(|_| {
        let hostname = text.len() <= 253
            && text.contains(|c: char| c.is_ascii_alphabetic())
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        Unusable(if hostname {
            format!("{text:?} is a hostname; the start API must answer with an IP address")
        } else {
            format!("{} is not an IP address", quoted(text))
        })
    })
}

/// The answer's form only. Whether a VM may have that address (not 0.0.0.0, not loopback, …) is for
/// [`crate::vm::targets`] to decide, the one place that does.
fn usable(addr: SocketAddr) -> Result<SocketAddr, Unusable> {
    if addr.port() == 0 {
        return Err(Unusable("port 0 is not a VM's port".to_owned()));
    }
    // `[fe80::1%2]:22` parses, but only in this one form, and an interface index is this host's business, not
    // the API's: refused in every form alike.
    if let SocketAddr::V6(v6) = addr
        && v6.scope_id() != 0
    {
        return Err(Unusable(format!(
            "{} names an interface (%{}); the start API must answer with an address that needs none",
            v6.ip(),
            v6.scope_id()
        )));
    }
    Ok(addr)
}
