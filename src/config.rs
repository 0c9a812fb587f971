//! Configuration: the command line, the environment and the TOML file, merged into the settings a connection uses.
//!
//! Precedence, highest first: command-line flags, `SSH_ON_DEMAND_*` environment variables, the TOML file,
//! built-in defaults. The API token is never taken from the command line or the environment, where other
//! users can read it (`ps`, `/proc/*/environ`): only from a file or a systemd credential.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Parser, Subcommand};
use reqwest::{
    Url,
    header::{AUTHORIZATION, HeaderName, HeaderValue},
};
use serde::Deserialize;
use tracing::level_filters::LevelFilter;

use crate::{logging::LogTarget, secret::Secret};

/// Read when no `--config` is given; its absence is not an error.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/ssh-on-demand/config.toml";
/// Name of the API token in `$CREDENTIALS_DIRECTORY` (`LoadCredential=api-token:…` in the unit).
pub const TOKEN_CREDENTIAL: &str = "api-token";

/// Built-in defaults, one per setting that has one.
pub mod defaults {
    use std::time::Duration;

    /// One start API request, connect to last body byte.
    pub const API_TIMEOUT: Duration = Duration::from_secs(10);
    /// The start API and the VM's sshd together, from the client's identification on.
    pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
    /// One TCP connect attempt to the VM.
    pub const VM_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The VM's identification line after one TCP connect succeeded.
    pub const VM_BANNER_TIMEOUT: Duration = Duration::from_secs(5);
    /// The client's identification line; nothing is started before it arrives.
    pub const CLIENT_BANNER_TIMEOUT: Duration = Duration::from_secs(10);
    /// Where the VM's sshd listens when the start API names no port.
    pub const VM_PORT: u16 = 22;
}

#[derive(Debug, Parser)]
#[command(
    name = "ssh-on-demand",
    version,
    about = "Boots a VM when someone connects with plain ssh, then relays the connection",
    long_about = "Boots a VM when someone connects with plain ssh, then relays the connection.\n\n\
        Without a subcommand it serves one client connection handed over by systemd: a socket unit \
        with Accept=yes starts one instance per connection, with the client's TCP socket on standard \
        input (StandardInput=socket) or as fd 3 (LISTEN_FDS). It asks the start API to start the VM, \
        waits until the VM's sshd sends its SSH identification line, and relays bytes both ways. If the \
        VM cannot be started, the ssh client is told why.\n\n\
        Settings come from flags, then SSH_ON_DEMAND_* environment variables, then the TOML file, \
        then built-in defaults.",
    after_help = "See README.md for the start API contract and the systemd units."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TOML configuration file (keys as the long flags, with _ for -) [default: /etc/ssh-on-demand/config.toml, if it exists]
    #[arg(
        long,
        short = 'c',
        env = "SSH_ON_DEMAND_CONFIG",
        value_name = "FILE",
        global = true
    )]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub settings: Settings,

    /// Where log records go; auto: the journal under systemd, else stderr, and never the client's socket
    #[arg(long, env = "SSH_ON_DEMAND_LOG_TARGET", value_enum, default_value_t = LogTarget::Auto, global = true)]
    pub log_target: LogTarget,

    /// Most detailed level logged: error, warn, info, debug or trace
    #[arg(
        long,
        env = "SSH_ON_DEMAND_LOG_LEVEL",
        default_value = "info",
        value_name = "LEVEL",
        global = true
    )]
    pub log_level: LevelFilter,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the configuration and print the effective settings, secrets masked; exit 1 on any error
    CheckConfig,
}

