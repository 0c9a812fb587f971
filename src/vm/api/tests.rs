use super::{
    answer::{MAX_DETAIL, error_detail},
    *,
};

fn parse(content_type: &str, body: &str) -> Result<SocketAddr, Unusable> {
    parse_answer(content_type, body.as_bytes(), 22)
}

#[test]
fn json_answers() {
    let json = "application/json";
    assert_eq!(
        parse(json, r#"{"vm_ip": "192.168.0.57"}"#),
        Ok("192.168.0.57:22".parse().unwrap())
    );
    assert_eq!(
        parse(
            json,
            r#"{"vm_ip": "2001:db8::7", "port": 2222, "state": "booting"}"#
        ),
        Ok("[2001:db8::7]:2222".parse().unwrap())
    );
    // JSON without the right content type is still recognised.
    assert_eq!(
        parse("text/plain", r#"{"vm_ip":"10.0.0.1"}"#),
        Ok("10.0.0.1:22".parse().unwrap())
    );
}

#[test]
fn plain_text_answers() {
    assert_eq!(
        parse("text/plain", "192.168.0.57\n"),
        Ok("192.168.0.57:22".parse().unwrap())
    );
    assert_eq!(
        parse("", "192.168.0.57:2222"),
        Ok("192.168.0.57:2222".parse().unwrap())
    );
    assert_eq!(
        parse("", "[2001:db8::7]:2222"),
        Ok("[2001:db8::7]:2222".parse().unwrap())
    );
    assert_eq!(
        parse("", "2001:db8::7"),
        Ok("[2001:db8::7]:22".parse().unwrap())
    );
}

/// Addresses no VM may have are well-formed answers: refusing them is vm::targets' business, which judges the
/// remembered addresses of running VMs too.
#[test]
fn the_answer_is_read_as_written() {
    for (body, addr) in [
        ("::ffff:0.0.0.0", "[::ffff:0.0.0.0]:22"),
        ("[::ffff:0.0.0.0]:2222", "[::ffff:0.0.0.0]:2222"),
        ("0.0.0.0", "0.0.0.0:22"),
        ("127.0.0.1", "127.0.0.1:22"),
    ] {
        assert_eq!(
            parse("text/plain", body),
            Ok(addr.parse().unwrap()),
            "{body}"
        );
    }
    assert_eq!(
        parse("application/json", r#"{"vm_ip": "::ffff:0.0.0.0"}"#),
        Ok("[::ffff:0.0.0.0]:22".parse().unwrap())
    );
}

#[test]
fn unusable_answers_say_why() {
    let cases = [
        ("application/json", "{}", "no vm_ip"),
        ("application/json", r#"{"vm_ip": ""}"#, "no vm_ip"),
        ("application/json", r#"{"vm_ip": null}"#, "no vm_ip"),
        (
            "application/json",
            r#"{"vm_ip": "10.0.0.1", "port": 70000}"#,
            "port is 70000, not a number from 1 to 65535",
        ),
        (
            "application/json",
            r#"{"vm_ip": "10.0.0.1", "port": "22"}"#,
            r#"port is "22", not a number"#,
        ),
        (
            "application/json",
            r#"{"vm_ip": 167772162}"#,
            r#"vm_ip is a number 167772162, not a string such as "192.168.0.57""#,
        ),
        (
            "application/json",
            r#"{"vm_ip": ["10.0.0.1"]}"#,
            "vm_ip is an array",
        ),
        (
            "application/json",
            r#"["10.0.0.1"]"#,
            "the JSON is an array, not an object with vm_ip",
        ),
        (
            "application/json",
            r#""10.0.0.1""#,
            "the JSON is a string, not an object with vm_ip",
        ),
        (
            "text/plain",
            "[fe80::1%2]:22",
            "fe80::1 names an interface (%2)",
        ),
        ("application/json", "not json", "invalid JSON"),
        ("text/html", "<html><body>Welcome</body></html>", "HTML"),
        ("text/plain", "", "empty"),
        ("text/plain", "vm-7.internal", "is a hostname"),
        ("text/plain", "banana split!", "not an IP address"),
        ("text/plain", "10.0.0.1\n10.0.0.2", "several lines"),
        ("text/plain", "10.0.0.1:0", "port 0"),
    ];
    for (content_type, body, expected) in cases {
        let error = parse(content_type, body).unwrap_err();
        assert!(error.contains(expected), "{body:?}: {error}");
    }
    assert!(
        parse_answer("", &[0xff, 0xfe], 22)
            .unwrap_err()
            .contains("not text")
    );
}

#[test]
fn a_budget_no_clock_can_hold_is_no_panic() {
    assert!(deadline_after(Duration::MAX) > Instant::now());
    assert!(deadline_after(Duration::from_secs(9_467_280_000_000_000_000)) > Instant::now());
}

/// Inputs found by fuzzing (fuzz/fuzz_targets/start_answer.rs), kept as regressions.
#[test]
fn found_by_fuzzing() {
    // An interface index parsed in the bracketed text form only (the JSON form and the bare address
    // refused it), and no start API can know this host's interface numbers: refused in every form.
    for (content_type, body) in [
        ("", "[fe80::1%2]:22"),
        ("", "fe80::1%2"),
        ("application/json", r#"{"vm_ip": "fe80::1%2"}"#),
    ] {
        assert!(parse(content_type, body).is_err(), "{body}");
    }
    assert_eq!(
        parse("", "[fe80::1]:22"),
        Ok("[fe80::1]:22".parse().unwrap())
    );
    // Control characters, escaped to 6 or 8 characters each, made the message grow past any bound; and raw
    // in an API's text they reached the journal.
    let error = parse("text/plain", &format!("{}~", "\u{17}".repeat(200))).unwrap_err();
    assert!(error.chars().count() <= MAX_DETAIL + 40, "{error}");
    let error = parse("", &format!("x\r{}\ny", "\u{1b}[31m".repeat(100))).unwrap_err();
    assert!(!error.contains(|c: char| c.is_control()), "{error:?}");
    assert_eq!(
        error_detail(b"quota\rexceeded\x1b[2J").as_deref(),
        Some("quota exceeded [2J")
    );
}

#[test]
fn timeouts_name_what_ran_out() {
    let second = Duration::from_secs(1);
    assert_eq!(
        ApiError::Timeout(Endpoint::Start, second * 10).to_string(),
        "the start API did not answer within 10 s"
    );
    assert_eq!(
        ApiError::Deadline(Endpoint::Start, second * 120).to_string(),
        "the start API did not answer within 120 s (boot_timeout)"
    );
    assert_eq!(
        ApiError::Deadline(Endpoint::Stop, second * 60).to_string(),
        "the stop API did not answer within 60 s (stop_timeout)"
    );
}

#[test]
fn refusal_detail_for_the_user() {
    assert_eq!(
        error_detail(br#"{"error": "quota exceeded"}"#).as_deref(),
        Some("quota exceeded")
    );
    assert_eq!(
        error_detail(b"no such VM\nmore text").as_deref(),
        Some("no such VM")
    );
    assert_eq!(error_detail(b"<html>403</html>"), None);
    assert_eq!(error_detail(b""), None);
    let long = "x".repeat(500);
    assert_eq!(
        error_detail(long.as_bytes()).unwrap().chars().count(),
        MAX_DETAIL + 1
    );
}

#[test]
fn only_outages_and_server_errors_are_retried() {
    let start = Endpoint::Start;
    assert!(ApiError::Unreachable(start, "refused".into()).is_transient());
    assert!(ApiError::Timeout(start, Duration::from_secs(1)).is_transient());
    let status = |status| ApiError::Status {
        endpoint: start,
        status,
        detail: None,
    };
    assert!(status(StatusCode::SERVICE_UNAVAILABLE).is_transient());
    assert!(!status(StatusCode::FORBIDDEN).is_transient());
    assert!(!ApiError::BadAnswer(Unusable("x".into())).is_transient());
    assert!(!ApiError::Tls(start, "invalid peer certificate".into()).is_transient());
    assert!(!ApiError::TooLarge(start).is_transient());
    assert!(!ApiError::Deadline(start, Duration::from_secs(1)).is_transient());
}

#[test]
fn how_the_platform_gave_the_vm_is_read_when_plain() {
    let how = answer::how(br#"{"vm_ip": "192.0.2.7", "how": "resumed", "ms": 397}"#).unwrap();
    assert_eq!(how.to_string(), "resumed in 397 ms");
    assert_eq!(answer::how(br#"{"vm_ip": "192.0.2.7"}"#), None);
    assert_eq!(
        answer::how(br#"{"vm_ip": "192.0.2.7", "how": "a long sentence with spaces"}"#),
        None,
        "only a word goes into the journal"
    );
    assert_eq!(answer::how(b"192.0.2.7"), None);
}

/// A start API that writes an answer's head and body apart, with Nagle on (Python's http.server as usually
/// written), holds the body until the head is ACKed; on a reused connection Linux may delay that ACK by
/// 40 ms. So every request to a plain-http API goes on a connection of its own, which ACKs at once.
#[tokio::test]
async fn each_request_to_a_plain_http_api_has_its_own_connection() {
    use std::{
        io::{Read, Write},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
    };

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/start", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut request = Vec::new();
                let mut buf = [0; 4096];
                // Keep-alive: answer every request on the connection, as http.server does.
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    request.extend_from_slice(&buf[..n]);
                    if !request.contains(&b'}') {
                        continue; // the JSON body's end
                    }
                    request.clear();
                    let body = br#"{"vm_ip": "192.0.2.7"}"#;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    stream.write_all(head.as_bytes()).unwrap();
                    stream.write_all(body).unwrap();
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.toml");
    fs::write(&empty, "").unwrap();
    let settings = crate::cli::Settings {
        api_url: Some(url),
        ..Default::default()
    };
    let config = crate::config::Config::resolve(Some(&empty), settings, None).unwrap();
    let api = Api::new(config.default.as_ref().unwrap()).unwrap();
    let request = StartRequest {
        connection: None,
        profile: None,
        reason: None,
    };
    for _ in 0..3 {
        let started = api
            .start(
                &request,
                deadline_after(Duration::from_secs(10)),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        assert_eq!(started.addr, "192.0.2.7:22".parse().unwrap());
    }
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}
