//! What the faults are made with: raw clients, and VMs that are no sshd (logins that stay open are
//! testkit's `Session`).

use super::*;

/// A client of raw bytes, to do what ssh never does: stop reading, or write into a relay that cannot take more.
pub(crate) struct RawClient {
    stream: TcpStream,
}

impl RawClient {
    pub(crate) fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).unwrap();
        // Small buffers fill sooner.
        socket2::SockRef::from(&stream)
            .set_recv_buffer_size(4096)
            .unwrap();
        (&stream).write_all(b"SSH-2.0-faults_test\r\n").unwrap();
        RawClient { stream }
    }

    /// Reads the VM's identification line, relayed.
    pub(crate) fn read_identification(&mut self) {
        self.stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut reader = BufReader::new(&self.stream);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("SSH-2.0-"), "{line:?}");
    }

    /// Writes until nothing more goes in for a second: everything between here and the VM is full. Returns
    /// when that began.
    pub(crate) fn write_until_stuck(&mut self) -> Instant {
        self.stream.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        let mut last_progress = Instant::now();
        loop {
            match self.stream.write(&chunk) {
                Ok(_) => last_progress = Instant::now(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if last_progress.elapsed() > Duration::from_secs(1) {
                        return last_progress;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("writing: {e}"),
            }
        }
    }

    /// Waits up to `limit` for the proxy to close or reset the connection; when it did.
    pub(crate) fn wait_closed(&mut self, limit: Duration) -> Instant {
        self.stream.set_nonblocking(false).unwrap();
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Instant::now(),
                Ok(_) => {}
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    panic!("the connection is still open after {limit:?}")
                }
                Err(_) => return Instant::now(),
            }
        }
    }
}

/// What a fake VM does with each connection.
#[derive(Clone)]
pub(crate) enum Behaviour {
    /// Accepts and never sends anything.
    Silent,
    /// Sends these bytes, then nothing more.
    Sends(Vec<u8>),
    /// Sends these bytes, then closes.
    SendsThenCloses(Vec<u8>),
    /// Sends an identification line, then bytes as fast as they are taken.
    Floods,
    /// Sends an identification line, then never reads.
    Deaf,
}

/// A TCP server on loopback that is no sshd.
pub(crate) struct FakeVm {
    server: HandServer,
    /// Connections kept open without a thread (`Deaf`), closed when the VM is dropped.
    held: Arc<Mutex<Vec<TcpStream>>>,
}

pub(crate) const FAKE_BANNER: &[u8] = b"SSH-2.0-OpenSSH_9.2p1 fake\r\n";

