//! Port 22 is hostile ground: clients that do not speak SSH-2 start nothing, and answers that would aim the
//! relay at this host are refused.

use super::*;

both_modes! {
    /// An HTTP request, and SSH-1 (`SSH-1.5-`, or `SSH-1.99-`, which only servers may say): closed without a
    /// word, as sshd would not speak with them either, and nothing is started.
    fn client_that_does_not_speak_ssh_2_starts_nothing(mode) {
        let api = StartApi::serve(|_| Answer::text("127.0.0.1"));
        let proxy = Proxy::start_in(mode, &api.url());
        let first_lines: [&[u8]; 3] =
            [b"GET / HTTP/1.0\r\n\r\n", b"SSH-1.5-OpenSSH_3.9p1\r\n", b"SSH-1.99-x\r\n"];
        for (n, first) in first_lines.into_iter().enumerate() {
            let mut stream = TcpStream::connect(proxy.addr).unwrap();
            stream.write_all(first).unwrap();
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).unwrap();
            assert!(answer.is_empty(), "{answer:?}");
            let summary = proxy.wait_for_summary(n + 1);
            assert!(summary.contains(r#"outcome="not_ssh""#), "{summary}");
            let shown = String::from_utf8_lossy(&first[..first.len().min(16)]);
            assert!(summary.contains(&format!("client sent {shown:?}")), "{summary}");
        }
        assert!(
            api.requests().is_empty(),
            "a VM was started for a client that does not speak SSH-2"
        );
    }
}

both_modes! {
    /// A start API that answers with this host's loopback, its own address or the cloud's metadata service
    /// is refused unless the operator lists a network inside them (the tests' 127.0.0.0/8); a wide listing
    /// does not open them; nothing is connected to.
    fn answers_pointing_at_the_host_are_refused(mode) {
        let answers = [
            ("127.0.0.1", "which is a loopback address"),
            ("169.254.169.254", "which is a cloud metadata service"),
            ("169.254.1.2", "which is link-local"),
        ];
        for (ip, why) in answers {
            let api = StartApi::serve(move |_| Answer::text(ip));
            let proxy = Proxy::builder_in(mode, &api.url()).default_vm_networks().start();
            let seen = refused_login(&proxy);
            assert!(
                seen.contains(&format!("VM failed to start: the start API answered {ip}, {why}; the operator can allow it in vm_networks")),
                "{seen}"
            );
            let summary = proxy.wait_for_summary(1);
            assert!(summary.contains(r#"outcome="api_failed""#), "{summary}");
        }
        let vm = Vm::new();
        vm.start();
        let api = StartApi::pointing_at(&vm);
        let proxy = Proxy::builder_in(mode, &api.url())
            .default_vm_networks()
            .args(["--vm-network=0.0.0.0/0", "--vm-network=::/0"])
            .start();
        let seen = refused_login(&proxy);
        assert!(seen.contains("which is a loopback address"), "{seen}");
        assert_eq!(vm.connections(), 0);

        let api = StartApi::serve(|_| Answer::text("198.51.100.7"));
        let proxy = Proxy::builder_in(mode, &api.url())
            .default_vm_networks()
            .arg("--vm-network=10.0.0.0/8")
            .start();
        let seen = refused_login(&proxy);
        assert!(
            seen.contains("VM failed to start: the start API answered 198.51.100.7, which is outside vm_networks"),
            "{seen}"
        );
    }

    /// An answer that points at the proxy's own listening socket (its address and port, as JSON or text,
    /// IPv4-mapped on a dual-stack socket) is refused at once, not relayed to itself until the boot deadline,
    /// even with loopback allowed in vm_networks.
    fn answers_pointing_at_the_proxy_itself_are_refused_at_once(mode) {
        for dual_stack in [false, true] {
            let port = Arc::new(std::sync::OnceLock::<u16>::new());
            let api = {
                let port = port.clone();
                StartApi::serve(move |_| {
                    let port = *port.get().expect("the proxy listens before anyone logs in");
                    match dual_stack {
                        false => Answer::json(json!({ "vm_ip": "127.0.0.1", "port": port })),
                        true => Answer::text(format!("[::ffff:127.0.0.1]:{port}")),
                    }
                })
            };
            let mut builder = Proxy::builder_in(mode, &api.url());
            if dual_stack {
                builder = builder.dual_stack();
            }
            let proxy = builder.start();
            port.set(proxy.addr.port()).unwrap();
            let asked = Instant::now();
            let seen = refused_login(&proxy);
            assert!(
                seen.contains(&format!(
                    "VM failed to start: the start API answered {}, whose port {} is where ssh-on-demand \
                     itself listens on this host",
                    if dual_stack { "::ffff:127.0.0.1" } else { "127.0.0.1" },
                    proxy.addr.port()
                )),
                "{seen}"
            );
            // At once: not after the client banner timeout of a second instance (3 s), nor the boot deadline.
            assert!(asked.elapsed() < Duration::from_secs(3), "{:?}", asked.elapsed());
            let summary = proxy.wait_for_summary(1);
            assert!(summary.contains(r#"outcome="api_failed""#), "{summary}");
            assert_eq!(proxy.summaries().len(), 1, "{:#?}", proxy.summaries());
        }
    }

    /// Linux connects 0.0.0.0 to this host, and ::ffff:0.0.0.0 too: such an answer, as JSON or text, reaches
    /// nothing on this host (here a listener on its loopback stands for its own sshd), not even with every
    /// network listed, and the user reads why.
    fn unspecified_answers_reach_nothing_on_this_host(mode) {
        let host_sshd = TcpListener::bind("127.0.0.1:0").unwrap();
        host_sshd.set_nonblocking(true).unwrap();
        let port = host_sshd.local_addr().unwrap().port();
        let answers = [
            json!({ "vm_ip": "::ffff:0.0.0.0", "port": port }).to_string(),
            format!("[::ffff:0.0.0.0]:{port}"),
        ];
        for networks in [&[][..], &["--vm-network=0.0.0.0/0", "--vm-network=::/0"][..]] {
            for answer in &answers {
                let body = answer.clone();
                let api = StartApi::serve(move |_| Answer::text(body.clone()));
                let proxy = Proxy::builder_in(mode, &api.url())
                    .default_vm_networks()
                    .args(networks.iter().copied())
                    .arg("--boot-timeout=3s")
                    .start();
                let seen = refused_login(&proxy);
                assert!(
                    seen.contains(
                        "VM failed to start: the start API answered ::ffff:0.0.0.0, which is unspecified \
                         (0.0.0.0/8 or ::), never a VM's address"
                    ),
                    "{answer} with {networks:?}: {seen}"
                );
                let summary = proxy.wait_for_summary(1);
                assert!(summary.contains(r#"outcome="api_failed""#), "{summary}");
                let reached = host_sshd.accept();
                assert!(
                    matches!(&reached, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                    "{answer} with {networks:?} reached this host's loopback: {reached:?}"
                );
            }
        }
    }

    /// A client that resets its connection before it is served still leaves its summary record.
    fn client_that_resets_at_once_leaves_a_summary(mode) {
        let api = StartApi::serve(|_| Answer::text("127.0.0.1"));
        let proxy = Proxy::start_in(mode, &api.url());
        let stream = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        stream.connect(&proxy.addr.into()).unwrap();
        stream.set_linger(Some(Duration::ZERO)).unwrap();
        drop(stream); // RST
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(r#"outcome="client_gone""#), "{summary}");
        assert!(api.requests().is_empty());
    }
}
