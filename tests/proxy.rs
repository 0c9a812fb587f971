//! End to end through the real OpenSSH client, ssh-on-demand under systemd-socket-activate, a real HTTP start
//! API and a real sshd as the VM.

use testkit as common;
use testkit::both_modes;

use std::{
    fs,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    proxy::{Handover, Mode, Proxy},
    ssh::{assert_echo, run, scp, ssh, stderr, stdout},
    tls::HttpsApi,
    vm::Vm,
};
use serde_json::json;
use sha2::{Digest, Sha256};

/// How long the test VMs take to "boot" after the start API answered.
const BOOT_TIME: Duration = Duration::from_millis(300);

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

both_modes! {
    fn plain_text_answer_with_a_port(mode) {
        let vm = Vm::with_port(common::reserved_port());
        let api = {
            let vm = vm.clone();
            StartApi::serve(move |_| {
                vm.boot_after(BOOT_TIME);
                Answer::text(format!("{}\n", vm.addr()))
            })
        };
        let proxy = Proxy::start_in(mode, &api.url());
        assert_echo(proxy.addr, &vm.client_key(), "plain");
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

both_modes! {
    fn api_errors_are_retried_until_it_answers(mode) {
        let vm = Vm::new();
        let calls = Arc::new(AtomicUsize::new(0));
        let api = {
            let (vm, calls) = (vm.clone(), calls.clone());
            StartApi::serve(move |_| match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Answer::reply(500, "text/plain", "hypervisor busy"),
                1 => Answer::reply(503, "text/html", "<html>maintenance</html>"),
                _ => {
                    vm.boot_after(BOOT_TIME);
                    Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
                }
            })
        };
        let proxy = Proxy::start_in(mode, &api.url());
        assert_echo(proxy.addr, &vm.client_key(), "third time");
        assert_eq!(api.requests().len(), 3);
        let retry = proxy.log.wait_for(PATIENCE, |l| {
            l.contains("500 Internal Server Error") && l.contains("retrying")
        });
        // Not a warning: `journalctl -p warning` lists failures, and this login succeeded.
        assert!(retry.contains(" INFO "), "{retry}");
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains(" INFO "), "{summary}");
    }
}

/// Runs one ssh login that must be refused, and returns what the user saw on stderr.
fn refused_login(proxy: &Proxy) -> String {
    common::ssh::refused_login(proxy.addr).0
}

