//! End to end through the real proxy and the companion start/stop API (ssh-on-demand-api): an ssh login to a
//! VM (a real sshd on a 127.x.y.z address) that the companion's backend "boots" on the platform, then the
//! idle stop, which the proxy asks of the companion and the companion of the platform. One test per
//! backend: command (a real script), EC2 (moto's server), Proxmox VE (fakepve) and libvirt (libvirt's own
//! test driver, whose lease address the test computes the way the driver does, and starts sshd there).

use testkit as common;

use std::{
    net::{Ipv4Addr, TcpStream},
    thread,
};

use common::{
    PATIENCE,
    companion::{self, Companion},
    proxy::Proxy,
    ssh::assert_echo,
    vm::{self, Vm},
};

/// The proxy using `api` for starts and stops, one VM per profile, stopping after 1 s idle. The companion's
/// profiles name the VMs' port (`port`, which it answers with the address), as they would name a VM's sshd
/// that is not on 22.
fn proxy(api: &Companion) -> Proxy {
    Proxy::builder(&api.start_url())
        .args([
            "--stop-url",
            &api.stop_url(),
            "--idle-timeout",
            "1s",
            "--profile",
            "lab",
        ])
        .arg(format!("--api-token-file={}", api.token_file.display()))
        .start()
}

/// Boots `vm` (starts its sshd) once `booted` says the platform was told to start it.
fn boot_when(vm: &Vm, booted: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    let vm = vm.clone();
    thread::spawn(move || {
        booted();
        vm.start();
    })
}

#[test]
fn command_backend_boots_the_vm_and_stops_it_when_idle() {
    let vm = Vm::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let start = dir.path().join("start");
    let stop = dir.path().join("stop");
    std::fs::write(
        &start,
        format!("#!/bin/sh\necho \"$1\" >> {d}/started\necho {}\n", vm.ip()),
    )
    .unwrap();
    std::fs::write(&stop, format!("#!/bin/sh\necho \"$1\" >> {d}/stopped\n")).unwrap();
    for script in [&start, &stop] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let api = Companion::start(
        &format!(
            "[backends.scripts]\ntype = \"command\"\nstart = [\"{}\", \"{{vm}}\"]\nstop = [\"{}\", \"{{vm}}\"]\n\
             [profiles.lab]\nbackend = \"scripts\"\nvm = \"dev\"\nport = {port}\n",
            start.display(),
            stop.display(),
            port = vm::port()
        ),
        &[],
    );
    let log = api.log.clone();
    let booting = boot_when(&vm, move || {
        log.wait_for(PATIENCE, |l| l.contains("start answered with the address"));
    });
    let proxy = proxy(&api);
    assert_echo(proxy.addr, &vm.client_key(), "hello");
    booting.join().unwrap();
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    assert_eq!(
        std::fs::read_to_string(dir.path().join("started")).unwrap(),
        "dev\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stopped")).unwrap(),
        "dev\n"
    );
}

#[test]
fn ec2_backend_starts_the_instance_and_stops_it_when_idle() {
    let vm = Vm::new();
    let moto = companion::moto(&vm.ip().to_string());
    let id = moto.ready["instances"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let credentials = format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
        moto.text("access_key_id"),
        moto.text("secret_access_key")
    );
    let api = Companion::start(
        &format!(
            "[backends.aws]\ntype = \"ec2\"\nregion = \"eu-central-1\"\nendpoint = \"{}\"\n\
             [profiles.lab]\nbackend = \"aws\"\nvm = \"{id}\"\nport = {port}\n",
            moto.text("endpoint"),
            port = vm::port()
        ),
        &[("aws-credentials", &credentials)],
    );
    let events = moto.events.clone();
    let needle = format!("\"event\": \"start\", \"id\": \"{id}\"");
    let booting = boot_when(&vm, move || {
        events.wait_for(PATIENCE, |l| l.contains(&needle));
    });
    let proxy = proxy(&api);
    assert_echo(proxy.addr, &vm.client_key(), "hello");
    booting.join().unwrap();
    moto.wait_for_event(&format!("\"event\": \"stop\", \"id\": \"{id}\""));
}