/// The settings that flags, environment and file can all give. Every field is optional here; defaults are
/// applied by [`Config::resolve`]. The same struct is the TOML schema, so the file's keys are the flags' names.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// URL of the start API, which gets one POST per connection (required)
    #[arg(long, env = "SSH_ON_DEMAND_API_URL", value_name = "URL", global = true)]
    pub api_url: Option<String>,

    /// File holding the start API's bearer token [default: the systemd credential "api-token", if any]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_TOKEN_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_token_file: Option<PathBuf>,

    /// PEM file of extra CA certificates trusted for an https start API, besides the system's
    #[arg(
        long,
        env = "SSH_ON_DEMAND_API_CA_FILE",
        value_name = "FILE",
        global = true
    )]
    pub api_ca_file: Option<PathBuf>,

    /// Extra header for the start API, as "Name: value"; repeat for more (TOML: api_headers = [...])
    #[arg(long = "api-header", value_name = "NAME: VALUE", global = true)]
    #[serde(default)]
    pub api_headers: Vec<String>,

    /// Time one start API request may take [default: 10s]
    #[arg(long, env = "SSH_ON_DEMAND_API_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub api_timeout: Option<Duration>,

    /// VM profile name, passed on to the start API
    #[arg(
        long,
        env = "SSH_ON_DEMAND_PROFILE",
        value_name = "NAME",
        global = true
    )]
    pub profile: Option<String>,

    /// Port of the VM's sshd when the start API names none [default: 22]
    #[arg(
        long,
        env = "SSH_ON_DEMAND_VM_PORT",
        value_name = "PORT",
        global = true
    )]
    pub vm_port: Option<u16>,

    /// Deadline for the start API and the VM's sshd together, per connection [default: 120s]
    #[arg(long, env = "SSH_ON_DEMAND_BOOT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub boot_timeout: Option<Duration>,

    /// Time one TCP connect attempt to the VM may take [default: 1s]
    #[arg(long, env = "SSH_ON_DEMAND_VM_CONNECT_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub vm_connect_timeout: Option<Duration>,

    /// Time the VM may take to send its SSH identification once connected, per attempt [default: 5s]
    #[arg(long, env = "SSH_ON_DEMAND_VM_BANNER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub vm_banner_timeout: Option<Duration>,

    /// Time the client may take to send its SSH identification; nothing is started before it [default: 10s]
    #[arg(long, env = "SSH_ON_DEMAND_CLIENT_BANNER_TIMEOUT", value_parser = humantime::parse_duration, value_name = "DURATION", global = true)]
    #[serde(default, with = "humantime_serde")]
    pub client_banner_timeout: Option<Duration>,
}

impl Settings {
    /// Each setting from `self` where given, else from `lower`.
    fn or(self, lower: Settings) -> Settings {
        Settings {
            api_url: self.api_url.or(lower.api_url),
            api_token_file: self.api_token_file.or(lower.api_token_file),
            api_ca_file: self.api_ca_file.or(lower.api_ca_file),
            api_headers: if self.api_headers.is_empty() {
                lower.api_headers
            } else {
                self.api_headers
            },
            api_timeout: self.api_timeout.or(lower.api_timeout),
            profile: self.profile.or(lower.profile),
            vm_port: self.vm_port.or(lower.vm_port),
            boot_timeout: self.boot_timeout.or(lower.boot_timeout),
            vm_connect_timeout: self.vm_connect_timeout.or(lower.vm_connect_timeout),
            vm_banner_timeout: self.vm_banner_timeout.or(lower.vm_banner_timeout),
            client_banner_timeout: self.client_banner_timeout.or(lower.client_banner_timeout),
        }
    }
}

/// The effective configuration of one process.
#[derive(Debug)]
pub struct Config {
    /// The TOML file that was read, if any.
    pub file: Option<PathBuf>,
    pub api: ApiConfig,
    pub profile: Option<String>,
    pub vm_port: u16,
    pub boot_timeout: Duration,
    pub vm_connect_timeout: Duration,
    pub vm_banner_timeout: Duration,
    pub client_banner_timeout: Duration,
}

#[derive(Debug)]
pub struct ApiConfig {
    pub url: Url,
    pub token: Option<Secret>,
    /// Where the token was read from, for `check-config`.
    pub token_source: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Header values may be credentials too, so they are kept as secrets.
    pub headers: Vec<(HeaderName, Secret)>,
    pub timeout: Duration,
}

impl Config {
    /// The configuration for this process: flags and environment from `cli`, the TOML file it names (or the
    /// default one), and the token credential from `$CREDENTIALS_DIRECTORY`.
    pub fn load(cli: &Cli) -> Result<Config> {
        let credentials = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
        Self::resolve(
            cli.config.as_deref(),
            cli.settings.clone(),
            credentials.as_deref(),
        )
    }

