//! The Proxmox VE backend: its REST API with an API token; QEMU VMs (`105`, `qemu/105`) and LXC containers
//! (`lxc/200`). Start and stop are tasks whose end we wait for; the address comes from the QEMU guest
//! agent (`network-get-interfaces`) or, for containers, from `interfaces`.
//!
//! A suspend is Proxmox's own: to RAM (the QEMU process paused, `qmpstatus` `paused`, resumed by
//! `status/resume`) or to disk (`todisk=1`: the state saved to a volume, the VM stopped with the lock
//! `suspended`, restored by the next `status/start`).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use reqwest::{Method, StatusCode, header::HeaderValue};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ssh_on_demand_common::{retry::Backoff, secret::Secret};

use super::{Lookup, Power};
use crate::{
    address::{self, Interface},
    config,
    error::{Failure, Kind},
    tls,
};

/// The systemd credential holding the API token's secret (the UUID Proxmox shows once).
pub const TOKEN_CREDENTIAL: &str = "proxmox-token";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// The API's base, e.g. `https://pve.example.org:8006`.
    pub url: url::Url,
    /// The node the guests live on.
    pub node: String,
    /// `USER@REALM!TOKENID`.
    pub token_id: String,
    /// The token's secret; default: the `proxmox-token` systemd credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret_file: Option<PathBuf>,
    /// PEM CA certificates to trust instead of the system's (Proxmox's own `pve-root-ca.pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The server certificate's SHA-256 fingerprint, as Proxmox shows it: trusts that certificate only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// One API request.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// A start or stop task, from request to its end.
    #[serde(default = "default_task_timeout", with = "humantime_serde")]
    pub task_timeout: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_task_timeout() -> Duration {
    Duration::from_secs(120)
}

impl ProxmoxConfig {
    pub fn check(&self) -> Result<()> {
        ensure!(
            matches!(self.url.scheme(), "https" | "http"),
            "url must be https://HOST:8006"
        );
        ensure!(
            self.ca_file.is_none() || self.fingerprint.is_none(),
            "set ca_file or fingerprint, not both"
        );
        ensure!(
            self.token_id.contains('!') && self.token_id.contains('@'),
            "token_id {:?} is not USER@REALM!TOKENID",
            self.token_id
        );
        if let Some(fingerprint) = &self.fingerprint {
            tls::parse_fingerprint(fingerprint)?;
        }
        Ok(())
    }
}

/// A guest's state as `status/current` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Running,
    /// Suspended to RAM: the QEMU process paused.
    InRam,
    /// Suspended to disk (hibernated): stopped, its state in a volume, locked `suspended`.
    OnDisk,
    Stopped,
    Other(String),
}

/// A guest: QEMU VM or LXC container, by VMID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    kind: &'static str,
    vmid: u32,
}

impl Guest {
    pub fn parse(vm: &str) -> Result<Guest> {
        let (kind, id) = match vm.split_once('/') {
            Some(("qemu", id)) => ("qemu", id),
            Some(("lxc", id)) => ("lxc", id),
            Some(_) => bail!("{vm:?}: Proxmox guests are VMID, qemu/VMID or lxc/VMID"),
            None => ("qemu", vm),
        };
        let vmid: u32 = id
            .parse()
            .with_context(|| format!("{vm:?}: {id:?} is not a VMID"))?;
        ensure!(vmid >= 100, "{vm:?}: VMIDs start at 100");
        Ok(Guest { kind, vmid })
    }
}

pub struct Proxmox {
    config: ProxmoxConfig,
    client: reqwest::Client,
    auth: HeaderValue,
}

