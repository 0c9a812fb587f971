//! End to end through the real OpenSSH client, ssh-on-demand under systemd-socket-activate, a real HTTP start
//! API and a real sshd as the VM.

mod hostile;
mod login;
mod start_api;
mod vm;

use testkit as common;
use testkit::both_modes;

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    proxy::{Handover, Mode, Proxy},
    ssh::{assert_echo, run, scp, spawn_login, ssh, stderr, stdout},
    tls::HttpsApi,
    vm::Vm,
};
use serde_json::json;
use sha2::{Digest, Sha256};

/// How long the test VMs take to "boot" after the start API answered.
const BOOT_TIME: Duration = Duration::from_millis(300);

/// Runs one ssh login that must be refused, and returns what the user saw on stderr.
fn refused_login(proxy: &Proxy) -> String {
    common::ssh::refused_login(proxy.addr).0
}

#[test]
fn misconfiguration_is_shown_to_the_user_and_detailed_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        "api_url = \"http://127.0.0.1:9/\"\nboot_timout = \"1s\"\n",
    )
    .unwrap();
    let proxy = Proxy::builder("http://127.0.0.1:9/")
        .config(config.display().to_string())
        .start();
    let seen = refused_login(&proxy);
    assert!(
        seen.contains("ssh-on-demand is misconfigured on this host"),
        "{seen}"
    );
    let summary = proxy.wait_for_summary(1);
    assert!(summary.contains(r#"outcome="misconfigured""#), "{summary}");
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("unknown field `boot_timout`"));
}
