//! The start API's answers, good and bad: retried, refused, unusable, redirected, hung, over https; each
//! failure is what the user reads.

use super::*;

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