impl Proxmox {
    pub fn new(config: &ProxmoxConfig) -> Result<Proxmox> {
        let secret_file = match &config.token_secret_file {
            Some(path) => path.clone(),
            None => config::credential(TOKEN_CREDENTIAL).with_context(|| {
                format!("no token_secret_file and no {TOKEN_CREDENTIAL:?} systemd credential")
            })?,
        };
        let secret = Secret::from_file(&secret_file)?;
        let mut auth = HeaderValue::try_from(format!(
            "PVEAPIToken={}={}",
            config.token_id,
            secret.expose()
        ))
        .context("the token id or secret has characters a header cannot carry")?;
        auth.set_sensitive(true);
        let mut builder = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .user_agent(concat!("ssh-on-demand-api/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &config.ca_file {
            builder = tls::trust_ca_file(builder, path)?;
        } else if let Some(fingerprint) = &config.fingerprint {
            builder = tls::pin_fingerprint(builder, fingerprint)?;
        }
        Ok(Proxmox {
            config: config.clone(),
            client: builder.build().context("building the HTTP client")?,
            auth,
        })
    }

    pub async fn power(&self, vm: &str) -> Result<Power, Failure> {
        Ok(match self.state(vm).await? {
            State::Running => Power::Running,
            State::InRam | State::OnDisk => Power::Suspended,
            State::Stopped => Power::Off,
            State::Other(word) => Power::Other(word),
        })
    }

    /// `status/current`: the guest's `status`, and for a suspended one where its state is.
    async fn state(&self, vm: &str) -> Result<State, Failure> {
        let status = self
            .call(Method::GET, &self.guest_path(vm, "status/current")?, &[])
            .await?;
        let word = |key: &str| {
            status
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Ok(
            match (
                word("status").as_str(),
                word("qmpstatus").as_str(),
                word("lock").as_str(),
            ) {
                // "suspended" is a guest's own suspend to RAM (S3), which status/resume wakes too.
                ("running", "paused" | "suspended", _) => State::InRam,
                ("running", _, _) => State::Running,
                ("stopped", _, "suspended") => State::OnDisk,
                ("stopped", _, _) => State::Stopped,
                (other, _, _) => State::Other(other.to_owned()),
            },
        )
    }

    /// `status/suspend`, with `todisk=1` for a hibernation; waits for its task.
    pub async fn suspend(&self, vm: &str, to_disk: bool) -> Result<(), Failure> {
        let form: &[(&str, &str)] = if to_disk { &[("todisk", "1")] } else { &[] };
        let upid = self
            .call(Method::POST, &self.guest_path(vm, "status/suspend")?, form)
            .await?;
        self.wait_for_task(&upid)
            .await
            .map_err(|f| f.context(format_args!("suspending {vm}")))
    }

    /// `status/resume` for a VM suspended to RAM; `status/start`, which restores the saved state, for one
    /// suspended to disk.
    pub async fn resume(&self, vm: &str) -> Result<(), Failure> {
        let action = match self.state(vm).await? {
            State::OnDisk => "status/start",
            _ => "status/resume",
        };
        let upid = self
            .call(Method::POST, &self.guest_path(vm, action)?, &[])
            .await?;
        self.wait_for_task(&upid)
            .await
            .map_err(|f| f.context(format_args!("resuming {vm}")))
    }

    /// A VM suspended to RAM is stopped, which drops its state, and started afresh. One suspended to disk
    /// keeps its state until a start restores it: Proxmox VE offers no boot instead.
    pub async fn boot_instead(&self, vm: &str) -> Result<(), Failure> {
        if self.state(vm).await? == State::OnDisk {
            return Err(Failure::refused(format!(
                "{vm} is suspended to disk, and Proxmox VE restores that state at every start"
            )));
        }
        self.stop(vm).await?;
        self.start(vm).await
    }

    pub async fn start(&self, vm: &str) -> Result<(), Failure> {
        let upid = self
            .call(Method::POST, &self.guest_path(vm, "status/start")?, &[])
            .await?;
        self.wait_for_task(&upid)
            .await
            .map_err(|f| f.context(format_args!("starting {vm}")))
    }

    pub async fn address(&self, vm: &str) -> Result<Lookup, Failure> {
        let guest = Guest::parse(vm).map_err(|e| Failure::refused(format!("{e:#}")))?;
        let path = if guest.kind == "lxc" {
            "interfaces"
        } else {
            "agent/network-get-interfaces"
        };
        let answer = match self
            .call(Method::GET, &self.guest_path(vm, path)?, &[])
            .await
        {
            Ok(answer) => answer,
            // "QEMU guest agent is not running" while the guest boots: Proxmox answers 500 for it.
            Err(failure) if matches!(failure.kind(), Kind::Refused | Kind::Unavailable) => {
                return Ok(Lookup::NotYet(failure.message().to_owned()));
            }
            Err(other) => return Err(other),
        };
        let list = answer.get("result").unwrap_or(&answer);
        let interfaces: Vec<Interface> = list
            .as_array()
            .map(|l| l.iter().map(interface).collect())
            .unwrap_or_default();
        Ok(match address::pick(&interfaces) {
            Some(ip) => Lookup::Found(ip),
            None => Lookup::NotYet(format!("{vm} has no address on any interface yet")),
        })
    }

    /// Shutdown with Proxmox's own forced stop at the end, so that a guest ignoring ACPI still goes off.
    pub async fn shutdown(&self, vm: &str) -> Result<(), Failure> {
        let timeout = self.config.task_timeout.as_secs().to_string();
        let form = [("forceStop", "1"), ("timeout", timeout.as_str())];
        self.call(
            Method::POST,
            &self.guest_path(vm, "status/shutdown")?,
            &form,
        )
        .await
        .map(drop)
    }

    pub async fn stop(&self, vm: &str) -> Result<(), Failure> {
        let upid = self
            .call(Method::POST, &self.guest_path(vm, "status/stop")?, &[])
            .await?;
        self.wait_for_task(&upid)
            .await
            .map_err(|f| f.context(format_args!("stopping {vm}")))
    }

    fn guest_path(&self, vm: &str, rest: &str) -> Result<String, Failure> {
        let guest = Guest::parse(vm).map_err(|e| Failure::refused(format!("{e:#}")))?;
        Ok(format!(
            "nodes/{}/{}/{}/{rest}",
            self.config.node, guest.kind, guest.vmid
        ))
    }

    /// Waits until the task `upid` ends; its exit status other than `OK` is Proxmox's reason.
    async fn wait_for_task(&self, upid: &Value) -> Result<(), Failure> {
        let Some(upid) = upid.as_str() else {
            return Err(Failure::unavailable(format!(
                "Proxmox answered {upid} instead of a task id"
            )));
        };
        let path = format!(
            "nodes/{}/tasks/{}/status",
            self.config.node,
            urlencode(upid)
        );
        let deadline = tokio::time::Instant::now() + self.config.task_timeout;
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let task = self.call(Method::GET, &path, &[]).await?;
            if task.get("status").and_then(Value::as_str) == Some("stopped") {
                return match task.get("exitstatus").and_then(Value::as_str) {
                    Some("OK") => Ok(()),
                    Some(why) => Err(Failure::refused(why.to_owned())),
                    None => Err(Failure::refused("the task ended without an exit status")),
                };
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Failure::timeout(format!(
                    "task {upid} still running after {}",
                    humantime::format_duration(self.config.task_timeout)
                )));
            }
            pause.pause(deadline).await;
        }
    }

