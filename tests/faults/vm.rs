//! The VM vanishing, resetting, never speaking, or speaking garbage.

use super::*;

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
        let (seen, took) = refused_login(proxy.addr);
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
        let (seen, took) = refused_login(proxy.addr);
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
        let (seen, took) = refused_login(proxy.addr);
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
        let (seen, took) = refused_login(proxy.addr);
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
        let mut login = Session::start(&mut ssh(proxy.addr, &vm.client_key()));
        vm.ns.reset_connections(vm.addr().port());
        let reset = Instant::now();
        let seen = login.wait_ended(SLACK).expect("ssh still runs after the VM reset its connection");
        assert!(reset.elapsed() < Duration::from_secs(1), "{:?}", reset.elapsed());
        assert!(closed_on_the_client(&seen), "{seen}");
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "relayed");
        assert!(summary.contains("relay ended: the VM's connection failed: Connection reset by peer"), "{summary}");
        assert_field(&summary, "relay_failed", "vm");
        nothing_left(&proxy, 1, &[vm.addr()]);
    }
}

/// Ends the VM's network mid-session without a word (`how`), and checks that the relay ends within the VM
/// side's keep-alive bound, closing the client's connection.
pub(crate) fn vm_vanishes_mid_session(mode: Mode, how: fn(&Netns)) {
    let vm = NsVm::start();
    let api = StartApi::serve({
        let ip = vm.addr().ip().to_string();
        move |_| common::api::Answer::json(serde_json::json!({ "vm_ip": ip }))
    });
    let proxy = in_namespaces(Proxy::builder_in(mode, &api.url())).start();
    let mut login = Session::start(&mut ssh(proxy.addr, &vm.client_key()));
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
    assert!(closed_on_the_client(&seen), "{seen}");
    let summary = proxy.wait_for_summary(1);
    assert_field(&summary, "outcome", "relayed");
    // The keep-alive's probes go unanswered (timed out), or, with the link down, the neighbour is found
    // gone first (no route to host), depending on the kernel: either way the VM's side failed.
    assert!(
        ["Connection timed out", "No route to host"]
            .iter()
            .any(|why| summary.contains(&format!("relay ended: the VM's connection failed: {why}"))),
        "{summary}"
    );
    nothing_left(&proxy, 1, &[vm.addr()]);
}

/// Whether ssh says its connection was closed: with a FIN ("closed by remote host"), or with a reset when the
/// proxy closed the client's socket with bytes of the client's still unread (a window adjust in flight), which
/// ssh meets on its next read or write.
fn closed_on_the_client(seen: &str) -> bool {
    [
        "closed by remote host",
        "Broken pipe",
        "Connection reset by peer",
    ]
    .iter()
    .any(|said| seen.contains(said))
}
