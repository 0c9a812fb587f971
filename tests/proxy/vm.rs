//! Waiting for the VM's sshd: the boot deadline, a port forward that accepts before the guest listens, and a
//! client that leaves while its VM boots.

use super::*;

both_modes! {
    fn vm_that_never_answers_hits_the_deadline(mode) {
        let vm = Vm::new(); // never started
        let api = StartApi::pointing_at(&vm);
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--boot-timeout", "2s"])
            .start();
        let started = Instant::now();
        let seen = refused_login(&proxy);
        assert!(started.elapsed() >= Duration::from_secs(2));
        assert!(
            seen.contains(&format!(
                "VM did not answer within 2 s (start API said {}; last try: Connection refused",
                vm.addr()
            )),
            "{seen}"
        );
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(r#"outcome="vm_not_ready""#), "{summary}");
    }
}

both_modes! {
    /// A hypervisor port forward: accepts at once, then closes the connection while the guest does not listen.
    /// A TCP accept is therefore no sign of readiness; only sshd's identification is.
    fn port_forward_that_accepts_before_the_guest_listens(mode) {
        let vm = Vm::new();
        let forward = TcpListener::bind("127.0.0.1:0").unwrap();
        let forward_addr = forward.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        {
            let (vm_addr, accepted) = (vm.addr(), accepted.clone());
            thread::spawn(move || {
                for outside in forward.incoming().flatten() {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let Ok(inside) = TcpStream::connect(vm_addr) else {
                        continue; // dropping `outside` closes it, as QEMU's user networking does
                    };
                    let (mut a, mut b) = (outside.try_clone().unwrap(), inside.try_clone().unwrap());
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Write);
                    });
                    let (mut a, mut b) = (inside, outside);
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(Shutdown::Write);
                    });
                }
            });
        }
        let api = {
            let vm = vm.clone();
            StartApi::serve(move |_| {
                vm.boot_after(Duration::from_millis(500));
                Answer::text(forward_addr.to_string())
            })
        };
        let proxy = Proxy::start_in(mode, &api.url());
        assert_echo(proxy.addr, &vm.client_key(), "through");
        assert!(
            accepted.load(Ordering::SeqCst) >= 2,
            "the proxy must have retried after accepted-then-closed connections"
        );
    }
}

both_modes! {
    /// The client leaves while its VM boots: its instance (or session) stops waiting and ends at once.
    fn client_gone_while_the_vm_boots_ends_the_session_within_a_second(mode) {
        let vm = Vm::new(); // never boots
        let api = StartApi::pointing_at(&vm);
        let proxy = Proxy::start_in(mode, &api.url()); // boot deadline: the default 120 s
        let mut client = spawn_login(ssh(proxy.addr, &vm.client_key()));
        api.wait_for_requests(1, PATIENCE);
        proxy
            .log
            .wait_for(PATIENCE, |l| l.contains("start API answered"));

        client.kill().unwrap();
        let killed = Instant::now();
        client.wait().unwrap();
        let summary = proxy.try_wait_for_summary(1, Duration::from_secs(1));
        assert!(summary.is_some(), "the session still runs 1 s after its client left");
        if mode == Mode::Activated {
            let exited = proxy.log.try_wait_for(Duration::from_secs(1), |l| l.contains(" died with code "));
            assert!(exited.is_some(), "the instance still runs 1 s after its client left");
        }
        assert!(killed.elapsed() < Duration::from_secs(2));
        assert!(summary.unwrap().contains(r#"outcome="client_gone""#));
    }
}