    /// One API call; returns its `data`. Proxmox's message on failure is what the user reads.
    async fn call(
        &self,
        method: Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> Result<Value, Failure> {
        let url = format!(
            "{}/api2/json/{path}",
            self.config.url.as_str().trim_end_matches('/')
        );
        let mut request = self
            .client
            .request(method.clone(), &url)
            .header("Authorization", self.auth.clone());
        if method == Method::POST {
            let body: Vec<String> = form
                .iter()
                .map(|(k, v)| format!("{k}={}", urlencode(v)))
                .collect();
            request = request
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(body.join("&"));
        }
        let response = request.send().await.map_err(|e| {
            Failure::unreachable(format!("cannot reach Proxmox VE at {}", self.config.url), e)
        })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Failure::unreachable("reading Proxmox VE's answer", e))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(body.get("data").cloned().unwrap_or(Value::Null));
        }
        let message = body
            .get("message")
            .and_then(Value::as_str)
            .map(|m| m.trim().to_owned())
            .unwrap_or_else(|| format!("Proxmox VE answered {status}"));
        tracing::debug!(%status, path, message, "Proxmox VE refused");
        Err(classify(status, message))
    }
}

/// Proxmox answers 500 for most refusals ("VM 105 not running"), and 595/596 when a node is unreachable.
fn classify(status: StatusCode, message: String) -> Failure {
    let transient = matches!(status.as_u16(), 502..=504 | 595 | 596)
        || message.contains("quorum")
        || message.contains("got timeout");
    if transient {
        Failure::unavailable(message)
    } else {
        Failure::refused(message)
    }
}

fn interface(item: &Value) -> Interface {
    let name = item
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut addrs: Vec<IpAddr> = item
        .get("ip-addresses")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("ip-address").and_then(Value::as_str)?.parse().ok())
        .collect();
    // Containers also give inet/inet6 as CIDR.
    for key in ["inet", "inet6"] {
        if let Some(ip) = item
            .get(key)
            .and_then(Value::as_str)
            .and_then(|c| c.split('/').next()?.parse().ok())
            && !addrs.contains(&ip)
        {
            addrs.push(ip);
        }
    }
    Interface { name, addrs }
}

fn urlencode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

#[cfg(test)]
mod tests;
