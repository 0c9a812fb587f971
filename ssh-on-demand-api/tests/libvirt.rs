//! The libvirt backend against libvirt's own test driver (`test:///…/node.xml`): an in-process fake
//! hypervisor from the libvirt library itself. Its network hands out DHCP addresses from a 127.x.y.0/24
//! range, so every address the companion answers is a loopback address.
#![cfg(feature = "libvirt")]

use testkit as common;

use std::thread;

use common::{PATIENCE, api_server::Companion, loopback_net};

/// `dev` is shut off on a network whose DHCP range is loopback; `bare` has no interface; `held` is paused.
fn node(net: &str) -> String {
    format!(
        r#"<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>dev</name><memory>1048576</memory><os><type>hvm</type></os>
    <devices><interface type='network'><mac address='52:54:00:00:00:01'/><source network='lab'/></interface></devices>
    <test:runstate>5</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>held</name><memory>1048576</memory><os><type>hvm</type></os>
    <devices><interface type='network'><mac address='52:54:00:00:00:02'/><source network='lab'/></interface></devices>
    <test:runstate>3</test:runstate>
  </domain>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>bare</name><memory>1048576</memory><os><type>hvm</type></os>
    <test:runstate>5</test:runstate>
  </domain>
  <network>
    <name>lab</name><bridge name='virbr9'/>
    <ip address='{net}.1' netmask='255.255.255.0'><dhcp><range start='{net}.2' end='{net}.254'/></dhcp></ip>
  </network>
</node>"#
    )
}

fn companion(net: &str) -> Companion {
    companion_with(net, "")
}

/// The same, with `lab` taking `lab_extra` (e.g. a stop_mode).
fn companion_with(net: &str, lab_extra: &str) -> Companion {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("node.xml");
    std::fs::write(&xml, node(net)).unwrap();
    let config = format!(
        "address_timeout = \"1s\"\nstop_timeout = \"5s\"\n\
         [backends.host]\ntype = \"libvirt\"\nuri = \"test://{}\"\naddress_sources = [\"lease\", \"agent\"]\n\
         [profiles.lab]\nbackend = \"host\"\nvm = \"dev\"\n{lab_extra}\n\
         [profiles.bare]\nbackend = \"host\"\nvm = \"bare\"\n\
         [profiles.held]\nbackend = \"host\"\nvm = \"held\"\n\
         [profiles.ghost]\nbackend = \"host\"\nvm = \"nosuch\"\n",
        xml.display()
    );
    let api = Companion::start(&config, &[]);
    // The companion opens the connection on first use; the file must live until then, and longer is harmless.
    std::mem::forget(dir);
    api
}

#[test]
fn start_boots_the_domain_once_and_answers_its_lease_address() {
    let net = loopback_net();
    let api = companion(&net);
    let replies: Vec<_> = thread::scope(|s| {
        let asks: Vec<_> = (0..4).map(|_| s.spawn(|| api.start_vm("lab"))).collect();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    let ip = replies[0].vm_ip().to_owned();
    assert!(
        ip.starts_with(&format!("{net}.")),
        "{ip} is not from the lab network's range"
    );
    for reply in &replies {
        assert_eq!(reply.vm_ip(), ip);
    }
    assert_eq!(api.count("vms::start: dev: starting"), 1);

    // Running now: the address at once, no second start.
    assert_eq!(api.start_vm("lab").vm_ip(), ip);
    assert!(api.count("already running") >= 1);
    assert_eq!(api.count("vms::start: dev: starting"), 1);
}

#[test]
fn platform_errors_are_libvirts_own_words() {
    let api = companion(&loopback_net());
    let ghost = api.start_vm("ghost");
    assert_eq!(ghost.status, 409, "{ghost:?}");
    // The test driver says less than the QEMU driver ("…: no domain with matching name 'nosuch'").
    assert_eq!(ghost.error(), "domain 'nosuch': Domain not found");

    let bare = api.start_vm("bare");
    assert_eq!(bare.status, 504, "{bare:?}");
    assert!(
        bare.error().starts_with(
            "no address for bare within 1s: lease: no address yet; agent: no address yet"
        ),
        "{bare:?}"
    );
}

#[test]
fn stop_shuts_the_domain_down_and_the_next_start_boots_it_again() {
    let api = companion(&loopback_net());
    let ip = api.start_vm("lab").vm_ip().to_owned();
    assert_eq!(api.stop_vm("lab", &ip).status, 202);
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    let again = api.stop_vm("lab", &ip);
    assert_eq!(
        (again.status, again.body["status"].as_str()),
        (200, Some("off"))
    );
    api.start_vm("lab").vm_ip();
    assert_eq!(api.count("vms::start: dev: starting"), 2);
}

#[test]
fn suspend_is_a_managed_save_that_the_next_start_restores_at_a_new_address() {
    let net = loopback_net();
    let api = companion_with(&net, "stop_mode = \"suspend\"");
    let booted = api.start_vm("lab");
    assert_eq!(booted.how(), "booted");
    let before = booted.vm_ip().to_owned();

    // libvirt's managed save returns once the state is saved: the proxy hears first.
    assert_eq!(
        api.stop_vm("lab", &before).stop_status(),
        (202, "suspending")
    );
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: suspended"));
    assert_eq!(
        api.stop_vm("lab", &before).stop_status(),
        (200, "suspended")
    );

    let resumed = api.start_vm("lab");
    assert_eq!(resumed.how(), "resumed");
    // The test driver leases another address to each run of a domain (its id grows), so the restored
    // domain's address is found again rather than remembered.
    let after = resumed.vm_ip();
    assert!(after.starts_with(&format!("{net}.")), "{after}");
    assert_ne!(after, before, "the address was not looked up again");
    api.log
        .wait_for(PATIENCE, |l| l.contains("vms::start: dev: resuming"));
    assert_eq!(api.count("vms::start: dev: starting"), 1);

    // A paused domain keeps its state in the host's memory: a start continues it.
    let held = api.start_vm("held");
    assert_eq!(held.how(), "resumed");
    assert_eq!(api.start_vm("held").how(), "running");
}
