//! A login through the proxy: what the start API is told, how the connection is handed over, and the relay
//! (bulk data both ways, port forwarding).

use super::*;

both_modes! {
    fn login_runs_a_command_with_its_output_and_exit_status(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let credentials = tempfile::tempdir().unwrap();
        fs::write(credentials.path().join("api-token"), "t0ken-for-the-api\n").unwrap();
        fs::write(credentials.path().join("api-headers"), "X-Tenant: blue\n").unwrap();
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--profile", "lab"])
            .env(
                "CREDENTIALS_DIRECTORY",
                credentials.path().display().to_string(),
            )
            .start();

        let output = run(
            ssh(proxy.addr, &vm.client_key()).arg("echo hello from $(hostname); exit 3"),
            PATIENCE,
        );
        assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
        assert!(
            stdout(&output).starts_with("hello from "),
            "{}",
            stdout(&output)
        );

        // The start API was asked once, with what is known of the connection, and authenticated.
        let requests = api.requests();
        assert_eq!(requests.len(), 1);
        let request = &requests[0];
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, "/start");
        assert_eq!(
            request.header("Authorization"),
            Some("Bearer t0ken-for-the-api")
        );
        assert_eq!(request.header("X-Tenant"), Some("blue"));
        assert_eq!(request.header("Content-Type"), Some("application/json"));
        let body = request.json();
        assert_eq!(body["client_addr"], "127.0.0.1");
        assert!(body["client_port"].as_u64().unwrap() > 0);
        assert_eq!(body["local_addr"], "127.0.0.1");
        assert_eq!(body["local_port"], proxy.addr.port());
        assert_eq!(body["profile"], "lab");

        // The connection that saw sshd's identification is the one relayed: sshd saw one connection, not a
        // probe and then the login.
        assert_eq!(vm.connections(), 1);

        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(r#"outcome="relayed""#), "{summary}");
        assert!(summary.contains(&format!("vm={}", vm.addr())), "{summary}");
        assert!(summary.contains("profile=\"lab\""), "{summary}");
        assert_eq!(proxy.summaries().len(), 1);
        let log = proxy.log.lines().join("\n");
        assert!(
            !log.contains("t0ken-for-the-api"),
            "the token was logged:\n{log}"
        );
    }
}

both_modes! {
    /// `ListenStream=22` makes a dual-stack socket, on which IPv4 clients show as ::ffff:a.b.c.d; the API and
    /// the journal get the plain IPv4 address, which is what an operator searches for.
    fn ipv4_clients_of_a_dual_stack_socket_are_plain_ipv4(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::builder_in(mode, &api.url()).dual_stack().start();
        let output = run(ssh(proxy.addr, &vm.client_key()).arg("true"), PATIENCE);
        assert!(output.status.success(), "{}", stderr(&output));
        let body = api.requests()[0].json();
        assert_eq!(body["client_addr"], "127.0.0.1");
        assert_eq!(body["local_addr"], "127.0.0.1");
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains("client_addr=127.0.0.1 "), "{summary}");
    }
}

#[test]
fn connection_on_fd_3_with_listen_fds() {
    let vm = Vm::new();
    let api = StartApi::booting(&vm, BOOT_TIME);
    let proxy = Proxy::builder(&api.url())
        .handover(Handover::ListenFds)
        .start();
    assert_echo(proxy.addr, &vm.client_key(), "fd3");
}

both_modes! {
    fn sixty_four_mib_each_way_arrive_intact(mode) {
        const SIZE: usize = 64 << 20;
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::start_in(mode, &api.url());
        let local = tempfile::tempdir().unwrap();

        let mut data = vec![0u8; SIZE];
        fastrand::Rng::with_seed(7).fill(&mut data);
        let expected = Sha256::digest(&data);
        let source = local.path().join("up.bin");
        fs::write(&source, &data).unwrap();
        drop(data);

        // Up with scp: the "VM" shares our filesystem, so the copy can be checked where it landed.
        let landed = vm.dir().join("up.bin");
        let output = run(
            scp(proxy.addr, &vm.client_key())
                .arg(&source)
                .arg(format!("root@127.0.0.1:{}", landed.display())),
            PATIENCE * 4,
        );
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(Sha256::digest(fs::read(&landed).unwrap()), expected);

        // Down with ssh and cat.
        let output = run(
            ssh(proxy.addr, &vm.client_key()).arg(format!("cat {}", landed.display())),
            PATIENCE * 4,
        );
        assert!(output.status.success(), "{}", stderr(&output));
        assert_eq!(output.stdout.len(), SIZE);
        assert_eq!(Sha256::digest(&output.stdout), expected);

        let summary = proxy.wait_for_summary(2);
        let bytes = |field: &str| -> u64 {
            let start = summary.find(&format!("{field}=")).unwrap() + field.len() + 1;
            summary[start..]
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(bytes("bytes_to_client") > SIZE as u64, "{summary}");
    }
}

both_modes! {
    fn local_port_forwarding_works_through_the_proxy(mode) {
        let vm = Vm::new();
        let api = StartApi::booting(&vm, BOOT_TIME);
        let proxy = Proxy::start_in(mode, &api.url());

        // A service next to the VM, reachable only through the tunnel's far end.
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let service_port = service.local_addr().unwrap().port();
        thread::spawn(move || {
            for stream in service.incoming().flatten() {
                let mut stream = stream;
                let mut buf = [0u8; 64];
                let n = stream.read(&mut buf).unwrap_or(0);
                let _ = stream.write_all(&[b"echo: ", &buf[..n]].concat());
            }
        });

        let local = tempfile::tempdir().unwrap();
        let socket = local.path().join("tunnel.sock");
        let mut client = ssh(proxy.addr, &vm.client_key())
            .arg("-L")
            .arg(format!("{}:127.0.0.1:{service_port}", socket.display()))
            .arg("echo ready; read line; exit 0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // ssh opens its forwarding listener before the session, so "ready" means the tunnel is there.
        let mut ready = [0u8; 6];
        client
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut ready)
            .unwrap();
        assert_eq!(&ready, b"ready\n");

        let mut tunnel = UnixStream::connect(&socket).unwrap();
        tunnel.write_all(b"ping").unwrap();
        let mut answer = [0u8; 10];
        tunnel.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"echo: ping");

        // ssh exits once the session and every forwarded connection are closed.
        drop(tunnel);
        drop(client.stdin.take());
        assert!(client.wait().unwrap().success());
    }
}