impl FakeVm {
    pub(crate) fn start(behaviour: Behaviour) -> FakeVm {
        let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let server = HandServer::start({
            let held = held.clone();
            move |mut stream, _, tally| {
                match &behaviour {
                    Behaviour::Silent => drain(&mut stream),
                    Behaviour::Sends(bytes) => {
                        let _ = stream.write_all(bytes);
                        drain(&mut stream);
                    }
                    Behaviour::SendsThenCloses(bytes) => {
                        let _ = stream.write_all(bytes);
                        let _ = stream.shutdown(Shutdown::Write);
                        drain(&mut stream);
                    }
                    Behaviour::Floods => {
                        let _ = stream.write_all(FAKE_BANNER);
                        let chunk = vec![b'x'; 64 * 1024];
                        while !tally.stop.load(Ordering::SeqCst) {
                            match stream.write(&chunk) {
                                Ok(n) => {
                                    tally.written.fetch_add(n as u64, Ordering::SeqCst);
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    Behaviour::Deaf => {
                        let _ = stream.write_all(FAKE_BANNER);
                        held.lock().unwrap().push(stream);
                        return Held::Open;
                    }
                }
                Held::Closed
            }
        });
        FakeVm { server, held }
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    pub(crate) fn accepted(&self) -> usize {
        self.server.tally.accepted.load(Ordering::SeqCst)
    }

    pub(crate) fn written(&self) -> u64 {
        self.server.tally.written.load(Ordering::SeqCst)
    }

    /// Every connection the proxy made was closed by it.
    pub(crate) fn assert_all_closed(&self) {
        self.server
            .assert_all_closed("the proxy to close every connection to the fake VM");
    }
}

impl Drop for FakeVm {
    fn drop(&mut self) {
        self.held.lock().unwrap().clear();
    }
}

/// What a server written by hand (FakeVm, RawApi) shares with its threads.
#[derive(Default)]
pub(crate) struct Tally {
    accepted: AtomicUsize,
    /// Connections accepted and not yet finished by their handler.
    open: AtomicUsize,
    written: AtomicU64,
    /// Set when the server is dropped: its loops end.
    stop: AtomicBool,
}

/// Whether a handler left its connection open (kept elsewhere) or finished with it.
pub(crate) enum Held {
    Open,
    Closed,
}

/// A listener on 127.0.0.1 whose every connection gets a thread running `serve` (with the connection's
/// number, from 0), until the server is dropped.
pub(crate) struct HandServer {
    addr: SocketAddr,
    tally: Arc<Tally>,
}

impl HandServer {
    pub(crate) fn start(
        serve: impl Fn(TcpStream, usize, &Tally) -> Held + Send + Sync + 'static,
    ) -> HandServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = HandServer {
            addr: listener.local_addr().unwrap(),
            tally: Arc::default(),
        };
        let tally = server.tally.clone();
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for stream in listener.incoming() {
                if tally.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let n = tally.accepted.fetch_add(1, Ordering::SeqCst);
                tally.open.fetch_add(1, Ordering::SeqCst);
                let (serve, tally) = (serve.clone(), tally.clone());
                thread::spawn(move || {
                    if let Held::Closed = serve(stream, n, &tally) {
                        tally.open.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        server
    }

    pub(crate) fn assert_all_closed(&self, what: &str) {
        wait_until(what, || self.tally.open.load(Ordering::SeqCst) == 0);
    }
}

impl Drop for HandServer {
    fn drop(&mut self) {
        self.tally.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop to see the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Reads until EOF or an error.
pub(crate) fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// What a raw start API does with each request.
pub(crate) enum ApiFault {
    /// 200, JSON, with its Content-Length, the body one byte a second.
    Trickle(Vec<u8>),
    /// 200, `size` bytes of text, with or without a Content-Length.
    Huge { size: u64, with_length: bool },
    /// One (status, body) per request, as text/plain, in order.
    Replies(Vec<(u16, Vec<u8>)>),
}

/// An HTTP/1.1 server written by hand, for answers no HTTP library would send.
pub(crate) struct RawApi {
    server: HandServer,
}

impl RawApi {
    pub(crate) fn serve(fault: ApiFault) -> RawApi {
        let server = HandServer::start(move |stream, n, tally| {
            answer(stream, &fault, n, &tally.written, &tally.stop);
            Held::Closed
        });
        RawApi { server }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/start", self.server.addr)
    }

    pub(crate) fn requests(&self) -> usize {
        self.server.tally.accepted.load(Ordering::SeqCst)
    }

    pub(crate) fn written(&self) -> u64 {
        self.server.tally.written.load(Ordering::SeqCst)
    }

    /// The proxy closed every connection it made to the API (the server's writes then fail).
    pub(crate) fn assert_all_closed(&self) {
        self.server
            .assert_all_closed("the proxy to close its connections to the API");
    }
}

pub(crate) fn answer(
    mut stream: TcpStream,
    fault: &ApiFault,
    n: usize,
    written: &AtomicU64,
    stop: &AtomicBool,
) {
    // The request: headers, then Content-Length bytes of body.
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0u8; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let mut send = |bytes: &[u8]| -> bool {
        let ok = stream.write_all(bytes).is_ok();
        if ok {
            written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
        }
        ok
    };
    match fault {
        ApiFault::Trickle(body) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if !send(head.as_bytes()) {
                return;
            }
            for byte in body {
                // The API's pace, not a synchronisation.
                thread::sleep(Duration::from_secs(1));
                if stop.load(Ordering::SeqCst) || !send(&[*byte]) {
                    return;
                }
            }
        }
        ApiFault::Huge { size, with_length } => {
            let length = if *with_length {
                format!("Content-Length: {size}\r\n")
            } else {
                String::new()
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{length}Connection: close\r\n\r\n"
            );
            if !send(head.as_bytes()) {
                return;
            }
            let chunk = vec![b'7'; 64 * 1024];
            let mut sent = 0;
            while sent < *size && !stop.load(Ordering::SeqCst) {
                if !send(&chunk) {
                    return;
                }
                sent += chunk.len() as u64;
            }
        }
        ApiFault::Replies(replies) => {
            let (status, body) = &replies[n.min(replies.len() - 1)];
            let reason = if *status == 200 { "OK" } else { "Forbidden" };
            let head = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = send(head.as_bytes()) && send(body);
        }
    }
    // Until the proxy closes its end.
    let _ = stream.shutdown(Shutdown::Write);
    drain(&mut stream);
}
