//! Faults, each with the bound docs/configuration.md documents for it ("Every wait, and what bounds it"), what the user
//! reads when still there, the summary record, and nothing left running: the VM vanishing, resetting, never
//! speaking or speaking garbage; the client vanishing without a FIN while its VM boots or while it is relayed,
//! or no longer reading; a start API that trickles, floods, or answers nonsense.
//!
//! Vanishing peers live in network namespaces of the test's own (tests/common/netns.rs), whose link goes down
//! or whose packets are dropped, so that no FIN or RST ever arrives. The tests that wait out the relay's
//! keep-alive (minutes, by design) are `#[ignore]`d, under `long::`: `cargo test --test faults -- --ignored
//! long::` runs them, and CI does, many at once (they only wait).

#[macro_use]
mod common;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::StartApi,
    log::Log,
    netns::{Netns, NsVm, ssh_in, tcp_connections_to},
    proxy::{BINARY, Mode, Proxy, ProxyBuilder},
    ssh::{run, ssh},
    vm::Vm,
};
use wait_timeout::ChildExt;

/// Over a bound: process start-up, scheduling. Bounds are seconds to minutes; this only has to tell "ended by
/// the bound" from "not bounded".
const SLACK: Duration = Duration::from_secs(3);

/// The most a kernel-timed bound may overrun: [`SLACK`], plus an eighth of it for the kernel's timer wheel, which
/// fires a timer minutes away up to 4 s late, and each keep-alive probe's timer up to half a second late.
fn over(bound: Duration) -> Duration {
    bound + SLACK + bound / 8
}

/// `wire::LINGER`: after telling the client why, the proxy waits this long for it to hang up.
const LINGER: Duration = Duration::from_secs(2);
/// The VM's side of the relay: keep-alive after 60 s idle, 6 probes 10 s apart, and as long for data or a
/// window left unacknowledged (`TCP_USER_TIMEOUT`): src/relay.rs.
const VM_SIDE_BOUND: Duration = Duration::from_secs(120);
/// The daemon's client side (src/mode/daemon.rs), as the socket unit's: 120 s idle, 4 probes 30 s apart.
const DAEMON_CLIENT_SIDE_BOUND: Duration = Duration::from_secs(240);
/// A socket unit's keep-alive for the per-connection tests, short to keep them short: 2 s idle, 3 probes 1 s
/// apart. The relay must keep it (and bound unacknowledged data by it), not put its own in its place.
const SHORT_KEEPALIVE: (Duration, Duration, u32) =
    (Duration::from_secs(2), Duration::from_secs(1), 3);
const SHORT_KEEPALIVE_BOUND: Duration = Duration::from_secs(5);

/// The proxy's client side, as this test sets it up: `SHORT_KEEPALIVE` on the per-connection listener, the
/// daemon's own otherwise.
fn client_side_bound(mode: Mode) -> Duration {
    match mode {
        Mode::Activated => SHORT_KEEPALIVE_BOUND,
        Mode::Daemon => DAEMON_CLIENT_SIDE_BOUND,
    }
}

