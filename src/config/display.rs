//! `check-config`'s output: the effective configuration as a TOML file an operator could use, every profile
//! resolved, secrets masked.

use std::{fmt, time::Duration};

use super::{Config, EtcdConfig, Profile, StoreConfig};

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
        writeln!(
            f,
            "state_dir = {}",
            quoted(&self.state_dir.display().to_string())
        )?;
        match &self.store {
            StoreConfig::Local => writeln!(f, "state_store = \"local\"")?,
            StoreConfig::Etcd(etcd) => etcd.fmt(f)?,
        }
        let d = &self.daemon;
        writeln!(f, "max_sessions = {}", d.max_sessions)?;
        writeln!(f, "max_sessions_per_source = {}", d.max_sessions_per_source)?;
        writeln!(f, "max_pending_per_vm = {}", d.max_pending_per_vm)?;
        writeln!(f, "drain_timeout = {}", duration(d.drain_timeout))?;
        match &d.metrics_listen {
            Some(listen) => writeln!(f, "metrics_listen = {}", quoted(listen))?,
            None => writeln!(f, "# no metrics_listen")?,
        }
        match &self.default {
            Some(profile) => profile.fmt(f)?,
            None => writeln!(
                f,
                "# no top-level api_url: connections on ports no profile lists are refused"
            )?,
        }
        for profile in &self.profiles {
            writeln!(f, "\n[profiles.{}]", profile.label())?;
            writeln!(f, "ports = {:?}", profile.ports)?;
            profile.fmt(f)?;
        }
        Ok(())
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "api_url = {}", quoted(&self.api.url.to_string()))?;
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
        if let Some((path, headers)) = &self.api.headers_file {
            let headers: Vec<String> = headers
                .iter()
                .map(|(name, value)| format!("{name}: {value}"))
                .collect();
            writeln!(
                f,
                "api_headers_file = {}  # {}",
                quoted(&path.display().to_string()),
                headers.join(", ")
            )?;
        }
        writeln!(f, "api_timeout = {}", duration(self.api.timeout))?;
        // A named profile's name is its table's; only the top level says it.
        if self.ports.is_empty() {
            match &self.name {
                Some(name) => writeln!(f, "profile = {}", quoted(name))?,
                None => writeln!(f, "# no profile")?,
            }
        }
        match &self.stop {
            Some(stop) => {
                writeln!(f, "stop_url = {}", quoted(&stop.url.to_string()))?;
                writeln!(f, "idle_timeout = {}", duration(stop.idle_timeout))?;
                writeln!(f, "stop_timeout = {}", duration(stop.timeout))?;
            }
            None => writeln!(f, "# no stop_url: VMs are never stopped")?,
        }
        match self.min_run_time {
            Some(min) => writeln!(f, "min_run_time = {}", duration(min))?,
            None => writeln!(f, "# no min_run_time")?,
        }
        let windows: Vec<String> = self
            .keep_warm
            .iter()
            .map(|w| quoted(&w.to_string()))
            .collect();
        writeln!(f, "keep_warm = [{}]", windows.join(", "))?;
        writeln!(f, "pre_wake = {}", self.pre_wake)?;
        writeln!(f, "vm_scope = {}", quoted(self.vm_scope.as_str()))?;
        writeln!(f, "vm_port = {}", self.vm_port)?;
        let networks: Vec<String> = self
            .vm_networks
            .iter()
            .map(|net| quoted(&net.to_string()))
            .collect();
        writeln!(f, "vm_networks = [{}]", networks.join(", "))?;
        let clients: Vec<String> = self
            .client_networks
            .iter()
            .map(|net| quoted(&net.to_string()))
            .collect();
        writeln!(f, "client_networks = [{}]", clients.join(", "))?;
        match self.start_limit {
            Some(limit) => writeln!(f, "source_start_limit = {}", quoted(&limit.to_string()))?,
            None => writeln!(f, "source_start_limit = \"none\"")?,
        }
        writeln!(f, "penalty_strikes = {}", self.penalty_strikes)?;
        writeln!(f, "penalty_max = {}", duration(self.penalty_max))?;
        writeln!(
            f,
            "silent_clients = {}",
            quoted(self.silent_clients.as_str())
        )?;
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

impl fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# the daemon only (ssh-on-demand-daemon.socket): per-connection instances refuse connections with it"
        )?;
        writeln!(f, "state_store = \"etcd\"")?;
        let endpoints: Vec<String> = self.endpoints.iter().map(|e| quoted(e)).collect();
        writeln!(f, "etcd_endpoints = [{}]", endpoints.join(", "))?;
        writeln!(f, "etcd_prefix = {}", quoted(&self.prefix))?;
        writeln!(f, "host_id = {}", quoted(&self.host_id))?;
        writeln!(f, "etcd_lease_ttl = {}", duration(self.lease_ttl))?;
        if let Some(ca) = &self.ca_file {
            writeln!(f, "etcd_ca_file = {}", quoted(&ca.display().to_string()))?;
        }
        if let Some((cert, key)) = &self.identity {
            writeln!(
                f,
                "etcd_cert_file = {}",
                quoted(&cert.display().to_string())
            )?;
            writeln!(f, "etcd_key_file = {}", quoted(&key.display().to_string()))?;
        }
        match (&self.user, &self.password_source) {
            (Some((user, password)), Some(source)) => {
                writeln!(f, "etcd_user = {}", quoted(user))?;
                writeln!(
                    f,
                    "etcd_password_file = {}  # password: {password}",
                    quoted(&source.display().to_string())
                )
            }
            _ => writeln!(f, "# no etcd user"),
        }
    }
}

fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn duration(d: Duration) -> String {
    quoted(&humantime::format_duration(d).to_string())
}
