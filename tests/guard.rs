//! Port 22 is hostile ground: who may wake VMs. Real connections from several loopback source addresses
//! (127.0.0.x), in both modes: `client_networks`, the start budget per address, penalties for addresses
//! whose connections wake a VM and go no further, and what `status` and the journal say of them.

use testkit as common;
use testkit::both_modes;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    proxy::Proxy,
    ssh::{assert_echo, run, ssh},
    vm::Vm,
};
use socket2::{Domain, Socket, Type};

/// `ssh -b SOURCE … true`: its stderr, where the client prints a DISCONNECT's reason.
fn login_from(proxy: &Proxy, vm: &Vm, source: &str) -> String {
    let output = run(
        ssh(proxy.addr, &vm.client_key()).args(["-b", source, "true"]),
        PATIENCE,
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A connection from `source` that sends an SSH identification line, waits until the start API has the
/// start it caused (the `n`th), and hangs up: it woke the VM and went no further. Returns what the proxy
/// sent, if it refused instead.
fn wake_and_leave(proxy: &Proxy, api: &StartApi, source: &str, n: usize) -> Vec<u8> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: SocketAddr = format!("{source}:0").parse().unwrap();
    socket.bind(&from.into()).unwrap();
    socket.connect(&proxy.addr.into()).unwrap();
    let mut stream = TcpStream::from(socket);
    stream.write_all(b"SSH-2.0-waker\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut answer = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    // Either the proxy refuses (and closes), or the start reaches the API.
    while api.requests_to("/start").len() < n {
        match stream.read_to_end(&mut answer) {
            Ok(_) => return answer,
            Err(_) => assert!(Instant::now() < deadline, "neither a refusal nor a start"),
        }
    }
    answer
}

both_modes! {
    /// An address outside `client_networks` is told so, and never reaches the start API.
    fn addresses_outside_client_networks_are_refused(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, Duration::ZERO);
        let proxy = Proxy::builder_in(mode, &api.url())
            .arg("--client-network=127.0.0.2/32")
            .start();
        let seen = login_from(&proxy, &vm, "127.0.0.1");
        assert!(
            seen.contains("VM not started: your address 127.0.0.1 may not start VMs on this host"),
            "{seen}"
        );
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(r#"outcome="refused""#) && summary.contains(r#"refused_by="client_networks""#), "{summary}");
        assert!(api.requests().is_empty(), "the start API was called for a refused address");
        let seen = login_from(&proxy, &vm, "127.0.0.2");
        assert!(!seen.contains("may not start VMs"), "{seen}");
        assert_eq!(api.requests().len(), 1);
    }

    /// The start budget: the N+1-th start from one address within the window is refused with the time to
    /// wait, while another address still gets in; a login to a VM that runs costs nothing.
    fn the_start_budget_counts_wakes_per_address(mode) {
        let vm = Vm::new();
        // Every start is refused: each login is a start of a VM that does not run.
        let api = StartApi::serve(|_| Answer::reply(403, "text/plain", "no capacity"));
        let proxy = Proxy::builder_in(mode, &api.url())
            .arg("--source-start-limit=2 per 1h")
            .start();
        for _ in 0..2 {
            let seen = login_from(&proxy, &vm, "127.0.0.3");
            assert!(seen.contains("no capacity"), "{seen}");
        }
        let seen = login_from(&proxy, &vm, "127.0.0.3");
        assert!(
            seen.contains("VM not started: 2 VM starts from your address in the last 1h; try again in"),
            "{seen}"
        );
        assert_eq!(api.requests().len(), 2, "the third start reached the API");
        let summary = proxy.wait_for_summary(3);
        assert!(summary.contains(r#"refused_by="source_start_limit""#), "{summary}");
        let seen = login_from(&proxy, &vm, "127.0.0.4");
        assert!(seen.contains("no capacity"), "another address is refused: {seen}");
        assert_eq!(api.requests().len(), 3);
    }

    /// Logins that share a start or reach a VM that runs spend no budget.
    fn logins_to_a_running_vm_cost_nothing(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, Duration::ZERO);
        let proxy = Proxy::builder_in(mode, &api.url())
            .arg("--source-start-limit=1 per 1h")
            .start();
        for word in ["cold", "warm", "warmer"] {
            assert_echo(proxy.addr, &vm.client_key(), word);
        }
        assert_eq!(api.requests_to("/start").len(), 3, "every login asks the API; one woke the VM");
    }

    /// An address whose connections wake a VM and hang up at once is refused for a while after a few, told
    /// how long; another address is not; and when the penalty ends, the address is let in again.
    fn wakers_that_go_no_further_are_penalized_then_forgiven(mode) {
        // The start API takes its time: each waker hangs up during the call, which wakes the VM anew.
        let api = StartApi::serve(|_| Answer::Hang);
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--penalty-strikes=2", "--penalty-max=3s", "--source-start-limit=none"])
            .start();
        for n in 1..=2 {
            assert!(wake_and_leave(&proxy, &api, "127.0.0.5", n).is_empty());
            proxy.wait_for_summary(n);
        }
        let penalized = Instant::now();
        let told = String::from_utf8_lossy(&wake_and_leave(&proxy, &api, "127.0.0.5", 3)).into_owned();
        assert!(
            told.contains("connections from your address woke VMs and went no further; try again in"),
            "{told}"
        );
        assert_eq!(api.requests().len(), 2, "a penalized address reached the API");
        let status = proxy.status();
        let sources = status["sources"].as_array().unwrap();
        assert_eq!(sources[0]["addr"], "127.0.0.5", "{status:#}");
        assert!(sources[0]["penalized_until"].is_u64(), "{status:#}");

        assert!(
            wake_and_leave(&proxy, &api, "127.0.0.6", 3).is_empty(),
            "another address is not penalized"
        );

        // Forgiven when the penalty ends (here 3 s, penalty_max).
        std::thread::sleep(Duration::from_secs(3).saturating_sub(penalized.elapsed())); // the penalty under test
        assert!(wake_and_leave(&proxy, &api, "127.0.0.5", 4).is_empty(), "still penalized");
    }
}

/// The fail2ban filter shipped as an example bans on the refusals the journal records.
#[test]
fn the_fail2ban_filter_matches_refusal_records() {
    let filter = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/fail2ban/filter.d/ssh-on-demand.conf"
    );
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("journal.txt");
    std::fs::write(
        &log,
        "2026-12-06T19:00:00.000000+00:00 proxy ssh-on-demand[4711]: 203.0.113.9:51234 refused: VM not started: \
         your address 203.0.113.9 may not start VMs on this host\n\
         2026-12-06T19:00:01.000000+00:00 proxy ssh-on-demand[4712]: [2001:db8::9]:51235 refused: VM not started: \
         connections from your address woke VMs and went no further; try again in 30s\n\
         2026-12-06T19:00:02.000000+00:00 proxy ssh-on-demand[4713]: 198.51.100.7:40000 <-> 192.168.0.57:22: 4000 \
         bytes to VM, 3000 to client in 1.2 s\n",
    )
    .unwrap();
    let output = Command::new("fail2ban-regex")
        .args(["--print-all-matched"])
        .arg(&log)
        .arg(filter)
        .output()
        .expect("fail2ban-regex (apt-get install fail2ban)");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.contains("203.0.113.9") && text.contains("2001:db8::9"),
        "{text}"
    );
    assert!(
        text.contains("Lines: 3 lines, 0 ignored, 2 matched, 1 missed"),
        "{text}"
    );
}
