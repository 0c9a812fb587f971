//! What a request must have before the companion reads its body: the token, from its headers alone; and then
//! a body of at most 16 KiB. Raw HTTP over real sockets, to announce and send what no well-behaved client
//! would.

use testkit as common;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use common::{PATIENCE, api_server::Companion, script};

/// A companion whose one profile's start prints 127.0.0.1.
fn companion() -> (Companion, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("ok");
    script(&start, "echo 127.0.0.1");
    let config = format!(
        "[backends.s]\ntype = \"command\"\nstart = [\"{}\"]\n[profiles.lab]\nbackend = \"s\"\nvm = \"dev\"\n",
        start.display()
    );
    (Companion::start(&config, &[]), dir)
}

/// Sends `request` as is and returns what comes back until the companion closes the connection. A reset
/// after the answer (the companion closing on body bytes it never read) ends it too.
fn exchange(api: &Companion, request: &[u8]) -> String {
    let addr = api.url.strip_prefix("http://").unwrap();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {
                break;
            }
            Err(e) => panic!("{e} after {:?}", String::from_utf8_lossy(&answer)),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request's head; `Connection: close`, so that every answer ends with the connection.
fn head(authorization: &str, length: &str) -> String {
    format!(
        "POST /start HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         {authorization}{length}\r\n"
    )
}

/// 1 GiB announced and not one byte sent: the answer can only come, and the connection close, if the
/// companion does not wait for the body. It did: it read whole bodies before it looked at the token.
#[test]
fn without_the_token_no_body_byte_is_read() {
    let (api, _dir) = companion();
    for authorization in ["", "Authorization: Bearer wrong\r\n"] {
        let answer = exchange(
            &api,
            head(authorization, "Content-Length: 1073741824\r\n").as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
        assert!(answer.contains("missing or wrong bearer token"), "{answer}");
    }
    // Any path: the token comes before routing.
    let answer = exchange(
        &api,
        b"POST /elsewhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 1073741824\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 401 "), "{answer}");
}

#[test]
fn with_the_token_a_body_over_16_kib_is_refused() {
    let (api, _dir) = companion();
    let authorization = format!("Authorization: Bearer {}\r\n", api.token);

    // Announced: refused at once, nothing read.
    let answer = exchange(
        &api,
        head(&authorization, "Content-Length: 1073741824\r\n").as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.contains("the request body is larger than 16 KiB"),
        "{answer}"
    );

    // Chunked, so not announced: refused once 16 KiB have come.
    let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024 + 1, " ".repeat(16 * 1024 + 1));
    let request = format!(
        "{}{chunk}0\r\n\r\n",
        head(&authorization, "Transfer-Encoding: chunked\r\n")
    );
    let answer = exchange(&api, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");

    // Up to the limit is fine: the proxy's request with room to spare.
    let body = format!(
        "{{\"profile\": \"lab\", \"padding\": \"{}\"}}",
        " ".repeat(16 * 1024 - 40)
    );
    let request = format!(
        "{}{body}",
        head(
            &authorization,
            &format!("Content-Length: {}\r\n", body.len())
        )
    );
    let answer = exchange(&api, request.as_bytes());
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains(r#""vm_ip":"127.0.0.1""#), "{answer}");
}