    /// Merges `given` (flags and environment) over the file at `file` (or [`DEFAULT_CONFIG_FILE`] if it
    /// exists), applies defaults and checks everything an operator can get wrong.
    pub fn resolve(
        file: Option<&Path>,
        given: Settings,
        credentials_dir: Option<&Path>,
    ) -> Result<Config> {
        let (file, from_file) = read_file(file)?;
        let settings = given.or(from_file);

        let url = settings.api_url.as_deref().with_context(|| {
            format!(
                "api_url is not set: give --api-url, SSH_ON_DEMAND_API_URL or api_url in {}",
                file.as_deref()
                    .unwrap_or(Path::new(DEFAULT_CONFIG_FILE))
                    .display()
            )
        })?;
        let url = Url::parse(url).with_context(|| format!("api_url {url:?} is not a URL"))?;
        ensure!(
            matches!(url.scheme(), "http" | "https"),
            "api_url must start with http:// or https://, not {}://",
            url.scheme()
        );

        let (token, token_source) =
            read_token(settings.api_token_file.as_deref(), credentials_dir)?;
        let headers = settings
            .api_headers
            .iter()
            .map(|line| parse_header(line))
            .collect::<Result<Vec<_>>>()?;
        ensure!(
            token.is_none() || !headers.iter().any(|(name, _)| name == AUTHORIZATION),
            "api_headers sets Authorization and an API token is configured too: keep one"
        );
        if let Some(ca) = &settings.api_ca_file {
            ensure!(
                url.scheme() == "https",
                "api_ca_file is set but api_url is not https://"
            );
            fs::metadata(ca).with_context(|| format!("api_ca_file {}", ca.display()))?;
        }
        if let Some(profile) = &settings.profile {
            ensure!(!profile.trim().is_empty(), "profile is empty");
        }
        let vm_port = settings.vm_port.unwrap_or(defaults::VM_PORT);
        ensure!(vm_port != 0, "vm_port must be 1 to 65535");

        let config = Config {
            file,
            api: ApiConfig {
                url,
                token,
                token_source,
                ca_file: settings.api_ca_file,
                headers,
                timeout: positive("api_timeout", settings.api_timeout, defaults::API_TIMEOUT)?,
            },
            profile: settings.profile,
            vm_port,
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
        };
        Ok(config)
    }
}

/// Prints as a TOML file an operator could use, with secrets masked.
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.file {
            Some(path) => path.display().to_string(),
            None => "no file".to_owned(),
        };
        writeln!(
            f,
            "# Effective configuration: flags > environment > {source} > defaults"
        )?;
        writeln!(f, "api_url = {}", quoted(self.api.url.as_str()))?;
        match (&self.api.token, &self.api.token_source) {
            (Some(token), Some(source)) => writeln!(
                f,
                "api_token_file = {}  # token: {token}",
                quoted(&source.display().to_string())
            )?,
            _ => writeln!(f, "# no API token")?,
        }
        if let Some(ca) = &self.api.ca_file {
            writeln!(f, "api_ca_file = {}", quoted(&ca.display().to_string()))?;
        }
        let headers: Vec<String> = self
            .api
            .headers
            .iter()
            .map(|(name, value)| quoted(&format!("{name}: {value}")))
            .collect();
        writeln!(f, "api_headers = [{}]", headers.join(", "))?;
        writeln!(f, "api_timeout = {}", duration(self.api.timeout))?;
        match &self.profile {
            Some(profile) => writeln!(f, "profile = {}", quoted(profile))?,
            None => writeln!(f, "# no profile")?,
        }
        writeln!(f, "vm_port = {}", self.vm_port)?;
        writeln!(f, "boot_timeout = {}", duration(self.boot_timeout))?;
        writeln!(
            f,
            "vm_connect_timeout = {}",
            duration(self.vm_connect_timeout)
        )?;
        writeln!(
            f,
            "vm_banner_timeout = {}",
            duration(self.vm_banner_timeout)
        )?;
        writeln!(
            f,
            "client_banner_timeout = {}",
            duration(self.client_banner_timeout)
        )
    }
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn duration(d: Duration) -> String {
    quoted(&humantime::format_duration(d).to_string())
}

