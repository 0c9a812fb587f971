//! Faults, each with the bound docs/configuration.md documents for it ("Every wait, and what bounds it"), what the user
//! reads when still there, the summary record, and nothing left running: the VM vanishing, resetting, never
//! speaking or speaking garbage; the client vanishing without a FIN while its VM boots or while it is relayed,
//! or no longer reading; a start API that trickles, floods, or answers nonsense.
//!
//! Vanishing peers live in network namespaces of the test's own (testkit/src/netns.rs), whose link goes down
//! or whose packets are dropped, so that no FIN or RST ever arrives. The tests that wait out the relay's
//! keep-alive (minutes, by design) are `#[ignore]`d, under `long::`: `cargo test --test faults -- --ignored
//! long::` runs them, and CI does, many at once (they only wait).

use testkit as common;
use testkit::both_modes;

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
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
    netns::{Netns, NsVm, ssh_in, tcp_connections_to},
    proxy::{Mode, Proxy, ProxyBuilder, binary},
    ssh::{Session, refused_login, spawn_login, ssh},
    vm::Vm,
};

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
/// window left unacknowledged (`TCP_USER_TIMEOUT`): src/relay/mod.rs.
const VM_SIDE_BOUND: Duration = Duration::from_secs(120);
/// The daemon's client side (src/mode/daemon/admission.rs), as the socket unit's: 120 s idle, 4 probes 30 s apart.
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

mod api;
mod client;
mod fixtures;
mod vm;

use client::{client_stops_reading, client_vanishes_while_relaying};
use fixtures::*;
use vm::vm_vanishes_mid_session;

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
        if args.first() == Some(&binary().as_bytes())
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
