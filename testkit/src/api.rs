//! The start API: a real HTTP server on 127.0.0.1 whose answers each test scripts.

use std::{
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use tiny_http::{Header, Response, Server};

/// One request as the API received it.
#[derive(Debug, Clone)]
pub struct Request {
    /// When it arrived (before the handler ran).
    pub at: Instant,
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("the request body is JSON")
    }
}

/// What the API does with a request.
pub enum Answer {
    Reply {
        status: u16,
        content_type: &'static str,
        body: String,
    },
    /// A redirect to `location`, relative to the API's URL.
    Redirect { location: String },
    /// Never answers (until the test ends): a hung API.
    Hang,
}

impl Answer {
    pub fn json(body: serde_json::Value) -> Answer {
        Answer::reply(200, "application/json", body.to_string())
    }

    pub fn text(body: impl Into<String>) -> Answer {
        Answer::reply(200, "text/plain", body)
    }

    pub fn reply(status: u16, content_type: &'static str, body: impl Into<String>) -> Answer {
        Answer::Reply {
            status,
            content_type,
            body: body.into(),
        }
    }
}

type Handler = Box<dyn FnMut(&Request) -> Answer + Send>;

pub struct StartApi {
    server: Arc<Server>,
    port: u16,
    seen: Arc<(Mutex<Vec<Request>>, Condvar)>,
    thread: Option<thread::JoinHandle<()>>,
}

impl StartApi {
    /// Serves every request with `handler`, in order.
    pub fn serve(handler: impl FnMut(&Request) -> Answer + Send + 'static) -> StartApi {
        let server = Arc::new(Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen: Arc<(Mutex<Vec<Request>>, Condvar)> = Arc::default();
        let thread = {
            let (server, seen) = (server.clone(), seen.clone());
            let mut handler: Handler = Box::new(handler);
            thread::spawn(move || {
                let mut hung = Vec::new();
                while let Ok(mut incoming) = server.recv() {
                    let mut body = String::new();
                    let _ = incoming.as_reader().read_to_string(&mut body);
                    let request = Request {
                        at: Instant::now(),
                        method: incoming.method().to_string(),
                        url: incoming.url().to_owned(),
                        headers: incoming
                            .headers()
                            .iter()
                            .map(|h| (h.field.to_string(), h.value.to_string()))
                            .collect(),
                        body,
                    };
                    let answer = handler(&request);
                    {
                        let (requests, changed) = &*seen;
                        requests.lock().unwrap().push(request);
                        changed.notify_all();
                    }
                    match answer {
                        Answer::Reply {
                            status,
                            content_type,
                            body,
                        } => {
                            let header = Header::from_bytes("Content-Type", content_type).unwrap();
                            let response = Response::from_string(body)
                                .with_status_code(status)
                                .with_header(header);
                            let _ = incoming.respond(response);
                        }
                        Answer::Redirect { location } => {
                            let header = Header::from_bytes("Location", location).unwrap();
                            let response = Response::empty(307).with_header(header);
                            let _ = incoming.respond(response);
                        }
                        // Held, unanswered, until the server stops.
                        Answer::Hang => hung.push(incoming),
                    }
                }
            })
        };
        StartApi {
            server,
            port,
            seen,
            thread: Some(thread),
        }
    }

    /// Answers every request with the VM's address as JSON, and boots the VM after `boot_time`.
    pub fn booting(vm: &super::vm::Vm, boot_time: Duration) -> StartApi {
        let vm = vm.clone();
        StartApi::serve(move |_| {
            vm.boot_after(boot_time);
            Answer::json(
                serde_json::json!({ "vm_ip": vm.ip().to_string(), "port": vm.addr().port() }),
            )
        })
    }

    /// Answers every request with `vm`'s address as JSON, and boots nothing: `vm` is up, or never will be.
    pub fn pointing_at(vm: &super::vm::Vm) -> StartApi {
        let ip = vm.ip().to_string();
        StartApi::serve(move |_| Answer::json(serde_json::json!({ "vm_ip": ip })))
    }

    /// Answers `/start` with `vm`'s address, booting it after `boot_time`, and `/stop` by stopping it: a
    /// hypervisor in a few lines.
    pub fn lab(vm: &super::vm::Vm, boot_time: Duration) -> StartApi {
        let vm = vm.clone();
        StartApi::serve(move |request| {
            if request.url == "/stop" {
                vm.stop();
                return Answer::text("stopped");
            }
            vm.boot_after(boot_time);
            Answer::json(
                serde_json::json!({ "vm_ip": vm.ip().to_string(), "port": vm.addr().port() }),
            )
        })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/start", self.port)
    }

    pub fn stop_url(&self) -> String {
        format!("http://127.0.0.1:{}/stop", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.0.lock().unwrap().clone()
    }

    /// The requests to `path` (`/start`, `/stop`) so far.
    pub fn requests_to(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.url == path)
            .collect()
    }

    /// Waits until `n` requests to `path` have arrived; panics after `limit`.
    pub fn wait_for_requests_to(&self, path: &str, n: usize, limit: Duration) -> Vec<Request> {
        let deadline = Instant::now() + limit;
        let (requests, changed) = &*self.seen;
        let mut guard = requests.lock().unwrap();
        loop {
            let matching: Vec<Request> = guard.iter().filter(|r| r.url == path).cloned().collect();
            if matching.len() >= n {
                return matching;
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("{} requests to {path}, expected {n}", matching.len()));
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Waits until `n` requests have arrived; panics after `limit`.
    pub fn wait_for_requests(&self, n: usize, limit: Duration) -> Vec<Request> {
        let deadline = Instant::now() + limit;
        let (requests, changed) = &*self.seen;
        let mut guard = requests.lock().unwrap();
        while guard.len() < n {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("{} requests, expected {n}", guard.len()));
            guard = changed.wait_timeout(guard, left).unwrap().0;
        }
        guard.clone()
    }
}

impl Drop for StartApi {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