both_modes! {
    fn api_refusal_is_shown_to_the_user_and_not_retried(mode) {
        let api = StartApi::serve(|_| {
            Answer::reply(
                403,
                "application/json",
                r#"{"error": "quota exceeded for team blue"}"#,
            )
        });
        let proxy = Proxy::start_in(mode, &api.url());
        let seen = refused_login(&proxy);
        assert!(
            seen.contains(
                "VM failed to start: the start API answered 403 Forbidden: quota exceeded for team blue"
            ),
            "{seen}"
        );
        assert_eq!(api.requests().len(), 1, "a 4xx is final");
        let summary = proxy.wait_for_summary(1);
        assert!(summary.contains("WARN"), "{summary}");
        assert!(summary.contains(r#"outcome="api_failed""#), "{summary}");
    }
}

both_modes! {
    fn unusable_answers_are_shown_to_the_user(mode) {
        let answers = [
            (
                Answer::reply(
                    200,
                    "text/html",
                    "<!doctype html><title>Welcome to nginx</title>",
                ),
                "the start API's answer is unusable: it is HTML, not an address",
            ),
            (
                Answer::text("vm-17.cluster.internal"),
                "is a hostname; the start API must answer with an IP address",
            ),
            (
                Answer::json(json!({ "state": "booting" })),
                "the start API's answer is unusable: the JSON has no vm_ip",
            ),
            (Answer::text("¯\\_(ツ)_/¯"), "is not an IP address"),
            (
                Answer::reply(200, "text/plain", "x".repeat(100_000)),
                "the start API's answer is larger than 64 KiB",
            ),
        ];
        let expectations: Vec<&str> = answers.iter().map(|(_, e)| *e).collect();
        let mut answers = answers.into_iter().map(|(a, _)| a);
        let api = StartApi::serve(move |_| answers.next().unwrap());
        let proxy = Proxy::start_in(mode, &api.url());
        for expected in expectations {
            let seen = refused_login(&proxy);
            assert!(seen.contains("VM failed to start: "), "{seen}");
            assert!(seen.contains(expected), "expected {expected:?} in {seen}");
        }
    }
}

both_modes! {
    fn redirect_loop_is_shown_to_the_user(mode) {
        let api = StartApi::serve(|request| Answer::Redirect {
            location: request.url.clone(),
        });
        let proxy = Proxy::start_in(mode, &api.url());
        let seen = refused_login(&proxy);
        assert!(
            seen.contains("VM failed to start: the start API redirected more than 5 times"),
            "{seen}"
        );
        // The first request and five redirects, not retried: a loop does not end by itself.
        assert_eq!(api.requests().len(), 6);
    }
}

both_modes! {
    /// The configured headers (token, api_headers, the api-headers credential) follow a redirect within the
    /// API's origin, and none of them one to another origin: here only the port differs, which is enough.
    fn configured_headers_never_follow_a_redirect_to_another_origin(mode) {
        let vm = Vm::new();
        let elsewhere = StartApi::booting(&vm, BOOT_TIME);
        let elsewhere_url = elsewhere.url();
        let api = StartApi::serve(move |request| Answer::Redirect {
            location: if request.url == "/start" { "/moved".to_owned() } else { elsewhere_url.clone() },
        });
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("api-token"), "t0ken\n").unwrap();
        fs::write(dir.path().join("api-headers"), "X-Api-Key: k3y\n").unwrap();
        let config = dir.path().join("config.toml");
        fs::write(&config, "api_headers = [\"X-Tenant: blue\"]\n").unwrap();
        let proxy = Proxy::builder_in(mode, &api.url())
            .config(config.display().to_string())
            .env("CREDENTIALS_DIRECTORY", dir.path().display().to_string())
            .start();
        assert_echo(proxy.addr, &vm.client_key(), "redirected");

        let configured = [("Authorization", "Bearer t0ken"), ("X-Api-Key", "k3y"), ("X-Tenant", "blue")];
        let asked = api.requests();
        assert_eq!(asked.iter().map(|r| r.url.as_str()).collect::<Vec<_>>(), ["/start", "/moved"]);
        for request in &asked {
            for (name, value) in configured {
                assert_eq!(request.header(name), Some(value), "{request:?}");
            }
        }
        let told = elsewhere.requests();
        assert_eq!(told.len(), 1);
        let request = &told[0];
        assert_eq!(request.method, "POST", "307 keeps the method");
        assert_eq!(request.json()["client_addr"], "127.0.0.1", "307 keeps the body");
        for (name, _) in configured {
            assert_eq!(request.header(name), None, "{name} followed the redirect: {request:?}");
        }
        assert_eq!(request.header("Referer"), None, "{request:?}");
    }
}

both_modes! {
    fn hung_api_is_shown_to_the_user(mode) {
        let api = StartApi::serve(|_| Answer::Hang);
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--api-timeout", "1s", "--boot-timeout", "2500ms"])
            .start();
        let seen = refused_login(&proxy);
        assert!(
            seen.contains("VM failed to start: the start API did not answer within 1 s"),
            "{seen}"
        );
    }
}

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
        let mut client = ssh(proxy.addr, &vm.client_key())
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
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

#[test]
fn misconfiguration_is_shown_to_the_user_and_detailed_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        "api_url = \"http://127.0.0.1:9/\"\nboot_timout = \"1s\"\n",
    )
    .unwrap();
    let proxy = Proxy::builder("http://127.0.0.1:9/")
        .config(config.display().to_string())
        .start();
    let seen = refused_login(&proxy);
    assert!(
        seen.contains("ssh-on-demand is misconfigured on this host"),
        "{seen}"
    );
    let summary = proxy.wait_for_summary(1);
    assert!(summary.contains(r#"outcome="misconfigured""#), "{summary}");
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("unknown field `boot_timout`"));
}

both_modes! {
    fn https_start_api_is_trusted_through_api_ca_file(mode) {
        let vm = Vm::new();
        vm.start();
        let api = HttpsApi::serve(&json!({ "vm_ip": vm.ip().to_string() }).to_string());

        // Its CA is not among the system's: the user is told why at once, not after retrying until the boot
        // deadline (120 s, longer than refused_login waits).
        let proxy = Proxy::start_in(mode, &api.url);
        let seen = refused_login(&proxy);
        assert!(
            seen.contains(
                "VM failed to start: the start API's TLS connection failed (invalid peer certificate"
            ),
            "{seen}"
        );

        let proxy = Proxy::builder_in(mode, &api.url)
            .arg(format!("--api-ca-file={}", api.ca_file.display()))
            .start();
        assert_echo(proxy.addr, &vm.client_key(), "tls");
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
