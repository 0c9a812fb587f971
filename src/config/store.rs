//! The store's settings: local files (the default) or an etcd cluster, with its endpoints, TLS, user, key
//! prefix, this host's name and its lease's TTL.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use reqwest::Url;

use super::{Profile, positive};
use crate::{
    cli::{Settings, StateStore},
    secret::Secret,
};

/// Default prefix of every key, so that one cluster can serve other applications too.
pub const ETCD_PREFIX: &str = "/ssh-on-demand/";
/// Default TTL of a host's lease: how long a dead host's sessions keep their VMs.
pub const ETCD_LEASE_TTL: Duration = Duration::from_secs(10);
/// Below this, etcd raises the TTL anyway (about 1.5 election timeouts), and keep-alives would crowd it.
pub const MIN_ETCD_LEASE_TTL: Duration = Duration::from_secs(2);
/// How many lease TTLs an idle timeout must span: a host cut off from etcd for longer than the TTL plus the
/// idle timeout may see its VM stopped under a live session, so the idle timeout is the margin.
pub const IDLE_TIMEOUT_IN_TTLS: u32 = 3;
/// Name of the etcd password in `$CREDENTIALS_DIRECTORY` (`LoadCredential=etcd-password:…`).
pub const ETCD_PASSWORD_CREDENTIAL: &str = "etcd-password";

/// Where the VMs' shared state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Files in `state_dir`.
    Local,
    Etcd(Box<EtcdConfig>),
}

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    /// Ends with `/`.
    pub prefix: String,
    pub host_id: String,
    pub lease_ttl: Duration,
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key.
    pub identity: Option<(PathBuf, PathBuf)>,
    pub user: Option<(String, Secret)>,
    /// Where the password was read from, for `check-config`.
    pub password_source: Option<PathBuf>,
}

impl StoreConfig {
    /// Reads the store's settings from the host's `settings`, and checks them against every profile.
    pub(super) fn resolve(
        settings: &Settings,
        profiles: &[&Profile],
        credentials_dir: Option<&Path>,
    ) -> Result<StoreConfig> {
        let etcd_set = [
            ("etcd_endpoints", !settings.etcd_endpoints.is_empty()),
            ("etcd_prefix", settings.etcd_prefix.is_some()),
            ("host_id", settings.host_id.is_some()),
            ("etcd_lease_ttl", settings.etcd_lease_ttl.is_some()),
            ("etcd_ca_file", settings.etcd_ca_file.is_some()),
            ("etcd_cert_file", settings.etcd_cert_file.is_some()),
            ("etcd_key_file", settings.etcd_key_file.is_some()),
            ("etcd_user", settings.etcd_user.is_some()),
            ("etcd_password_file", settings.etcd_password_file.is_some()),
        ];
        if settings.state_store.unwrap_or_default() == StateStore::Local {
            if let Some((key, _)) = etcd_set.iter().find(|(_, set)| *set) {
                bail!("{key} is set but state_store is not \"etcd\"");
            }
            return Ok(StoreConfig::Local);
        }
        let etcd = EtcdConfig::resolve(settings, credentials_dir)?;
        let floor = etcd.lease_ttl * IDLE_TIMEOUT_IN_TTLS;
        for profile in profiles {
            if let Some(stop) = &profile.stop {
                ensure!(
                    stop.idle_timeout >= floor,
                    "idle_timeout of profile {} ({}) is shorter than {IDLE_TIMEOUT_IN_TTLS} etcd lease TTLs ({}): \
                     a host cut off from etcd for longer than the TTL could see its VMs stopped under live \
                     sessions within the idle timeout; raise idle_timeout or lower etcd_lease_ttl",
                    profile.label(),
                    crate::seconds(stop.idle_timeout),
                    crate::seconds(floor),
                );
            }
        }
        Ok(StoreConfig::Etcd(Box::new(etcd)))
    }
}

