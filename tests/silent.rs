//! Clients that wait for the server to speak first: `ssh-keyscan` (which Ansible and CI use to fill
//! `known_hosts`) and scanners. They start nothing unless told to, and get a running VM's host key at once.

use testkit as common;
use testkit::both_modes;

use std::{fs, time::Duration};

use common::{
    PATIENCE,
    api::StartApi,
    proxy::Proxy,
    ssh::{assert_echo, run, stderr, stdout},
    vm::Vm,
};

/// How long the test VMs take to "boot" after the start API answered.
const BOOT_TIME: Duration = Duration::from_millis(300);

/// `ssh-keyscan` of the proxy (the first thing Ansible and CI do): the VM's host key.
fn keyscan(proxy: &Proxy) -> std::process::Output {
    run(
        std::process::Command::new("ssh-keyscan")
            .args(["-T", "10", "-t", "ed25519", "-p"])
            .arg(proxy.addr.port().to_string())
            .arg(proxy.addr.ip().to_string()),
        PATIENCE,
    )
}

/// The key `ssh-keyscan` printed is the VM's own.
fn assert_scanned(output: &std::process::Output, vm: &Vm) {
    let host_key = fs::read_to_string(vm.dir().join("host_key.pub")).unwrap();
    let key = host_key.split_whitespace().nth(1).unwrap();
    let scanned = stdout(output);
    assert!(scanned.contains(key), "{scanned:?}\n{}", stderr(output));
}

both_modes! {
    /// ssh-keyscan waits for the server to speak first. It gets the VM's host key when the VM runs, and
    /// starts nothing when it does not (scanners behave the same way).
    fn ssh_keyscan_gets_the_running_vms_key_and_starts_nothing(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::builder_in(mode, &api.url())
            .arg("--client-banner-timeout=1s")
            .start();
        let cold = keyscan(&proxy);
        assert!(stdout(&cold).is_empty(), "{}", stdout(&cold));
        assert!(api.requests().is_empty(), "a VM was started for a client that said nothing");
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(r#"outcome="not_ssh""#), "{summary}");
        assert!(summary.contains("as ssh-keyscan does) and its VM is not running"), "{summary}");

        assert_echo(proxy.addr, &vm.client_key(), "booted");
        assert_scanned(&keyscan(&proxy), &vm);
        assert_eq!(api.requests().len(), 1, "the running VM was not asked for again");
    }

    /// With `silent_clients = "start"`, ssh-keyscan of a cold VM starts it.
    fn ssh_keyscan_starts_the_vm_when_told_to(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--client-banner-timeout=1s", "--silent-clients=start"])
            .start();
        assert_scanned(&keyscan(&proxy), &vm);
        assert_eq!(api.requests().len(), 1);
    }

    /// A VM that runs needs nothing started, so a silent client is not held for `client_banner_timeout`:
    /// here a minute, past ssh-keyscan's own 10 s, and still it gets the key.
    fn ssh_keyscan_of_a_running_vm_is_not_held(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::builder_in(mode, &api.url())
            .arg("--client-banner-timeout=60s")
            .start();
        assert_echo(proxy.addr, &vm.client_key(), "booted");
        assert_scanned(&keyscan(&proxy), &vm);
        assert_eq!(api.requests().len(), 1, "the running VM was not asked for again");
    }
}
