//! The TOML configuration: where to listen, the platforms (backends) and the profiles the proxy asks for.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::backend::{
    command::CommandConfig, ec2::Ec2Config, libvirt::LibvirtConfig, proxmox::ProxmoxConfig,
};

pub const DEFAULT_CONFIG_FILE: &str = "/etc/ssh-on-demand-api/config.toml";
/// The systemd credential holding the bearer token the proxy must send.
pub const TOKEN_CREDENTIAL: &str = "api-token";
/// The profile used when the proxy sends none.
pub const DEFAULT_PROFILE: &str = "default";

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where to listen unless systemd passes sockets: `127.0.0.1:8080`, `[::1]:8080` or `unix:/path`.
    #[serde(default)]
    pub listen: Option<Listen>,
    /// The bearer token; default: the `api-token` systemd credential.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long a start may wait for the VM's address once the platform started it.
    #[serde(default = "default_address_timeout", with = "humantime_serde")]
    pub address_timeout: Duration,
    /// How long a graceful shutdown may take before the VM is forced off.
    #[serde(default = "default_stop_timeout", with = "humantime_serde")]
    pub stop_timeout: Duration,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
}

fn default_address_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_stop_timeout() -> Duration {
    Duration::from_secs(120)
}

/// One platform connection; several profiles may share it.
#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum BackendConfig {
    Command(CommandConfig),
    Libvirt(LibvirtConfig),
    Proxmox(ProxmoxConfig),
    Ec2(Ec2Config),
}

/// A profile as the proxy sends it: one VM, or one VM per client address from an explicit table.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Client address → VM, for classrooms and labs where each user has their own VM.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_client: BTreeMap<IpAddr, String>,
    /// The VM's sshd port, sent to the proxy with the address.
    #[serde(default = "default_port")]
    pub port: u16,
    /// What a stop does: shut the VM down, or keep its state for the next start to resume.
    #[serde(default)]
    pub stop_mode: StopMode,
    /// When the platform cannot suspend the VM: fail the stop, or shut the VM down instead.
    #[serde(default)]
    pub if_suspend_fails: IfSuspendFails,
    /// When a start cannot resume the VM: fail the start, or discard the saved state and boot.
    #[serde(default)]
    pub if_resume_fails: IfResumeFails,
}

/// What a stop does with the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    /// A graceful shutdown, forced after `stop_timeout`; the next start boots.
    #[default]
    Shutdown,
    /// The VM's state is kept (libvirt's managed save, Proxmox VE's suspend to RAM, a command's); the next
    /// start resumes it.
    Suspend,
    /// The state is kept on disk and the VM's memory given back (Proxmox VE's suspend to disk, EC2's
    /// hibernation); the next start resumes it.
    Hibernate,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IfSuspendFails {
    /// The stop fails with the platform's words; the VM keeps running.
    #[default]
    Fail,
    /// A warning, then the graceful shutdown (and the forced one) as with `stop_mode = "shutdown"`.
    Shutdown,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IfResumeFails {
    /// The start fails with the platform's words; the saved state stays for another try.
    #[default]
    Fail,
    /// A warning, then the saved state is discarded and the VM boots.
    Boot,
}

fn default_port() -> u16 {
    22
}

/// Where the HTTP server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for Listen {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(path) = s.strip_prefix("unix:") {
            ensure!(
                path.starts_with('/'),
                "{s:?}: the socket path must be absolute"
            );
            return Ok(Listen::Unix(path.into()));
        }
        let addr: SocketAddr = s
            .parse()
            .with_context(|| format!("{s:?} is neither ADDRESS:PORT nor unix:/PATH"))?;
        // The token and the platforms' answers travel in clear HTTP: only this host may connect.
        ensure!(
            addr.ip().is_loopback(),
            "{s:?} is not a loopback address; listen on 127.0.0.1, [::1] or a unix socket"
        );
        Ok(Listen::Tcp(addr))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => write!(f, "{addr}"),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