impl EtcdConfig {
    fn resolve(settings: &Settings, credentials_dir: Option<&Path>) -> Result<EtcdConfig> {
        ensure!(
            !settings.etcd_endpoints.is_empty(),
            "state_store is \"etcd\" but etcd_endpoints is empty: list the cluster's members, e.g. \
             [\"https://10.0.0.5:2379\", \"https://10.0.0.6:2379\", \"https://10.0.0.7:2379\"]"
        );
        let mut https = 0;
        for endpoint in &settings.etcd_endpoints {
            // The error would repeat the URL, and with it any credentials in it.
            let url = Url::parse(endpoint)
                .map_err(|e| anyhow::anyhow!("etcd_endpoints: an entry is not a URL ({e})"))?;
            ensure!(
                matches!(url.scheme(), "http" | "https") && url.host().is_some(),
                "etcd_endpoints: {} must be http://HOST:PORT or https://HOST:PORT",
                url.scheme()
            );
            ensure!(
                url.username().is_empty() && url.password().is_none(),
                "etcd_endpoints: put the user in etcd_user and its password in etcd_password_file, not in the URL"
            );
            https += usize::from(url.scheme() == "https");
        }
        ensure!(
            https == 0 || https == settings.etcd_endpoints.len(),
            "etcd_endpoints mixes http:// and https://; use one scheme for the whole cluster"
        );
        let tls = https > 0;
        ensure!(
            tls || (settings.etcd_ca_file.is_none()
                && settings.etcd_cert_file.is_none()
                && settings.etcd_key_file.is_none()),
            "etcd_ca_file, etcd_cert_file and etcd_key_file need https:// etcd_endpoints"
        );
        let identity = match (&settings.etcd_cert_file, &settings.etcd_key_file) {
            (Some(cert), Some(key)) => Some((
                readable(cert, "etcd_cert_file")?,
                readable(key, "etcd_key_file")?,
            )),
            (None, None) => None,
            _ => bail!("etcd_cert_file and etcd_key_file go together"),
        };
        let ca_file = settings
            .etcd_ca_file
            .as_deref()
            .map(|ca| readable(ca, "etcd_ca_file"))
            .transpose()?;

        let prefix = settings
            .etcd_prefix
            .clone()
            .unwrap_or_else(|| ETCD_PREFIX.to_owned());
        ensure!(
            prefix.starts_with('/') && prefix.ends_with('/') && prefix.len() > 1,
            "etcd_prefix {prefix:?} must start and end with '/', e.g. \"/ssh-on-demand/\""
        );
        let host_id = match &settings.host_id {
            Some(id) => id.clone(),
            None => machine_id()?,
        };
        ensure!(
            !host_id.is_empty()
                && host_id.len() <= 64
                && host_id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            "host_id {host_id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        );
        let lease_ttl = positive("etcd_lease_ttl", settings.etcd_lease_ttl, ETCD_LEASE_TTL)?;
        ensure!(
            lease_ttl >= MIN_ETCD_LEASE_TTL && lease_ttl.subsec_nanos() == 0,
            "etcd_lease_ttl must be whole seconds, at least {}",
            crate::seconds(MIN_ETCD_LEASE_TTL)
        );
        let (user, password_source) = match &settings.etcd_user {
            None => {
                ensure!(
                    settings.etcd_password_file.is_none(),
                    "etcd_password_file is set but etcd_user is not"
                );
                (None, None)
            }
            Some(user) => {
                let credential = settings
                    .etcd_password_credential
                    .as_deref()
                    .unwrap_or(ETCD_PASSWORD_CREDENTIAL);
                let path = match (&settings.etcd_password_file, credentials_dir) {
                    (Some(file), _) => file.clone(),
                    (None, Some(dir)) if dir.join(credential).exists() => dir.join(credential),
                    _ => bail!(
                        "etcd_user is set but no password: give etcd_password_file, or the systemd credential \
                         {credential}"
                    ),
                };
                let password = Secret::from_file(&path)?;
                (Some((user.clone(), password)), Some(path))
            }
        };
        Ok(EtcdConfig {
            endpoints: settings.etcd_endpoints.clone(),
            prefix,
            host_id,
            lease_ttl,
            ca_file,
            identity,
            user,
            password_source,
        })
    }

    pub fn tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

fn readable(path: &Path, key: &str) -> Result<PathBuf> {
    std::fs::metadata(path).with_context(|| format!("{key} {}", path.display()))?;
    Ok(path.to_owned())
}

/// This machine's ID (systemd's `/etc/machine-id`), else its host name: what tells proxy hosts apart.
fn machine_id() -> Result<String> {
    match std::fs::read_to_string("/etc/machine-id") {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let name = rustix::system::uname()
                .nodename()
                .to_string_lossy()
                .into_owned();
            ensure!(
                !name.is_empty(),
                "host_id is not set, and this machine has neither a machine ID nor a host name"
            );
            Ok(name)
        }
    }
}
