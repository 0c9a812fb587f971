//! Secrets: values such as the API token, and URLs that may carry credentials, which must never reach a log
//! line or `check-config` output.

use std::fmt;

use reqwest::Url;

pub use ssh_on_demand_common::secret::Secret;

/// A URL that prints with its user information and query values masked (`https://***@host/start?key=***`):
/// operators put API keys there when their API takes no header.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(Url);

impl SecretUrl {
    pub fn new(url: Url) -> Self {
        Self(url)
    }

    /// The real URL, for the one place that sends the request.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if !shown.username().is_empty() || shown.password().is_some() {
            // Cannot fail for http(s) URLs, which have a host.
            let _ = shown.set_password(None);
            let _ = shown.set_username("***");
        }
        if shown.query().is_some() {
            let masked: Vec<(String, &str)> = self
                .0
                .query_pairs()
                .map(|(name, _)| (name.into_owned(), "***"))
                .collect();
            shown
                .query_pairs_mut()
                .clear()
                .extend_pairs(masked.iter().map(|(n, v)| (n.as_str(), *v)));
        }
        // query_pairs_mut percent-encodes the mask; show it as typed.
        f.write_str(&shown.as_str().replace("%2A%2A%2A", "***"))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_print_without_credentials() {
        let url = |s: &str| SecretUrl::new(Url::parse(s).unwrap());
        assert_eq!(
            url("https://bob:hunter2@api.example/start?key=hunter2&x=1").to_string(),
            "https://***@api.example/start?key=***&x=***"
        );
        assert_eq!(
            format!("{:?}", url("http://127.0.0.1:8080/start")),
            "http://127.0.0.1:8080/start"
        );
        let shown = url("http://bob@h/").to_string();
        assert!(!shown.contains("bob"), "{shown}");
    }
}
