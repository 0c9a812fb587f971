//! AWS credentials for the EC2 backend, from a systemd credential or the usual AWS files, in the shared
//! credentials file format (`[profile]`, `aws_access_key_id = …`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ssh_on_demand_common::secret::Secret;

use crate::config;

/// The systemd credential holding an AWS credentials file.
pub const CREDENTIAL: &str = "aws-credentials";

#[derive(Debug, Clone)]
pub struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

/// The file to read: the configured one, else the `aws-credentials` systemd credential, else
/// `$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`.
pub fn locate(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    if let Some(path) = config::credential(CREDENTIAL) {
        return Ok(path);
    }
    if let Some(path) = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        return Ok(path.into());
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(Path::new(&home).join(".aws/credentials")),
        None => bail!("no credentials_file, no {CREDENTIAL:?} systemd credential and no $HOME"),
    }
}

pub fn load(path: &Path, profile: &str) -> Result<AwsCredentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading AWS credentials from {}", path.display()))?;
    parse(&text, profile).with_context(|| format!("in {}", path.display()))
}

fn parse(text: &str, profile: &str) -> Result<AwsCredentials> {
    let mut section = None;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().trim_start_matches("profile ").to_owned());
            continue;
        }
        if section.as_deref() != Some(profile) {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_owned();
        match key.trim() {
            "aws_access_key_id" => key_id = Some(value),
            "aws_secret_access_key" => secret = Some(Secret::new(value)),
            "aws_session_token" => token = Some(Secret::new(value)),
            _ => {}
        }
    }
    match (key_id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(AwsCredentials {
            access_key_id,
            secret_access_key,
            session_token: token,
        }),
        _ => bail!("profile [{profile}] lacks aws_access_key_id or aws_secret_access_key"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_named_profile() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key = B\n\n\
                    [profile lab]\naws_access_key_id=C\naws_secret_access_key=D\naws_session_token=E\n";
        let lab = parse(text, "lab").unwrap();
        assert_eq!(lab.access_key_id, "C");
        assert_eq!(lab.secret_access_key.expose(), "D");
        assert_eq!(lab.session_token.unwrap().expose(), "E");
        assert_eq!(parse(text, "default").unwrap().access_key_id, "A");
        assert!(parse(text, "nope").is_err());
        assert_eq!(
            format!("{:?}", parse(text, "default").unwrap())
                .matches("***")
                .count(),
            1
        );
    }
}
