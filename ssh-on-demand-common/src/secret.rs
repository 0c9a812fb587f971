use std::{fmt, path::Path};

use anyhow::{Context, Result, ensure};
use subtle::ConstantTimeEq;

/// A value that prints as `***` whichever way it is formatted; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads a secret from a file, without its trailing newline; an empty file is an error.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the secret in {}", path.display()))?;
        let value = text.trim_end_matches(['\n', '\r']);
        ensure!(!value.is_empty(), "{} is empty", path.display());
        Ok(Self(value.to_owned()))
    }

    /// The real value, for the one place that uses it (a header, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is, so that a client cannot guess a
    /// token byte by byte. (The length is not hidden.)
    pub fn matches(&self, offered: &str) -> bool {
        self.0.as_bytes().ct_eq(offered.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::Secret;

    #[test]
    fn never_prints_its_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "***");
        assert_eq!(format!("{secret:?}"), "***");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(***)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn matches_only_the_same_value() {
        let secret = Secret::new("hunter2");
        assert!(secret.matches("hunter2"));
        assert!(!secret.matches("hunter3"));
        assert!(!secret.matches("hunter22"));
        assert!(!secret.matches(""));
    }

    #[test]
    fn a_file_gives_its_value_without_the_line_end() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "hunter2\n").unwrap();
        assert_eq!(Secret::from_file(&file).unwrap().expose(), "hunter2");
        std::fs::write(&file, "\n").unwrap();
        let error = Secret::from_file(&file).unwrap_err().to_string();
        assert!(error.ends_with("is empty"), "{error}");
    }
}