/// The named file, which must exist, or the default one if it exists.
fn read_file(named: Option<&Path>) -> Result<(Option<PathBuf>, Settings)> {
    let path = named.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && named.is_none() => {
            return Ok((None, Settings::default()));
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let settings = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    Ok((Some(path.to_owned()), settings))
}

/// The token from `api_token_file` if set, else from the systemd credential if present.
fn read_token(
    file: Option<&Path>,
    credentials_dir: Option<&Path>,
) -> Result<(Option<Secret>, Option<PathBuf>)> {
    let path = match (file, credentials_dir) {
        (Some(file), _) => file.to_owned(),
        (None, Some(dir)) if dir.join(TOKEN_CREDENTIAL).exists() => dir.join(TOKEN_CREDENTIAL),
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

fn parse_header(line: &str) -> Result<(HeaderName, Secret)> {
    let Some((name, value)) = line.split_once(':') else {
        bail!("api header {line:?} is not of the form \"Name: value\"");
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .with_context(|| format!("api header name {:?} is not valid", name.trim()))?;
    let value = value.trim();
    ensure!(
        HeaderValue::from_str(value).is_ok(),
        "api header {name} has a value an HTTP header cannot carry"
    );
    Ok((name, Secret::new(value)))
}

fn positive(name: &str, value: Option<Duration>, default: Duration) -> Result<Duration> {
    let value = value.unwrap_or(default);
    ensure!(!value.is_zero(), "{name} must be more than zero");
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn given(url: &str) -> Settings {
        Settings {
            api_url: Some(url.to_owned()),
            ..Settings::default()
        }
    }

    /// Resolves without a TOML file, whatever is installed in /etc on this machine.
    fn resolve(settings: Settings, credentials_dir: Option<&Path>) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.toml", "");
        Config::resolve(Some(&empty), settings, credentials_dir)
    }

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "api_url = \"http://file/\"\nprofile = \"from-file\"\nboot_timeout = \"3m\"\n",
        );
        let flags = Settings {
            profile: Some("from-flag".into()),
            ..Settings::default()
        };
        let config = Config::resolve(Some(&file), flags, None).unwrap();
        assert_eq!(config.api.url.as_str(), "http://file/");
        assert_eq!(config.profile.as_deref(), Some("from-flag"));
        assert_eq!(config.boot_timeout, Duration::from_secs(180));
        assert_eq!(config.vm_port, defaults::VM_PORT);
        assert_eq!(config.api.timeout, defaults::API_TIMEOUT);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "c.toml",
            "api_url = \"http://x/\"\nboot_timout = \"1s\"\n",
        );
        let error = format!(
            "{:#}",
            Config::resolve(Some(&file), Settings::default(), None).unwrap_err()
        );
        assert!(error.contains("unknown field `boot_timout`"), "{error}");
    }

    #[test]
    fn missing_named_file_is_an_error() {
        let error = Config::resolve(
            Some(Path::new("/nonexistent/ssh-on-demand.toml")),
            given("http://x/"),
            None,
        )
        .unwrap_err();
        assert!(format!("{error:#}").contains("/nonexistent/ssh-on-demand.toml"));
    }

    #[test]
    fn api_url_is_required_and_must_be_http() {
        let error = resolve(Settings::default(), None).unwrap_err();
        assert!(error.to_string().contains("api_url is not set"), "{error}");
        let error = resolve(given("ftp://x/"), None).unwrap_err();
        assert!(error.to_string().contains("not ftp://"), "{error}");
    }

    #[test]
    fn token_comes_from_the_credential_unless_a_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), TOKEN_CREDENTIAL, "from-credential\n");
        let config = resolve(given("http://x/"), Some(dir.path())).unwrap();
        assert_eq!(
            config.api.token.as_ref().map(Secret::expose),
            Some("from-credential")
        );

        let file = write(dir.path(), "token", "from-file");
        let settings = Settings {
            api_token_file: Some(file),
            ..given("http://x/")
        };
        let config = resolve(settings, Some(dir.path())).unwrap();
        assert_eq!(
            config.api.token.as_ref().map(Secret::expose),
            Some("from-file")
        );
    }

    #[test]
    fn empty_token_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "token", "\n");
        let settings = Settings {
            api_token_file: Some(file),
            ..given("http://x/")
        };
        let error = resolve(settings, None).unwrap_err();
        assert!(error.to_string().contains("is empty"), "{error}");
    }

    #[test]
    fn display_masks_token_and_header_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "token", "s3cret-token");
        let settings = Settings {
            api_token_file: Some(file),
            api_headers: vec!["X-Api-Key: s3cret-header".into()],
            ..given("http://x/")
        };
        let shown = resolve(settings, None).unwrap().to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("x-api-key: ***"), "{shown}");
        assert!(shown.contains("# token: ***"), "{shown}");
    }

    #[test]
    fn bad_headers_and_zero_timeouts_are_errors() {
        let settings = Settings {
            api_headers: vec!["no colon".into()],
            ..given("http://x/")
        };
        assert!(resolve(settings, None).is_err());
        let settings = Settings {
            boot_timeout: Some(Duration::ZERO),
            ..given("http://x/")
        };
        let error = resolve(settings, None).unwrap_err();
        assert!(error.to_string().contains("boot_timeout"), "{error}");
    }
}