/// `both_modes!` for tests that are `#[ignore]`d with `reason` (`both_modes!` puts attributes on its module,
/// where `#[ignore]` does nothing).
macro_rules! ignored_in_both_modes {
    ($reason:literal, $(#[$attr:meta])* fn $name:ident($mode:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn case($mode: Mode) $body

            #[test]
            #[ignore = $reason]
            fn activated() {
                case(Mode::Activated)
            }

            #[test]
            #[ignore = $reason]
            fn daemon() {
                case(Mode::Daemon)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------------------
// The VM

// The tests whose VM is never ready guard against a spin these tests found in src/vm/readiness.rs (fixed in
// 3c807ad): past the deadline, with no connection waiting for a banner, its loop picked an attempt timer that was
// long due over the deadline's, again and again, at 100 % CPU, and never refused.

both_modes! {
    /// Accepts, then never sends a byte: each connection gets `vm_banner_timeout`, new attempts follow, and at
    /// `boot_timeout` the user is told.
    fn vm_that_accepts_and_never_speaks(mode) {
        let vm = FakeVm::start(Behaviour::Silent);
        let api = StartApi::serve({
            let addr = vm.addr();
            move |_| common::api::Answer::text(addr.to_string())
        });
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--boot-timeout", "4s", "--vm-banner-timeout", "1s"])
            .start();
        let (seen, took) = refused_login(&proxy);
        assert!(
            seen.contains(&format!(
                "VM did not answer within 4 s (start API said {}; last try: TCP connected, but no SSH identification came)",
                vm.addr()
            )),
            "{seen}"
        );
        assert_between(took, Duration::from_secs(4), Duration::from_secs(4) + SLACK);
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "vm_not_ready");
        assert!(summary.contains("no SSH identification came"), "{summary}");
        assert!(vm.accepted() >= 3, "one attempt per banner timeout: {}", vm.accepted());
        nothing_left(&proxy, 1, &[]);
        vm.assert_all_closed();
    }
}

both_modes! {
    /// The VM's network drops every packet before the session (a VM that is gone, its address still routed):
    /// each connect attempt gets `vm_connect_timeout`, and at `boot_timeout` the user is told.
    fn vm_that_drops_every_packet(mode) {
        let vm = NsVm::start();
        vm.ns.drop_everything();
        let api = StartApi::serve({
            let ip = vm.addr().ip().to_string();
            move |_| common::api::Answer::json(serde_json::json!({ "vm_ip": ip }))
        });
        let proxy = in_namespaces(Proxy::builder_in(mode, &api.url()))
            .args(["--boot-timeout", "3s"])
            .start();
        let (seen, took) = refused_login(&proxy);
        assert!(
            seen.contains(&format!(
                "VM did not answer within 3 s (start API said {}; last try: no TCP answer)",
                vm.addr()
            )),
            "{seen}"
        );
        assert_between(took, Duration::from_secs(3), Duration::from_secs(3) + SLACK);
        assert_field(&proxy.wait_for_summary(1), "outcome", "vm_not_ready");
        nothing_left(&proxy, 1, &[vm.addr()]);
    }
}

both_modes! {
    /// 20 KiB of bytes that are no SSH identification: past 16 KiB the connection is given up, the next
    /// attempt gets the same, and at `boot_timeout` the user is told.
    fn vm_that_sends_garbage_instead_of_its_identification(mode) {
        let garbage: Vec<u8> = (0..20 * 1024).map(|i| b"\x00\xff garbage\r\n"[i % 12]).collect();
        let vm = FakeVm::start(Behaviour::Sends(garbage));
        let api = StartApi::serve({
            let addr = vm.addr();
            move |_| common::api::Answer::text(addr.to_string())
        });
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--boot-timeout", "3s"])
            .start();
        let (seen, took) = refused_login(&proxy);
        // The attempt the deadline cut short may be the last one ("no SSH identification came").
        assert!(
            seen.contains("last try: TCP connected, but what came back is not SSH)")
                || seen.contains("last try: TCP connected, but no SSH identification came)"),
            "{seen}"
        );
        assert_between(took, Duration::from_secs(3), Duration::from_secs(3) + SLACK);
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "vm_not_ready");
        assert!(vm.accepted() >= 2, "{}", vm.accepted());
        nothing_left(&proxy, 1, &[]);
        vm.assert_all_closed();
    }
}

both_modes! {
    /// An HTTP server where sshd should be: it answers, then closes.
    fn vm_that_answers_http_and_closes(mode) {
        let vm = FakeVm::start(Behaviour::SendsThenCloses(
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ));
        let api = StartApi::serve({
            let addr = vm.addr();
            move |_| common::api::Answer::text(addr.to_string())
        });
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--boot-timeout", "2s"])
            .start();
        let (seen, took) = refused_login(&proxy);
        // The attempt the deadline cut short may be the last one ("no SSH identification came").
        assert!(
            seen.contains("last try: TCP connected, then closed before any SSH identification)")
                || seen.contains("last try: TCP connected, but no SSH identification came)"),
            "{seen}"
        );
        assert_between(took, Duration::from_secs(2), Duration::from_secs(2) + SLACK);
        assert_field(&proxy.wait_for_summary(1), "outcome", "vm_not_ready");
        nothing_left(&proxy, 1, &[]);
        vm.assert_all_closed();
    }
}

both_modes! {
    /// The VM's TCP stack aborts the session's connection (a reboot, a crashed guest): the reset reaches the
    /// proxy, which ends the relay at once and closes the client's connection.
    fn vm_that_resets_mid_session(mode) {
        let vm = NsVm::start();
        let api = StartApi::serve({
            let ip = vm.addr().ip().to_string();
            move |_| common::api::Answer::json(serde_json::json!({ "vm_ip": ip }))
        });
        let proxy = in_namespaces(Proxy::builder_in(mode, &api.url())).start();
        let mut login = Login::open(ssh(proxy.addr, &vm.client_key()));
        vm.ns.reset_connections(vm.addr().port());
        let reset = Instant::now();
        let seen = login.wait_ended(SLACK).expect("ssh still runs after the VM reset its connection");
        assert!(reset.elapsed() < Duration::from_secs(1), "{:?}", reset.elapsed());
        assert!(seen.contains("closed by remote host"), "{seen}");
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "relayed");
        assert!(summary.contains("relay ended: the VM's connection failed: Connection reset by peer"), "{summary}");
        assert_field(&summary, "relay_failed", "vm");
        nothing_left(&proxy, 1, &[vm.addr()]);
    }
}

/// Ends the VM's network mid-session without a word (`how`), and checks that the relay ends within the VM
/// side's keep-alive bound, closing the client's connection.
fn vm_vanishes_mid_session(mode: Mode, how: fn(&Netns)) {
    let vm = NsVm::start();
    let api = StartApi::serve({
        let ip = vm.addr().ip().to_string();
        move |_| common::api::Answer::json(serde_json::json!({ "vm_ip": ip }))
    });
    let proxy = in_namespaces(Proxy::builder_in(mode, &api.url())).start();
    let mut login = Login::open(ssh(proxy.addr, &vm.client_key()));
    how(&vm.ns);
    let vanished = Instant::now();
    let seen = login
        .wait_ended(over(VM_SIDE_BOUND))
        .expect("ssh still runs after the VM side's bound");
    assert_between(
        vanished.elapsed(),
        VM_SIDE_BOUND - Duration::from_secs(10),
        over(VM_SIDE_BOUND),
    );
    assert!(seen.contains("closed by remote host"), "{seen}");
    let summary = proxy.wait_for_summary(1);
    assert_field(&summary, "outcome", "relayed");
    assert!(
        summary.contains("relay ended: the VM's connection failed: Connection timed out"),
        "{summary}"
    );
    nothing_left(&proxy, 1, &[vm.addr()]);
}

// ---------------------------------------------------------------------------------------------------------
// The client

both_modes! {
    /// The client's link goes down while its VM does not come up, so its FIN never arrives: the proxy keeps
    /// waiting for the VM until `boot_timeout`, tells a client that is no longer there, and gives up on it
    /// after the linger.
    fn client_that_vanishes_while_the_vm_boots(mode) {
        let client_ns = Netns::new();
        let vm = Vm::new(); // never boots
        let api = StartApi::pointing_at(&vm);
        let listener = client_ns.listener_for_clients(Some(SHORT_KEEPALIVE));
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--boot-timeout", "4s"])
            .listener(listener, None)
            .start();
        let mut client = ssh_in(&client_ns, addr, &vm.client_key())
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        api.wait_for_requests(1, PATIENCE);
        let asked = Instant::now();
        client_ns.link_down();
        client.kill().unwrap();
        client.wait().unwrap();
        let summary = proxy
            .try_wait_for_summary(1, Duration::from_secs(4) + LINGER + SLACK)
            .expect("no summary within boot_timeout and the linger");
        assert!(asked.elapsed() >= Duration::from_secs(3), "{:?}", asked.elapsed());
        assert_field(&summary, "outcome", "vm_not_ready");
        assert!(summary.contains("VM did not answer within 4 s"), "{summary}");
        nothing_left(&proxy, 1, &[]);
    }
}

/// The client's link goes down mid-session, so neither its FIN nor anything else arrives: the proxy's client
/// side gives up within its keep-alive bound, and the relay ends, closing the VM's connection too.
fn client_vanishes_while_relaying(mode: Mode) {
    let client_ns = Netns::new();
    let vm = Vm::new();
    vm.start();
    let api = StartApi::pointing_at(&vm);
    let listener = client_ns.listener_for_clients(Some(SHORT_KEEPALIVE));
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::builder_in(mode, &api.url())
        .listener(listener, None)
        .start();
    let login = Login::open(ssh_in(&client_ns, addr, &vm.client_key()));
    client_ns.link_down();
    let vanished = Instant::now();
    drop(login); // killed; its FIN is lost with the link
    let bound = client_side_bound(mode);
    let summary = proxy
        .try_wait_for_summary(1, over(bound))
        .unwrap_or_else(|| {
            panic!(
                "the relay still runs {:?} after its client vanished",
                over(bound)
            )
        });
    assert_between(
        vanished.elapsed(),
        bound - Duration::from_secs(1),
        over(bound),
    );
    assert_field(&summary, "outcome", "relayed");
    assert!(
        summary.contains("relay ended: the client's connection failed: Connection timed out"),
        "{summary}"
    );
    nothing_left(&proxy, 1, &[vm.addr()]);
}

/// The per-connection listener's keep-alive (`SHORT_KEEPALIVE`, as a socket unit's) decides: 5 s.
#[test]
fn client_that_vanishes_while_relaying_is_dropped_by_the_socket_units_keepalive() {
    client_vanishes_while_relaying(Mode::Activated);
}

/// The client stays connected but stops reading while its VM sends: the client side's window stays shut with
/// data waiting, where keep-alive never probes. `TCP_USER_TIMEOUT`, as long as the client side's keep-alive,
/// ends the relay.
fn client_stops_reading(mode: Mode) {
    let vm = FakeVm::start(Behaviour::Floods);
    let api = StartApi::serve({
        let addr = vm.addr();
        move |_| common::api::Answer::text(addr.to_string())
    });
    let listener = keepalive_listener(SHORT_KEEPALIVE);
    let port = listener.local_addr().unwrap().port();
    let proxy = Proxy::builder_in(mode, &api.url())
        .listener(listener, None)
        .start();
    let mut client = RawClient::connect(SocketAddr::from(([127, 0, 0, 1], port)));
    client.read_identification();
    // From here on the client reads nothing: its receive buffer, then the proxy's send buffer, fill up.
    let stopped = Instant::now();
    let bound = client_side_bound(mode);
    let summary = proxy
        .try_wait_for_summary(1, over(bound))
        .unwrap_or_else(|| {
            panic!(
                "the relay still runs {:?} after its client stopped reading",
                over(bound)
            )
        });
    assert_between(
        stopped.elapsed(),
        bound - Duration::from_secs(1),
        over(bound),
    );
    assert_field(&summary, "outcome", "relayed");
    assert!(
        summary.contains("relay ended: the client's connection failed: Connection timed out"),
        "{summary}"
    );
    assert!(vm.written() > 1 << 20, "the VM sent {} bytes", vm.written());
    nothing_left(&proxy, 1, &[]);
    vm.assert_all_closed();
    drop(client);
}

#[test]
fn client_that_stops_reading_is_dropped_after_the_socket_units_keepalive_time() {
    client_stops_reading(Mode::Activated);
}

// ---------------------------------------------------------------------------------------------------------
// Waits of minutes: the relay's keep-alive and user timeouts, as documented. All `#[ignore]`d, all under
// `long::`: `cargo test --test faults -- --ignored long::` runs them, best many at once (they only wait).

mod long {
    use super::*;

    ignored_in_both_modes! {
        "waits out the VM side's keep-alive (2 min); cargo test --test faults -- --ignored long::",
        /// Every packet to and from the VM is dropped (a destroyed VM, a partition): no FIN, no RST.
        fn vm_that_vanishes_mid_session_dropping_everything(mode) {
            vm_vanishes_mid_session(mode, Netns::drop_everything);
        }
    }

    ignored_in_both_modes! {
        "waits out the VM side's keep-alive (2 min); cargo test --test faults -- --ignored long::",
        /// The VM's link goes down.
        fn vm_that_vanishes_mid_session_link_down(mode) {
            vm_vanishes_mid_session(mode, Netns::link_down);
        }
    }

    ignored_in_both_modes! {
        "waits out the VM side's user timeout (2 min); cargo test --test faults -- --ignored long::",
        /// The VM stops reading while the client sends: its window stays shut with data waiting, where keep-alive
        /// never probes. The VM side's `TCP_USER_TIMEOUT` ends the relay.
        fn vm_that_stops_reading(mode) {
            let vm = FakeVm::start(Behaviour::Deaf);
            let api = StartApi::serve({
                let addr = vm.addr();
                move |_| common::api::Answer::text(addr.to_string())
            });
            let proxy = Proxy::start_in(mode, &api.url());
            let mut client = RawClient::connect(proxy.addr);
            client.read_identification();
            let stuck = client.write_until_stuck();
            let ended = client.wait_closed(over(VM_SIDE_BOUND));
            assert_between(
                ended.duration_since(stuck),
                VM_SIDE_BOUND - Duration::from_secs(10),
                over(VM_SIDE_BOUND),
            );
            let summary = proxy.wait_for_summary(1);
            assert_field(&summary, "outcome", "relayed");
            assert!(summary.contains("relay ended: the VM's connection failed: Connection timed out"), "{summary}");
            nothing_left(&proxy, 1, &[]);
        }
    }

    /// The daemon's keep-alive decides: 120 s + 4 × 30 s.
    #[test]
    #[ignore = "waits out the daemon's client keep-alive (4 min); cargo test --test faults -- --ignored long::"]
    fn client_that_vanishes_while_relaying_is_dropped_by_the_daemons_keepalive() {
        client_vanishes_while_relaying(Mode::Daemon);
    }

    #[test]
    #[ignore = "waits out the daemon's client keep-alive time (4 min); cargo test --test faults -- --ignored long::"]
    fn client_that_stops_reading_is_dropped_after_the_daemons_keepalive_time() {
        client_stops_reading(Mode::Daemon);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The start API

both_modes! {
    /// Headers at once, then the body one byte a second: each request is cut at `api_timeout` and retried,
    /// until `boot_timeout`.
    fn api_that_trickles_its_body_one_byte_a_second(mode) {
        let api = RawApi::serve(ApiFault::Trickle(br#"{"vm_ip": "127.0.0.1"}"#.to_vec()));
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--api-timeout", "2s", "--boot-timeout", "5s"])
            .start();
        let (seen, took) = refused_login(&proxy);
        assert!(
            seen.contains("VM failed to start: the start API did not answer within 2 s"),
            "{seen}"
        );
        assert_between(took, Duration::from_secs(4), Duration::from_secs(5) + SLACK);
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "api_failed");
        assert!(api.requests() >= 2, "retried: {}", api.requests());
        nothing_left(&proxy, 1, &[]);
        api.assert_all_closed();
    }
}

both_modes! {
    /// 100 MiB, announced by Content-Length: refused from the headers.
    fn api_that_sends_100_mib_with_a_length(mode) {
        api_sends_100_mib(mode, true);
    }

    /// 100 MiB without a length (the end of the body is the end of the connection): refused past 64 KiB.
    fn api_that_sends_100_mib_without_a_length(mode) {
        api_sends_100_mib(mode, false);
    }
}

fn api_sends_100_mib(mode: Mode, with_length: bool) {
    const SIZE: u64 = 100 << 20;
    let api = RawApi::serve(ApiFault::Huge {
        size: SIZE,
        with_length,
    });
    let proxy = Proxy::start_in(mode, &api.url());
    let (seen, took) = refused_login(&proxy);
    assert!(
        seen.contains("VM failed to start: the start API's answer is larger than 64 KiB"),
        "{seen}"
    );
    assert!(took < SLACK, "{took:?}");
    let summary = proxy.wait_for_summary(1);
    assert_field(&summary, "outcome", "api_failed");
    assert_eq!(api.requests(), 1, "too large is final");
    api.assert_all_closed();
    assert!(
        api.written() < 16 << 20,
        "the proxy read on: the API got {} bytes out",
        api.written()
    );
    nothing_left(&proxy, 1, &[]);
}

both_modes! {
    /// Bytes that are not UTF-8, in an answer and in a refusal.
    fn api_that_answers_invalid_utf8(mode) {
        let api = RawApi::serve(ApiFault::Replies(vec![
            (200, b"\xff\xfe127.0.0.1\xc0".to_vec()),
            (403, b"quota \xff exceeded".to_vec()),
        ]));
        let proxy = Proxy::start_in(mode, &api.url());
        let (seen, _) = refused_login(&proxy);
        assert!(
            seen.contains("VM failed to start: the start API's answer is unusable: it is not text"),
            "{seen}"
        );
        let (seen, _) = refused_login(&proxy);
        assert!(seen.contains("VM failed to start: the start API answered 403 Forbidden"), "{seen}");
        for n in [1, 2] {
            assert_field(&proxy.wait_for_summary(n), "outcome", "api_failed");
        }
        nothing_left(&proxy, 2, &[]);
    }
}

both_modes! {
    /// `{"vm_ip": 167772162}`: an address as a number (10.0.0.2), which the contract does not allow.
    fn api_that_answers_vm_ip_as_a_number(mode) {
        let api = RawApi::serve(ApiFault::Replies(vec![(
            200,
            br#"{"vm_ip": 167772162}"#.to_vec(),
        )]));
        let proxy = Proxy::start_in(mode, &api.url());
        let (seen, took) = refused_login(&proxy);
        let expected = r#"VM failed to start: the start API's answer is unusable: vm_ip is a number 167772162, not a string such as "192.168.0.57""#;
        assert!(seen.contains(expected), "{seen}");
        assert!(took < SLACK, "{took:?}");
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "api_failed");
        assert!(summary.contains("vm_ip is a number 167772162"), "{summary}");
        nothing_left(&proxy, 1, &[]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The configuration

/// Found by the config fuzz target (fuzz/fuzz_targets/config.rs, "no deadline can be set that far"): durations
/// parse up to 584 billion years, and check-config accepts them, but sessions add them to the clock, which
/// holds some 292 billion years: with `boot_timeout = "300000000000years"` every connection panics at
/// src/session.rs (`Instant::now() + profile.boot_timeout`; src/vm/readiness.rs does the same with
/// vm_connect_timeout and vm_banner_timeout), so the user is closed on without a word and no summary is written;
/// and src/vm/lifecycle.rs's `millis()` (`as_millis() as u64`) wraps an idle_timeout past 584 million years
/// into a short one, which stops a VM at once. So configuration refuses durations past 10 years.
#[test]
fn durations_no_deadline_can_reach_are_refused() {
    for (setting, extra) in [
        ("boot-timeout", None),
        ("vm-connect-timeout", None),
        ("vm-banner-timeout", None),
        ("idle-timeout", Some("--stop-url=http://127.0.0.1:9/stop")),
        ("stop-timeout", Some("--stop-url=http://127.0.0.1:9/stop")),
    ] {
        let output = Command::new(BINARY)
            .args([
                "check-config",
                "--config=/dev/null",
                "--api-url=http://127.0.0.1:9/start",
            ])
            .args(extra)
            .arg(format!("--{setting}=300000000000years"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{setting}: {said}");
        assert!(
            said.contains(&setting.replace('-', "_")),
            "{setting}: {said}"
        );
    }
}

// ---------------------------------------------------------------------------------------------------------
// Helpers

/// Lets the proxy connect to VMs in the tests' namespaces (10.199.0.0/16, which no default allows).
fn in_namespaces(builder: ProxyBuilder) -> ProxyBuilder {
    builder.arg("--vm-network=10.199.0.0/16")
}

/// A loopback listener whose connections inherit `keepalive`, as a socket unit's do.
fn keepalive_listener((idle, interval, probes): (Duration, Duration, u32)) -> TcpListener {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(interval)
        .with_retries(probes);
    socket.set_tcp_keepalive(&keepalive).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    socket.listen(128).unwrap();
    socket.into()
}

fn assert_between(took: Duration, at_least: Duration, at_most: Duration) {
    assert!(
        took >= at_least && took <= at_most,
        "took {took:?}, expected {at_least:?} to {at_most:?}"
    );
}

/// The summary record's `name` field is `value` (`name="value"` in the stderr format).
fn assert_field(summary: &str, name: &str, value: &str) {
    assert!(
        summary.contains(&format!("{name}=\"{value}\"")),
        "expected {name}={value:?} in {summary}"
    );
}

/// A login that the proxy must refuse: what the user read, and how long it took from ssh's start.
fn refused_login(proxy: &Proxy) -> (String, Duration) {
    let key = key();
    let started = Instant::now();
    let output = run(ssh(proxy.addr, &key).arg("true"), PATIENCE);
    let took = started.elapsed();
    let seen = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(255), "{seen}");
    assert!(seen.contains("Received disconnect from"), "{seen}");
    (seen, took)
}

/// A key for logins that never get as far as authenticating.
fn key() -> PathBuf {
    static KEY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let status = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        (dir, path)
    });
    path.clone()
}

/// Checks that the proxy has nothing left of its `connections` finished connections: no per-connection
/// process, no session in the state directory, no connection to `vms` still open.
fn nothing_left(proxy: &Proxy, connections: usize, vms: &[SocketAddr]) {
    if proxy.mode == Mode::Activated {
        // systemd-socket-activate reports each instance's exit.
        proxy.log.wait_until(PATIENCE, |lines| {
            (lines
                .iter()
                .filter(|l| l.contains(" died with code "))
                .count()
                >= connections)
                .then_some(())
        });
        let instances = instances(proxy);
        assert!(
            instances.is_empty(),
            "instances still running: {instances:?}"
        );
    }
    let status = proxy.status();
    let sessions: usize = status["vms"].as_array().map_or(0, |vms| {
        vms.iter()
            .map(|vm| vm["sessions"].as_array().map_or(0, Vec::len))
            .sum()
    });
    assert_eq!(sessions, 0, "sessions left in the state: {status}");
    for vm in vms {
        wait_until("the relay's connection to the VM to close", || {
            tcp_connections_to(*vm).is_empty()
        });
    }
}

/// The per-connection processes of `proxy` (its state directory is on their command line).
fn instances(proxy: &Proxy) -> Vec<u32> {
    let state_dir = format!("--state-dir={}", proxy.state_dir.display());
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        if args.first() == Some(&BINARY.as_bytes())
            && args.contains(&state_dir.as_bytes())
            && !args.contains(&b"daemon".as_slice())
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `done` until it holds; panics after PATIENCE. For kernel state, which nothing announces.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < PATIENCE,
            "waited {PATIENCE:?} for {what}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// An ssh login that stays open until the other side ends it: its shell says "ready", then reads its stdin,
/// which stays open. Dropping it kills ssh.
struct Login {
    child: Child,
    _stdin: ChildStdin,
    stderr: Log,
}

impl Login {
    fn open(mut command: Command) -> Login {
        let mut child = command
            .arg("echo ready; exec cat >/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = Log::collect(child.stdout.take().unwrap(), "login");
        let stderr = Log::collect(child.stderr.take().unwrap(), "login stderr");
        stdout.wait_for(PATIENCE, |l| l == "ready");
        Login {
            _stdin: child.stdin.take().unwrap(),
            child,
            stderr,
        }
    }

    /// Waits up to `limit` for ssh to exit by the other side's doing; what it printed on stderr.
    fn wait_ended(&mut self, limit: Duration) -> Option<String> {
        let status = self.child.wait_timeout(limit).unwrap()?;
        assert_eq!(status.code(), Some(255), "ssh: {status}");
        // stderr is complete once ssh's pipe closed; ssh closed it when it exited.
        self.stderr.try_wait_until(PATIENCE, |_| None::<()>);
        Some(self.stderr.lines().join("\n"))
    }
}

impl Drop for Login {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client of raw bytes, to do what ssh never does: stop reading, or write into a relay that cannot take more.
struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        // Small buffers fill sooner.
        socket2::SockRef::from(&stream)
            .set_recv_buffer_size(4096)
            .unwrap();
        (&stream).write_all(b"SSH-2.0-faults_test\r\n").unwrap();
        RawClient { stream }
    }

    /// Reads the VM's identification line, relayed.
    fn read_identification(&mut self) {
        self.stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut reader = BufReader::new(&self.stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("SSH-2.0-"), "{line:?}");
    }

    /// Writes until nothing more goes in for a second: everything between here and the VM is full. Returns
    /// when that began.
    fn write_until_stuck(&mut self) -> Instant {
        self.stream.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut last_progress = Instant::now();
        loop {
            match self.stream.write(&chunk) {
                Ok(_) => last_progress = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if last_progress.elapsed() > Duration::from_secs(1) {
                        return last_progress;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("writing: {e}"),
            }
        }
    }

    /// Waits up to `limit` for the proxy to close or reset the connection; when it did.
    fn wait_closed(&mut self, limit: Duration) -> Instant {
        self.stream.set_nonblocking(false).unwrap();
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Instant::now(),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("the connection is still open after {limit:?}")
                }
                Err(_) => return Instant::now(),
            }
        }
    }
}

/// What a fake VM does with each connection.
#[derive(Clone)]
enum Behaviour {
    /// Accepts and never sends anything.
    Silent,
    /// Sends these bytes, then nothing more.
    Sends(Vec<u8>),
    /// Sends these bytes, then closes.
    SendsThenCloses(Vec<u8>),
    /// Sends an identification line, then bytes as fast as they are taken.
    Floods,
    /// Sends an identification line, then never reads.
    Deaf,
}

/// A TCP server on loopback that is no sshd.
struct FakeVm {
    server: HandServer,
    /// Connections kept open without a thread (`Deaf`), closed when the VM is dropped.
    held: Arc<Mutex<Vec<TcpStream>>>,
}

const FAKE_BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 fake\r\n";

impl FakeVm {
    fn start(behaviour: Behaviour) -> FakeVm {
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let server = HandServer::start({
            let held = held.clone();
            move |mut stream, _, tally| {
                match &behaviour {
                    Behaviour::Silent => drain(&mut stream),
                    Behaviour::Sends(bytes) => {
                        let _ = stream.write_all(bytes);
                        drain(&mut stream);
                    }
                    Behaviour::SendsThenCloses(bytes) => {
                        let _ = stream.write_all(bytes);
                        let _ = stream.shutdown(Shutdown::Write);
                        drain(&mut stream);
                    }
                    Behaviour::Floods => {
                        let _ = stream.write_all(FAKE_BANNER);
                        let chunk = vec![b'x'; 64 * 1024];
                        while !tally.stop.load(Ordering::SeqCst) {
                            match stream.write(&chunk) {
                                Ok(n) => {
                                    tally.written.fetch_add(n as u64, Ordering::SeqCst);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Behaviour::Deaf => {
                        let _ = stream.write_all(FAKE_BANNER);
                        held.lock().unwrap().push(stream);
                        return Held::Open;
                    }
                }
                Held::Closed
            }
        });
        FakeVm { server, held }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn accepted(&self) -> usize {
        self.server.tally.accepted.load(Ordering::SeqCst)
    }

    fn written(&self) -> u64 {
        self.server.tally.written.load(Ordering::SeqCst)
    }

    /// Every connection the proxy made was closed by it.
    fn assert_all_closed(&self) {
        self.server
            .assert_all_closed("the proxy to close every connection to the fake VM");
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.held.lock().unwrap().clear();
    }
}

/// What a server written by hand (FakeVm, RawApi) shares with its threads.
#[derive(Default)]
struct Tally {
    accepted: AtomicUsize,
    /// Connections accepted and not yet finished by their handler.
    open: AtomicUsize,
    written: AtomicU64,
    /// Set when the server is dropped: its loops end.
    stop: AtomicBool,
}

/// Whether a handler left its connection open (kept elsewhere) or finished with it.
enum Held {
    Open,
    Closed,
}

/// A listener on 127.0.0.1 whose every connection gets a thread running `serve` (with the connection's
/// number, from 0), until the server is dropped.
struct HandServer {
    addr: SocketAddr,
    tally: Arc<Tally>,
}

impl HandServer {
    fn start(
        serve: impl Fn(TcpStream, usize, &Tally) -> Held + Send + Sync + 'static,
    ) -> HandServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = HandServer {
            addr: listener.local_addr().unwrap(),
            tally: Arc::default(),
        };
        let tally = server.tally.clone();
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if tally.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let n = tally.accepted.fetch_add(1, Ordering::SeqCst);
                tally.open.fetch_add(1, Ordering::SeqCst);
                let (serve, tally) = (serve.clone(), tally.clone());
                thread::spawn(move || {
                    if let Held::Closed = serve(stream, n, &tally) {
                        tally.open.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        server
    }

    fn assert_all_closed(&self, what: &str) {
        wait_until(what, || self.tally.open.load(Ordering::SeqCst) == 0);
    }
}

impl Drop for HandServer {
    fn drop(&mut self) {
        self.tally.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop to see the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads until EOF or an error.
fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// What a raw start API does with each request.
enum ApiFault {
    /// 200, JSON, with its Content-Length, the body one byte a second.
    Trickle(Vec<u8>),
    /// 200, `size` bytes of text, with or without a Content-Length.
    Huge { size: u64, with_length: bool },
    /// One (status, body) per request, as text/plain, in order.
    Replies(Vec<(u16, Vec<u8>)>),
}

/// An HTTP/1.1 server written by hand, for answers no HTTP library would send.
struct RawApi {
    server: HandServer,
}

impl RawApi {
    fn serve(fault: ApiFault) -> RawApi {
        let server = HandServer::start(move |stream, n, tally| {
            answer(stream, &fault, n, &tally.written, &tally.stop);
            Held::Closed
        });
        RawApi { server }
    }

    fn url(&self) -> String {
        format!("http://{}/start", self.server.addr)
    }

    fn requests(&self) -> usize {
        self.server.tally.accepted.load(Ordering::SeqCst)
    }

    fn written(&self) -> u64 {
        self.server.tally.written.load(Ordering::SeqCst)
    }

    /// The proxy closed every connection it made to the API (the server's writes then fail).
    fn assert_all_closed(&self) {
        self.server
            .assert_all_closed("the proxy to close its connections to the API");
    }
}

fn answer(
    mut stream: TcpStream,
    fault: &ApiFault,
    n: usize,
    written: &AtomicU64,
    stop: &AtomicBool,
) {
    // The request: headers, then Content-Length bytes of body.
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut send = |bytes: &[u8]| -> bool {
        let ok = stream.write_all(bytes).is_ok();
        if ok {
            written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        }
        ok
    };
    match fault {
        ApiFault::Trickle(body) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if !send(head.as_bytes()) {
                return;
            }
            for byte in body {
                // The API's pace, not a synchronisation.
                thread::sleep(Duration::from_secs(1));
                if stop.load(Ordering::SeqCst) || !send(&[*byte]) {
                    return;
                }
            }
        }
        ApiFault::Huge { size, with_length } => {
            let length = if *with_length {
                format!("Content-Length: {size}\r\n")
            } else {
                String::new()
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{length}Connection: close\r\n\r\n"
            );
            if !send(head.as_bytes()) {
                return;
            }
            let chunk = vec![b'7'; 64 * 1024];
            let mut sent = 0;
            while sent < *size && !stop.load(Ordering::SeqCst) {
                if !send(&chunk) {
                    return;
                }
                sent += chunk.len() as u64;
            }
        }
        ApiFault::Replies(replies) => {
            let (status, body) = &replies[n.min(replies.len() - 1)];
            let reason = if *status == 200 { "OK" } else { "Forbidden" };
            let head = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = send(head.as_bytes()) && send(body);
        }
    }
    // Until the proxy closes its end.
    let _ = stream.shutdown(Shutdown::Write);
    drain(&mut stream);
}
