//! The Proxmox VE backend against fakepve (PyPI), an independent fake of the Proxmox VE API written from
//! PVE's published API schema and error catalogue. Guests' agents report loopback addresses only.

use testkit as common;

use std::thread;

use common::{
    PATIENCE,
    api_server::Companion,
    loopback_net,
    pve::{Pve, TOKEN_SECRET},
};
use serde_json::{Value, json};

fn agent(ip: &str) -> Value {
    json!({"interfaces": [
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]},
        {"name": "eth0", "ip-addresses": [{"ip-address": ip, "ip-address-type": "ipv4", "prefix": 24}]}]})
}

fn guests(net: &str) -> Value {
    json!([
        // The guest agent answers a moment after the start, as in a booting guest.
        {"vmid": 100, "name": "dev", "agent": agent(&format!("{net}.10")), "agent_after_start": 0.3},
        {"vmid": 101, "name": "up", "status": "running", "agent": agent(&format!("{net}.11"))},
        {"vmid": 102, "name": "noagent"},
        {"vmid": 103, "name": "big", "start_error": "not enough memory to start VM 103"},
        {"vmid": 200, "name": "ct", "type": "lxc", "config": {"net0": format!("name=eth0,bridge=vmbr0,ip={net}.20/24")}},
        {"vmid": 104, "name": "ram", "status": "running", "agent": agent(&format!("{net}.14"))},
        {"vmid": 105, "name": "disk", "status": "running", "agent": agent(&format!("{net}.15"))},
        // Suspended to disk, and its state will not load.
        {"vmid": 106, "name": "broken", "status": "stopped", "lock": "suspended",
         "start_error": "unable to restore VM 106 - QEMU exited with code 1"}
    ])
}

const PROFILES: &str = "[profiles.lab]\nbackend = \"pve\"\nvm = \"100\"\n\
    [profiles.up]\nbackend = \"pve\"\nvm = \"qemu/101\"\n\
    [profiles.noagent]\nbackend = \"pve\"\nvm = \"102\"\n\
    [profiles.big]\nbackend = \"pve\"\nvm = \"103\"\n\
    [profiles.ct]\nbackend = \"pve\"\nvm = \"lxc/200\"\n\
    [profiles.ram]\nbackend = \"pve\"\nvm = \"104\"\nstop_mode = \"suspend\"\n\
    [profiles.disk]\nbackend = \"pve\"\nvm = \"105\"\nstop_mode = \"hibernate\"\n\
    [profiles.broken]\nbackend = \"pve\"\nvm = \"106\"\nstop_mode = \"hibernate\"\n";

fn companion(pve: &Pve, tls: &str, secret: &str) -> Companion {
    Companion::start(
        &format!("address_timeout = \"2s\"\n{}{PROFILES}", pve.backend(tls)),
        &[("proxmox-token", secret)],
    )
}

