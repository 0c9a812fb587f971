//! One profile's settings, resolved and checked: its APIs (URL, token, headers, CA), its stop, its deadlines,
//! where its VMs may be and who may wake them, and when it is kept warm.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use std::net::IpAddr;

use anyhow::{Context, Result, bail, ensure};
use ipnet::IpNet;
use reqwest::{
    Url,
    header::{AUTHORIZATION, HeaderName, HeaderValue},
};

use super::{
    ApiConfig, HEADERS_CREDENTIAL, Headers, Profile, StopConfig, TOKEN_CREDENTIAL, defaults,
    positive,
};
use crate::{
    cli::{Settings, VmScope},
    guard,
    secret::{Secret, SecretUrl},
    vm::warm::Windows,
};

impl Profile {
    pub(super) fn resolve(
        settings: Settings,
        ports: Vec<u16>,
        credentials_dir: Option<&Path>,
    ) -> Result<Profile> {
        let url = parse_url(
            "api_url",
            settings.api_url.as_deref().context("api_url is not set")?,
        )?;
        let stop_url = settings
            .stop_url
            .as_deref()
            .map(|u| parse_url("stop_url", u))
            .transpose()?;
        let (token, token_source) = read_token(
            settings.api_token_file.as_deref(),
            settings
                .api_token_credential
                .as_deref()
                .unwrap_or(TOKEN_CREDENTIAL),
            credentials_dir,
        )?;
        let headers = settings
            .api_headers
            .iter()
            .enumerate()
            .map(|(i, line)| {
                parse_header(line).with_context(|| format!("api_headers entry {}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?;
        let headers_file = read_headers(
            settings.api_headers_file.as_deref(),
            settings
                .api_headers_credential
                .as_deref()
                .unwrap_or(HEADERS_CREDENTIAL),
            credentials_dir,
        )?;
        let from_file = headers_file.iter().flat_map(|(_, headers)| headers);
        ensure!(
            token.is_none()
                || !headers
                    .iter()
                    .chain(from_file)
                    .any(|(name, _)| name == AUTHORIZATION),
            "the extra headers set Authorization and an API token is configured too: keep one"
        );
        if let Some(ca) = &settings.api_ca_file {
            let https =
                url.scheme() == "https" || stop_url.as_ref().is_some_and(|u| u.scheme() == "https");
            ensure!(
                https,
                "api_ca_file is set but neither api_url nor stop_url is https://"
            );
            fs::metadata(ca).with_context(|| format!("api_ca_file {}", ca.display()))?;
        }
        let vm_port = settings.vm_port.unwrap_or(defaults::VM_PORT);
        ensure!(vm_port != 0, "vm_port must be 1 to 65535");
        let stop = match stop_url {
            Some(url) => Some(StopConfig {
                url,
                idle_timeout: positive(
                    "idle_timeout",
                    settings.idle_timeout,
                    defaults::IDLE_TIMEOUT,
                )?,
                timeout: positive(
                    "stop_timeout",
                    settings.stop_timeout,
                    defaults::STOP_TIMEOUT,
                )?,
            }),
            None => {
                ensure!(
                    settings.idle_timeout.is_none() && settings.stop_timeout.is_none(),
                    "idle_timeout and stop_timeout need a stop_url"
                );
                None
            }
        };
        let keep_warm = Windows::parse(&settings.keep_warm)?;
        let vm_scope = settings.vm_scope.unwrap_or_default();
        let pre_wake = settings.pre_wake.unwrap_or(false);
        ensure!(
            !pre_wake || (!keep_warm.is_empty() && vm_scope == VmScope::Profile),
            "pre_wake needs keep_warm windows, and vm_scope = \"profile\": a VM per client address cannot be \
             started before its client comes"
        );
        Ok(Profile {
            name: settings.profile,
            min_run_time: settings
                .min_run_time
                .map(|t| positive("min_run_time", Some(t), t))
                .transpose()?,
            keep_warm: Arc::new(keep_warm),
            pre_wake,
            ports,
            api: ApiConfig {
                url,
                token,
                token_source,
                ca_file: settings.api_ca_file,
                headers,
                headers_file,
                timeout: positive("api_timeout", settings.api_timeout, defaults::API_TIMEOUT)?,
            },
            stop,
            vm_scope,
            vm_port,
            vm_networks: networks("vm_networks", &settings.vm_networks)?,
            client_networks: networks("client_networks", &settings.client_networks)?,
            start_limit: match settings.source_start_limit.as_deref() {
                Some("none") => None,
                Some(limit) => Some(limit.parse().context("source_start_limit")?),
                None => Some(defaults::SOURCE_START_LIMIT),
            },
            penalty_strikes: settings.penalty_strikes.unwrap_or(guard::PENALTY_STRIKES),
            penalty_max: positive("penalty_max", settings.penalty_max, guard::PENALTY_MAX)?,
            silent_clients: settings.silent_clients.unwrap_or_default(),
            boot_timeout: positive(
                "boot_timeout",
                settings.boot_timeout,
                defaults::BOOT_TIMEOUT,
            )?,
            vm_connect_timeout: positive(
                "vm_connect_timeout",
                settings.vm_connect_timeout,
                defaults::VM_CONNECT_TIMEOUT,
            )?,
            vm_banner_timeout: positive(
                "vm_banner_timeout",
                settings.vm_banner_timeout,
                defaults::VM_BANNER_TIMEOUT,
            )?,
            client_banner_timeout: positive(
                "client_banner_timeout",
                settings.client_banner_timeout,
                defaults::CLIENT_BANNER_TIMEOUT,
            )?,
        })
    }
}

/// CIDRs (or single addresses) of the setting `key`.
fn networks(key: &str, texts: &[String]) -> Result<Vec<IpNet>> {
    texts
        .iter()
        .map(|net| {
            net.parse()
                .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
                .with_context(|| format!("{key}: {net:?} is not a network such as 10.0.0.0/8"))
        })
        .collect()
}

fn parse_url(key: &str, text: &str) -> Result<SecretUrl> {
    // The error would repeat the URL, and with it any credentials in it.
    let url = Url::parse(text).map_err(|e| anyhow::anyhow!("{key} is not a URL ({e})"))?;
    ensure!(
        matches!(url.scheme(), "http" | "https"),
        "{key} must start with http:// or https://, not {}://",
        url.scheme()
    );
    Ok(SecretUrl::new(url))
}

/// The token from `api_token_file` if set, else from the systemd credential `credential` if present.
fn read_token(
    file: Option<&Path>,
    credential: &str,
    credentials_dir: Option<&Path>,
) -> Result<(Option<Secret>, Option<PathBuf>)> {
    ensure!(
        !credential.is_empty() && !credential.contains('/'),
        "api_token_credential {credential:?} is not a credential name"
    );
    let path = match (file, credentials_dir) {
        (Some(file), _) => file.to_owned(),
        (None, Some(dir)) if dir.join(credential).exists() => dir.join(credential),
        _ => return Ok((None, None)),
    };
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    let token = text.trim();
    ensure!(
        !token.is_empty(),
        "the API token file {} is empty",
        path.display()
    );
    ensure!(
        HeaderValue::from_str(token).is_ok() && !token.contains(char::is_whitespace),
        "the API token in {} has characters an HTTP header cannot carry",
        path.display()
    );
    Ok((Some(Secret::new(token)), Some(path)))
}

/// Extra headers from `api_headers_file` if set, else from the systemd credential `credential` if present:
/// one `Name: value` per line; blank lines and `#` comments are skipped.
fn read_headers(
    file: Option<&Path>,
    credential: &str,
    credentials_dir: Option<&Path>,
) -> Result<Option<(PathBuf, Headers)>> {
    ensure!(
        !credential.is_empty() && !credential.contains('/'),
        "api_headers_credential {credential:?} is not a credential name"
    );
    let path = match (file, credentials_dir) {
        (Some(file), _) => file.to_owned(),
        (None, Some(dir)) if dir.join(credential).exists() => dir.join(credential),
        _ => return Ok(None),
    };
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading the API headers from {}", path.display()))?;
    let headers = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.trim_start().starts_with('#'))
        .map(|(i, line)| {
            parse_header(line).with_context(|| format!("{}, line {}", path.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    Ok(Some((path, headers)))
}

/// A `Name: value` line. The errors never show the line: a value, or a name that swallowed one, is a secret.
fn parse_header(line: &str) -> Result<(HeaderName, Secret)> {
    let Some((name, value)) = line.split_once(':') else {
        bail!("not of the form \"Name: value\"");
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| anyhow::anyhow!("the text before ':' is not a header name"))?;
    let value = value.trim();
    ensure!(
        HeaderValue::from_str(value).is_ok(),
        "header {name} has a value an HTTP header cannot carry"
    );
    Ok((name, Secret::new(value)))
}
