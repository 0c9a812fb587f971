//! A start API that trickles, floods, or answers nonsense; and durations no deadline can reach.

use super::*;

both_modes! {
    /// Headers at once, then the body one byte a second: each request is cut at `api_timeout` and retried,
    /// until `boot_timeout`.
    fn api_that_trickles_its_body_one_byte_a_second(mode) {
        let api = RawApi::serve(ApiFault::Trickle(br#"{"vm_ip": "127.0.0.1"}"#.to_vec()));
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--api-timeout", "2s", "--boot-timeout", "5s"])
            .start();
        let (seen, took) = refused_login(proxy.addr);
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
    let (seen, took) = refused_login(proxy.addr);
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
        let (seen, _) = refused_login(proxy.addr);
        assert!(
            seen.contains("VM failed to start: the start API's answer is unusable: it is not text"),
            "{seen}"
        );
        let (seen, _) = refused_login(proxy.addr);
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
        let (seen, took) = refused_login(proxy.addr);
        let expected = r#"VM failed to start: the start API's answer is unusable: vm_ip is a number 167772162, not a string such as "192.168.0.57""#;
        assert!(seen.contains(expected), "{seen}");
        assert!(took < SLACK, "{took:?}");
        let summary = proxy.wait_for_summary(1);
        assert_field(&summary, "outcome", "api_failed");
        assert!(summary.contains("vm_ip is a number 167772162"), "{summary}");
        nothing_left(&proxy, 1, &[]);
    }
}

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
        let output = Command::new(binary())
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