impl Serialize for Listen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Config {
    /// Reads and checks the file: unknown keys, profiles naming missing backends, and each backend's own
    /// settings are errors.
    pub fn load(path: &Path) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Config::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            !self.profiles.is_empty(),
            "no [profiles.NAME] section: the proxy's profile names must map to VMs"
        );
        for (name, profile) in &self.profiles {
            let context = || format!("profile {name:?}");
            let Some(backend) = self.backends.get(&profile.backend) else {
                bail!(
                    "profile {name:?} uses backend {:?}, which no [backends.{0}] section defines",
                    profile.backend
                );
            };
            match (&profile.vm, profile.by_client.is_empty()) {
                (Some(_), true) | (None, false) => {}
                (Some(_), false) => bail!("profile {name:?}: set either vm or by_client, not both"),
                (None, true) => {
                    bail!("profile {name:?}: set vm, or by_client for one VM per client")
                }
            }
            for vm in profile.vms() {
                backend.check_vm(vm).with_context(context)?;
            }
            backend.check_stop_mode(profile).with_context(context)?;
        }
        for (name, backend) in &self.backends {
            backend
                .check()
                .with_context(|| format!("backend {name:?}"))?;
        }
        Ok(())
    }

    /// The effective configuration as TOML, defaults included; it holds file paths, never secrets.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

impl ProfileConfig {
    /// Every VM the profile may name.
    pub fn vms(&self) -> impl Iterator<Item = &str> {
        self.vm
            .iter()
            .chain(self.by_client.values())
            .map(String::as_str)
    }
}

impl BackendConfig {
    fn check(&self) -> Result<()> {
        match self {
            BackendConfig::Command(c) => c.check(),
            BackendConfig::Libvirt(c) => c.check(),
            BackendConfig::Proxmox(c) => c.check(),
            BackendConfig::Ec2(c) => c.check(),
        }
    }

    /// Whether the platform has the profile's `stop_mode`, and a boot for `if_resume_fails = "boot"`.
    fn check_stop_mode(&self, profile: &ProfileConfig) -> Result<()> {
        let (mode, boot) = (
            profile.stop_mode,
            profile.if_resume_fails == IfResumeFails::Boot,
        );
        match self {
            BackendConfig::Command(c) => match mode {
                StopMode::Suspend if c.suspend.is_none() => {
                    bail!("stop_mode = \"suspend\" needs a suspend command in its backend")
                }
                StopMode::Hibernate => bail!(
                    "the command backend has one suspend command: use stop_mode = \"suspend\""
                ),
                _ => Ok(()),
            },
            BackendConfig::Libvirt(_) => {
                ensure!(
                    mode != StopMode::Hibernate,
                    "libvirt's managed save keeps the state on disk already: use stop_mode = \"suspend\""
                );
                Ok(())
            }
            BackendConfig::Proxmox(_) => {
                if mode != StopMode::Shutdown {
                    for vm in profile.vms() {
                        ensure!(
                            !vm.starts_with("lxc/"),
                            "{vm}: Proxmox VE suspends QEMU VMs; for containers it is experimental (CRIU): use stop_mode = \"shutdown\""
                        );
                    }
                }
                ensure!(
                    !(boot && mode == StopMode::Hibernate),
                    "Proxmox VE keeps a hibernated VM's state until a start restores it: if_resume_fails = \"boot\" works with stop_mode = \"suspend\" only"
                );
                Ok(())
            }
            BackendConfig::Ec2(_) => {
                ensure!(
                    mode != StopMode::Suspend,
                    "EC2 has no suspend to memory: use stop_mode = \"hibernate\" (StopInstances with Hibernate=true)"
                );
                ensure!(
                    !boot,
                    "EC2 resumes a hibernated instance by itself and offers no boot instead: remove if_resume_fails"
                );
                Ok(())
            }
        }
    }

    fn check_vm(&self, vm: &str) -> Result<()> {
        match self {
            BackendConfig::Proxmox(_) => crate::backend::proxmox::Guest::parse(vm).map(drop),
            BackendConfig::Ec2(_) => crate::backend::ec2::check_instance_id(vm),
            BackendConfig::Command(_) => crate::backend::command::check_vm_name(vm),
            BackendConfig::Libvirt(_) => {
                ensure!(!vm.is_empty(), "an empty domain name");
                Ok(())
            }
        }
    }
}

static CREDENTIALS_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`credential`] look in `dir` instead of `$CREDENTIALS_DIRECTORY`, for `check-config` run by hand
/// against /etc/credstore.
pub fn use_credentials_dir(dir: PathBuf) {
    let _ = CREDENTIALS_DIR.set(dir);
}

/// The file of the systemd credential `name`: `$CREDENTIALS_DIRECTORY/NAME`, or, in a directory given to
/// `check-config`, NAME or `ssh-on-demand-api.NAME` as they lie in /etc/credstore.
pub fn credential(name: &str) -> Option<PathBuf> {
    if let Some(dir) = CREDENTIALS_DIR.get() {
        return [name.to_owned(), format!("ssh-on-demand-api.{name}")]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.exists());
    }
    let path = Path::new(&std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    path.exists().then_some(path)
}

#[cfg(test)]
mod tests;
