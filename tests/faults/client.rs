//! The client vanishing without a FIN while its VM boots or while it is relayed, or no longer reading.

use super::*;

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
        let mut client = spawn_login(ssh_in(&client_ns, addr, &vm.client_key()));
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
pub(crate) fn client_vanishes_while_relaying(mode: Mode) {
    let client_ns = Netns::new();
    let vm = Vm::new();
    vm.start();
    let api = StartApi::pointing_at(&vm);
    let listener = client_ns.listener_for_clients(Some(SHORT_KEEPALIVE));
    let addr = listener.local_addr().unwrap();
    let proxy = Proxy::builder_in(mode, &api.url())
        .listener(listener, None)
        .start();
    let login = Session::start(&mut ssh_in(&client_ns, addr, &vm.client_key()));
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
pub(crate) fn client_stops_reading(mode: Mode) {
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