#[test]
fn proxmox_backend_starts_the_guest_and_stops_it_when_idle() {
    let vm = Vm::new();
    let (token_id, secret) = ("ssh@pve!companion", "5b0f2f0c-2f4e-4d8e-9d3a-0c6a1f0e7b11");
    let (pve, _pve_dir) = companion::fakepve(&vm.ip().to_string(), token_id, secret);
    let api = Companion::start(
        &format!(
            "[backends.pve]\ntype = \"proxmox\"\nurl = \"{}\"\nnode = \"pve1\"\ntoken_id = \"{token_id}\"\n\
             fingerprint = \"{}\"\n[profiles.lab]\nbackend = \"pve\"\nvm = \"100\"\nport = {port}\n",
            pve.text("url"),
            pve.text("fingerprint"),
            port = vm::port()
        ),
        &[("proxmox-token", secret)],
    );
    let events = pve.events.clone();
    let booting = boot_when(&vm, move || {
        events.wait_for(PATIENCE, |l| {
            l.contains("\"event\": \"start\", \"vmid\": 100")
        });
    });
    let proxy = proxy(&api);
    assert_echo(proxy.addr, &vm.client_key(), "hello");
    booting.join().unwrap();
    pve.wait_for_event("\"event\": \"shutdown\", \"vmid\": 100");
}

#[test]
fn libvirt_backend_starts_the_domain_and_stops_it_when_idle() {
    // libvirt's test driver (src/test/test_driver.c, testDomainInterfaceAddresses and
    // testDomainInterfaceAddressFromNet) answers a lease for each interface on a libvirt network: the start of
    // the network's first DHCP range + 20 × (domain id − 1) + interface index + 1. Domain ids count from 1 per
    // connection (testDriverNew), one per start (testDomainStartState); `dev` is the only domain, shut off,
    // so its first start makes it domain 1 and its one interface gets the range start + 1. The network is a
    // fresh 127.b.c.0/24 (b from 200 up, never one of Vm::new's).
    let (a, b, c, range_start) = (127, fastrand::u8(200..255), fastrand::u8(1..255), 10);
    let vm = Vm::at(Ipv4Addr::new(a, b, c, range_start + 1));
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("node.xml");
    std::fs::write(
        &xml,
        format!(
            r#"<node>
  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>dev</name><memory>1048576</memory><os><type>hvm</type></os>
    <devices><interface type='network'><mac address='52:54:00:00:00:01'/><source network='lab'/></interface></devices>
    <test:runstate>5</test:runstate>
  </domain>
  <network>
    <name>lab</name><bridge name='virbr9'/>
    <ip address='{a}.{b}.{c}.1' netmask='255.255.255.0'><dhcp><range start='{a}.{b}.{c}.{range_start}' end='{a}.{b}.{c}.254'/></dhcp></ip>
  </network>
</node>"#
        ),
    )
    .unwrap();
    let api = Companion::start(
        &format!(
            "stop_timeout = \"5s\"\n\
             [backends.host]\ntype = \"libvirt\"\nuri = \"test://{}\"\naddress_sources = [\"lease\"]\n\
             [profiles.lab]\nbackend = \"host\"\nvm = \"dev\"\nport = {port}\n",
            xml.display(),
            port = vm::port()
        ),
        &[],
    );
    let log = api.log.clone();
    let ip = vm.ip().to_string();
    let booting = boot_when(&vm, move || {
        let answered = log.wait_for(PATIENCE, |l| l.contains("start answered with the address"));
        assert!(
            answered.contains(&format!("ip={ip}")),
            "the test driver leased another address than {ip}: {answered}"
        );
    });
    // Nothing listens before the domain is started.
    assert!(TcpStream::connect(vm.addr()).is_err());
    let proxy = proxy(&api);
    assert_echo(proxy.addr, &vm.client_key(), "hello");
    booting.join().unwrap();
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    let starts = api.log.lines();
    let starts = starts
        .iter()
        .filter(|l| l.contains("starting VM=\"dev\" backend=\"libvirt\""));
    assert_eq!(starts.count(), 1, "one start of the domain");
    // The domain is shut off in the test driver: the companion says so from its state.
    let (status, body) = api.stop_vm("lab", &vm.ip().to_string());
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("off")),
        "{body}"
    );
}
