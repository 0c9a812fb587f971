//! The TOML file: read, and its errors told without a byte of its text, which may hold secrets.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use super::{DEFAULT_CONFIG_FILE, check_name};
use crate::cli::{Settings, settings_reference};

/// What the file holds: where it is, its settings, and the keys each `[profiles.NAME]` table sets (which
/// [`Settings`], where an unset key and a default look alike, cannot say).
pub(super) struct File {
    pub path: Option<PathBuf>,
    pub settings: Settings,
    pub profile_keys: BTreeMap<String, Vec<String>>,
}

/// The named file, which must exist, or the default one if it exists.
pub(super) fn read_file(named: Option<&Path>) -> Result<File> {
    let path = named.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && named.is_none() => {
            return Ok(File {
                path: None,
                settings: Settings::default(),
                profile_keys: BTreeMap::new(),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let settings = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    // It parsed as settings, so it parses as a table.
    let table: toml::Table = toml::from_str(&text).map_err(|e| toml_error(path, &text, &e))?;
    let profile_keys = table
        .get("profiles")
        .and_then(toml::Value::as_table)
        .into_iter()
        .flatten()
        .filter_map(|(name, profile)| {
            let keys = profile.as_table()?.keys().cloned().collect();
            Some((name.clone(), keys))
        })
        .collect();
    Ok(File {
        path: Some(path.to_owned()),
        settings,
        profile_keys,
    })
}

/// Where the file is wrong and what is wrong there, without the line itself, which toml's own message
/// quotes: it may hold a secret (an `api_headers` value), and this reaches `check-config`'s output and the
/// journal. Quoted text in the message (`invalid type: string "…"`) is masked for the same reason.
fn toml_error(path: &Path, text: &str, error: &toml::de::Error) -> anyhow::Error {
    let mut place = String::new();
    if let Some(span) = error.span() {
        let before = text.get(..span.start).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
        place = format!(", line {line}, column {column}");
        if let Some(key) = key_before(before) {
            place.push_str(&format!(" ({key})"));
        }
    }
    anyhow::anyhow!(
        "{}{place}: {}",
        path.display(),
        masked(error.message().trim())
    )
}

/// The setting whose value the text before an error ends in: the last `key =` line, under the last
/// `[profiles.NAME]` before it. A best guess for the reader, which prints only settings' names: a line of a
/// multi-line string that happens to hold `=` could be part of a secret.
fn key_before(before: &str) -> Option<String> {
    let settings = settings_reference();
    let is_setting = |key: &str| settings.iter().any(|s| s.key == key);
    let mut lines = before.lines().rev().map(str::trim);
    let key = lines.find_map(|line| {
        let (key, _) = line.split_once('=')?;
        is_setting(key.trim()).then(|| key.trim().to_owned())
    })?;
    let table = lines.find_map(|line| {
        let name = line.strip_prefix("[profiles.")?.strip_suffix(']')?.trim();
        check_name(name).is_ok().then(|| format!("profiles.{name}"))
    });
    Some(match table {
        Some(table) => format!("{table}.{key}"),
        None => key,
    })
}

/// `message` with the text between double quotes replaced by `***`.
fn masked(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    let mut escaped = false;
    for c in message.chars() {
        match (quoted, escaped, c) {
            (true, false, '\\') => escaped = true,
            (true, true, _) => escaped = false,
            (_, _, '"') => {
                out.push_str(if quoted { "***\"" } else { "\"" });
                quoted = !quoted;
            }
            (false, _, c) => out.push(c),
            (true, false, _) => {}
        }
    }
    if quoted {
        out.push_str("***");
    }
    out
}