#[test]
fn start_once_then_the_agents_address() {
    let net = loopback_net();
    let pve = Pve::start(guests(&net));
    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", pve.fingerprint),
        TOKEN_SECRET,
    );
    let replies: Vec<_> = thread::scope(|s| {
        let asks: Vec<_> = (0..4).map(|_| s.spawn(|| api.start_vm("lab"))).collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for reply in &replies {
        assert_eq!(reply.vm_ip(), format!("{net}.10"));
    }
    assert_eq!(pve.actions("start", 100), 1);
    // Running now: answered without another start.
    assert_eq!(api.start_vm("lab").vm_ip(), format!("{net}.10"));
    assert_eq!(pve.actions("start", 100), 1);

    assert_eq!(api.start_vm("up").vm_ip(), format!("{net}.11"));
    assert_eq!(pve.actions("start", 101), 0);
    assert_eq!(api.start_vm("ct").vm_ip(), format!("{net}.20"));
    assert_eq!(pve.actions("start", 200), 1);
}

#[test]
fn proxmox_refusals_in_its_own_words() {
    let pve = Pve::start(guests(&loopback_net()));
    let api = companion(
        &pve,
        &format!("ca_file = \"{}\"", pve.ca_file),
        TOKEN_SECRET,
    );
    let big = api.start_vm("big");
    assert_eq!(big.status, 409, "{big:?}");
    assert_eq!(
        big.error(),
        "starting 103: not enough memory to start VM 103"
    );

    let noagent = api.start_vm("noagent");
    assert_eq!(noagent.status, 504, "{noagent:?}");
    assert_eq!(
        noagent.error(),
        "no address for 102 within 2s: QEMU guest agent is not running"
    );
}

#[test]
fn wrong_token_and_wrong_certificate_are_clear() {
    let pve = Pve::start(guests(&loopback_net()));
    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", pve.fingerprint),
        "not-the-secret",
    );
    let reply = api.start_vm("lab");
    assert_eq!(
        (reply.status, reply.error()),
        (409, "authentication failure")
    );
    assert!(
        !api.log.lines().iter().any(|l| l.contains("not-the-secret")),
        "the secret was logged"
    );

    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", "00".repeat(32)),
        TOKEN_SECRET,
    );
    let reply = api.start_vm("lab");
    assert_eq!(reply.status, 502, "{reply:?}");
    assert!(reply.error().contains("not the pinned 00:00:"), "{reply:?}");
}

#[test]
fn stop_is_a_shutdown_that_proxmox_forces_after_the_task_timeout() {
    let net = loopback_net();
    let pve = Pve::start(guests(&net));
    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", pve.fingerprint),
        TOKEN_SECRET,
    );
    assert_eq!(api.stop_vm("up", &format!("{net}.11")).status, 202);
    pve.wait_for_action("shutdown", 101);
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    let again = api.stop_vm("up", &format!("{net}.11"));
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(pve.actions("shutdown", 101), 1);
}

#[test]
fn suspend_to_ram_and_to_disk_then_resume() {
    let net = loopback_net();
    let pve = Pve::start(guests(&net));
    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", pve.fingerprint),
        TOKEN_SECRET,
    );
    // To RAM: status/suspend, which pauses QEMU (qmpstatus "paused"); status/resume continues it.
    let ram = format!("{net}.14");
    assert_eq!(api.stop_vm("ram", &ram).stop_status(), (202, "suspending"));
    pve.wait_for_action("suspend", 104);
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: suspended"));
    assert_eq!(api.stop_vm("ram", &ram).stop_status(), (200, "suspended"));
    let resumed = api.start_vm("ram");
    assert_eq!((resumed.vm_ip(), resumed.how()), (ram.as_str(), "resumed"));
    pve.wait_for_action("resume", 104);
    assert_eq!(pve.actions("start", 104), 0);

    // To disk: todisk=1 stops the VM locked "suspended"; a start restores it.
    let disk = format!("{net}.15");
    assert_eq!(
        api.stop_vm("disk", &disk).stop_status(),
        (202, "suspending")
    );
    pve.wait_for_action("hibernate", 105);
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: hibernated"));
    assert_eq!(api.stop_vm("disk", &disk).stop_status(), (200, "suspended"));
    let resumed = api.start_vm("disk");
    assert_eq!((resumed.vm_ip(), resumed.how()), (disk.as_str(), "resumed"));
    pve.wait_for_action("start", 105);
    assert_eq!(pve.actions("resume", 105), 0);
    assert_eq!(api.start_vm("disk").how(), "running");
}

#[test]
fn a_failed_restore_is_reported_in_proxmox_words() {
    let pve = Pve::start(guests(&loopback_net()));
    let api = companion(
        &pve,
        &format!("fingerprint = \"{}\"", pve.fingerprint),
        TOKEN_SECRET,
    );
    let broken = api.start_vm("broken");
    assert_eq!(
        (broken.status, broken.error()),
        (
            409,
            "resuming 106: unable to restore VM 106 - QEMU exited with code 1"
        )
    );
    pve.wait_for_action("start", 106);
}
