//! The VM's life across connections, in both modes: one start call for a burst of logins, the idle stop and
//! its rules, processes killed in the middle, profiles on two ports, and `status`. Real sshd "VMs", a real
//! HTTP start/stop API, the real ssh client.

use testkit as common;
use testkit::both_modes;

use std::{
    fs,
    process::Command,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use common::{
    PATIENCE,
    api::{Answer, StartApi},
    proxy::{Mode, Proxy, ProxyBuilder, binary, found_its_vm},
    ssh::{Burst, Session, assert_echo, run, ssh},
    vm::Vm,
};
use serde_json::{Value, json};

const BOOT_TIME: Duration = Duration::from_millis(300);
/// Short, so that the tests of the idle stop take seconds; every rule is checked against it, not a clock.
const IDLE: Duration = Duration::from_millis(1500);

/// A proxy whose VMs are stopped through `api` after `IDLE`.
fn with_stop(mode: Mode, api: &StartApi) -> ProxyBuilder {
    Proxy::builder_in(mode, &api.url()).args([
        format!("--stop-url={}", api.stop_url()),
        format!("--idle-timeout={}ms", IDLE.as_millis()),
    ])
}

/// Logs in from `source` (a 127.x address) and holds the session open.
fn open(proxy: &Proxy, vm: &Vm, source: &str) -> Session {
    Session::open(proxy.addr, &vm.client_key(), &["-b", source])
}

fn vm_status(proxy: &Proxy) -> Value {
    let status = proxy.status();
    let vms = status["vms"].as_array().unwrap().clone();
    assert_eq!(vms.len(), 1, "{status:#}");
    vms[0].clone()
}

both_modes! {
    /// 50 logins from one address while the VM boots: one start call, 50 sessions.
    fn burst_of_logins_makes_one_start_call(mode) {
        const LOGINS: usize = 50;
        let vm = Vm::new();
        let api = StartApi::pointing_at(&vm); // answers at once; the VM "boots" when the test says
        let proxy = Proxy::builder_in(mode, &api.url())
            .args(["--max-sessions-per-source=200", "--boot-timeout=5m", "--log-level=info"])
            .start();
        let logins = Burst::start(LOGINS, &vm.client_key(), PATIENCE * 4, |_| proxy.addr);
        // Every connection has its address: one from the start API, all others from that start.
        proxy.log.wait_until(PATIENCE * 4, |lines| {
            (lines.iter().filter(|l| found_its_vm(l)).count() == LOGINS).then_some(())
        });
        assert_eq!(vm_status(&proxy)["sessions"].as_array().unwrap().len(), LOGINS);
        vm.start();
        logins.assert_all_in();
        assert_eq!(api.requests_to("/start").len(), 1);
        proxy.wait_for_summary(LOGINS);
        let status = vm_status(&proxy);
        assert_eq!(status["starts"], 1);
        assert_eq!(status["state"], "idle", "{status:#}"); // up, and nobody logged in any more
    }
}

/// Two clients, 127.0.0.1 and 127.0.0.2, log in while the VM boots. Returns the start calls made.
fn two_clients_during_a_boot(mode: Mode, scope: &str) -> usize {
    let vm = Vm::new();
    let api = StartApi::pointing_at(&vm);
    let proxy = Proxy::builder_in(mode, &api.url())
        .arg(format!("--vm-scope={scope}"))
        .start();
    let first = {
        let (addr, key) = (proxy.addr, vm.client_key());
        thread::spawn(move || run(ssh(addr, &key).args(["-b", "127.0.0.1", "true"]), PATIENCE))
    };
    proxy
        .log
        .wait_for(PATIENCE, |l| l.contains("start API answered"));
    let second = {
        let (addr, key) = (proxy.addr, vm.client_key());
        thread::spawn(move || run(ssh(addr, &key).args(["-b", "127.0.0.2", "true"]), PATIENCE))
    };
    proxy.log.wait_until(PATIENCE, |lines| {
        let got = lines.iter().filter(|l| found_its_vm(l)).count();
        (got == 2).then_some(())
    });
    vm.start();
    for login in [first, second] {
        let output = login.join().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    api.requests_to("/start").len()
}

both_modes! {
    /// By default, a VM per client address: an API that picks VMs per client is never given another's.
    fn clients_from_two_addresses_each_start_their_vm(mode) {
        assert_eq!(two_clients_during_a_boot(mode, "client"), 2);
    }

    /// `vm_scope = "profile"`: one VM for all, so one start for all.
    fn with_one_vm_per_profile_two_addresses_share_one_start(mode) {
        assert_eq!(two_clients_during_a_boot(mode, "profile"), 1);
    }
}

both_modes! {
    /// The idle clock starts when the last session ends, however long it was open; the VM is stopped once,
    /// and `status` and the journal tell each step.
    fn idle_vm_is_stopped_after_the_last_logout(mode) {
        let vm = Vm::new();
        let api = StartApi::lab(&vm, BOOT_TIME);
        let proxy = with_stop(mode, &api).start();

        let long = open(&proxy, &vm, "127.0.0.1");
        let short = open(&proxy, &vm, "127.0.0.1");
        let status = vm_status(&proxy);
        assert_eq!(status["state"], "up");
        assert_eq!(status["sessions"].as_array().unwrap().len(), 2);
        short.close();
        // Open for longer than the idle timeout, and the other session ended long ago: no stop yet.
        thread::sleep(IDLE * 2); // the time under test
        assert!(api.requests_to("/stop").is_empty(), "stopped under a live session");
        let last_logout = long.close();

        let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
        let waited = stops[0].at.duration_since(last_logout);
        assert!(waited >= IDLE, "stopped {waited:?} after the last logout");
        let body = stops[0].json();
        assert_eq!(body["vm_ip"], vm.ip().to_string());
        assert_eq!(body["client_addr"], "127.0.0.1");
        assert!(body["idle_seconds"].as_u64().is_some());
        proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="stopped""#));
        assert!(!vm.is_up());
        let status = vm_status(&proxy);
        assert_eq!(status["state"], "stopped", "{status:#}");
        assert_eq!(status["stops"], 1);
        assert_eq!(status["last_stop"]["ok"], true);
        assert_eq!(api.requests_to("/stop").len(), 1);

        // Stopped is not the end: the next login starts it again.
        assert_echo(proxy.addr, &vm.client_key(), "again");
        assert_eq!(api.requests_to("/start").len(), 3);
    }
}

both_modes! {
    /// A login while the VM waits out its idle timeout cancels the stop; the clock restarts at its logout.
    fn login_during_the_idle_wait_keeps_the_vm(mode) {
        let vm = Vm::new();
        let api = StartApi::lab(&vm, BOOT_TIME);
        let proxy = with_stop(mode, &api).start();

        open(&proxy, &vm, "127.0.0.1").close();
        proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="idle""#));
        let second = open(&proxy, &vm, "127.0.0.1");
        // The login says at once that it called the stop off, not only the waiter when it wakes.
        let kept = proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="kept""#));
        assert!(kept.contains("a login came during the idle wait"), "{kept}");
        thread::sleep(IDLE * 2); // past the first logout's stop time
        assert!(api.requests_to("/stop").is_empty(), "stopped under a live session");
        let logout = second.close();
        let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
        assert!(stops[0].at.duration_since(logout) >= IDLE);
        proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="stopped""#));
        assert_eq!(api.requests_to("/stop").len(), 1);
    }
}

both_modes! {
    /// A VM already in its idle wait follows a change of idle_timeout (the daemon's after a reload): the
    /// waiter looks at the configuration again and does not stop it by the old one, and `status` tells the
    /// same stop time.
    fn the_idle_wait_follows_a_new_idle_timeout(mode) {
        let vm = Vm::new();
        let api = StartApi::lab(&vm, BOOT_TIME);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.toml");
        let config = |idle: &str| {
            format!("stop_url = \"{}\"\nidle_timeout = \"{idle}\"\n", api.stop_url())
        };
        fs::write(&file, config("3s")).unwrap();
        let proxy = Proxy::builder_in(mode, &api.url())
            .config(file.display().to_string())
            .start();
        open(&proxy, &vm, "127.0.0.1").close();
        proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="idle""#));
        fs::write(&file, config("1h")).unwrap();
        if mode == Mode::Daemon {
            proxy.signal(rustix::process::Signal::HUP);
            proxy.log.wait_for(PATIENCE, |l| l.contains("configuration reloaded"));
        }
        thread::sleep(Duration::from_secs(6)); // twice the old idle timeout: the time under test
        assert!(api.requests_to("/stop").is_empty(), "stopped by the old idle_timeout");
        let output = Command::new(binary())
            .args(["status", "--json"])
            .arg(format!("--config={}", file.display()))
            .arg(format!("--state-dir={}", proxy.state_dir.display()))
            .args(&proxy.args)
            .output()
            .unwrap();
        let status: Value = serde_json::from_slice(&output.stdout).unwrap();
        let due = status["vms"][0]["stop_due"].as_u64().unwrap_or_else(|| panic!("{status:#}"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(due > now + 50 * 60 * 1000, "stop due in {} ms: {status:#}", due - now);
    }
}

both_modes! {
    /// A login while the stop call is in flight waits for it, then starts the VM again and gets in.
    fn login_during_a_stop_waits_for_it_then_starts_again(mode) {
        let vm = Vm::new();
        let (release, released) = mpsc::channel::<()>();
        let (stopping, stop_began) = mpsc::channel::<()>();
        let api = {
            let vm = vm.clone();
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    let _ = stopping.send(());
                    let _ = released.recv_timeout(PATIENCE);
                    vm.stop();
                    return Answer::text("stopped");
                }
                vm.boot_after(BOOT_TIME);
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let proxy = with_stop(mode, &api).start();
        open(&proxy, &vm, "127.0.0.1").close();
        stop_began.recv_timeout(PATIENCE).unwrap();

        let login = {
            let (addr, key) = (proxy.addr, vm.client_key());
            thread::spawn(move || run(ssh(addr, &key).arg("echo in"), PATIENCE))
        };
        // The login has identified and waits at the VM's gate; the stop goes on meanwhile.
        proxy.log.wait_for(PATIENCE, |l| l.contains("waiting for the start or stop in progress"));
        assert_eq!(api.requests_to("/start").len(), 1, "started during the stop");
        let released_at = Instant::now();
        release.send(()).unwrap();

        let output = login.join().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(String::from_utf8_lossy(&output.stdout), "in\n");
        let starts = api.requests_to("/start");
        assert_eq!(starts.len(), 2);
        assert!(starts[1].at >= released_at, "the second start came before the stop ended");
    }
}

both_modes! {
    /// A stop API that fails is retried within stop_timeout, logged, and blocks logins no longer than that;
    /// the VM is tried again after another idle timeout.
    fn failing_stop_api_is_bounded_and_logged(mode) {
        let vm = Vm::new();
        let api = {
            let vm = vm.clone();
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    return Answer::reply(503, "text/plain", "hypervisor busy");
                }
                vm.boot_after(BOOT_TIME);
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let proxy = with_stop(mode, &api).arg("--stop-timeout=2s").start();
        let logout = open(&proxy, &vm, "127.0.0.1").close();
        let failed = proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="stop_failed""#));
        assert!(failed.contains("WARN") && failed.contains("503 Service Unavailable"), "{failed}");
        let stops = api.requests_to("/stop");
        assert!(stops.len() >= 2, "retried: {} calls", stops.len());
        let tried_for = stops.last().unwrap().at.duration_since(stops[0].at);
        assert!(tried_for <= Duration::from_secs(2), "retried for {tried_for:?}");
        assert!(stops[0].at.duration_since(logout) >= IDLE);
        // Still up, as far as anyone knows, and logins work.
        assert_eq!(vm_status(&proxy)["state"], "idle");
        assert_echo(proxy.addr, &vm.client_key(), "still");
    }
}

both_modes! {
    /// A hung stop API holds new logins for at most stop_timeout.
    fn hung_stop_api_holds_logins_no_longer_than_stop_timeout(mode) {
        let vm = Vm::new();
        let api = {
            let vm = vm.clone();
            StartApi::serve(move |request| {
                if request.url == "/stop" {
                    return Answer::Hang;
                }
                vm.boot_after(BOOT_TIME);
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let proxy = with_stop(mode, &api)
            .args(["--stop-timeout=3s", "--api-timeout=1s"])
            .start();
        open(&proxy, &vm, "127.0.0.1").close();
        let stop = api.wait_for_requests_to("/stop", 1, PATIENCE);
        let login = run(ssh(proxy.addr, &vm.client_key()).arg("echo in"), PATIENCE);
        assert!(login.status.success(), "{}", String::from_utf8_lossy(&login.stderr));
        let held = Instant::now().duration_since(stop[0].at);
        assert!(held < Duration::from_secs(3) + Duration::from_secs(2), "login held {held:?}");
        proxy.log.wait_for(PATIENCE, |l| l.contains(r#"decision="stop_failed""#) && l.contains("did not answer"));
    }
}

/// The per-connection process of a session is killed (OOM, an operator): the other session keeps the VM
/// up; once it ends too the VM is stopped; and when the killed one was the last, the sweep (run by a timer)
/// stops it.
#[test]
fn killed_session_process_neither_pins_the_vm_nor_lets_it_stop_under_a_live_session() {
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = with_stop(Mode::Activated, &api).start();

    let victim = open(&proxy, &vm, "127.0.0.1");
    let survivor = open(&proxy, &vm, "127.0.0.1");
    let sessions = vm_status(&proxy)["sessions"].as_array().unwrap().clone();
    let pid = sessions[0]["pid"].as_u64().unwrap() as i32;
    kill(pid);
    victim.wait_closed(PATIENCE);
    thread::sleep(IDLE * 2); // the time under test
    assert!(
        api.requests_to("/stop").is_empty(),
        "stopped under a live session"
    );
    assert_eq!(vm_status(&proxy)["sessions"].as_array().unwrap().len(), 1);
    let logout = survivor.close();
    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    assert!(stops[0].at.duration_since(logout) >= IDLE);

    // Now the last session's process is killed: nobody is left to wait out the idle timeout.
    let victim = open(&proxy, &vm, "127.0.0.1");
    let pid = vm_status(&proxy)["sessions"][0]["pid"].as_u64().unwrap() as i32;
    let killed = Instant::now();
    kill(pid);
    victim.wait_closed(PATIENCE);
    proxy.sweep(); // notes the idle clock from now: the session's end was not recorded
    assert_eq!(vm_status(&proxy)["state"], "idle");
    thread::sleep(IDLE); // the time under test
    proxy.sweep();
    let stops = api.wait_for_requests_to("/stop", 2, PATIENCE);
    assert!(stops[1].at.duration_since(killed) >= IDLE);
    assert_eq!(vm_status(&proxy)["state"], "stopped");
}

/// The daemon is killed with a session open; restarted on the same state, it takes the VM over and stops
/// it once idle.
#[test]
fn restarted_daemon_stops_what_its_killed_predecessor_left() {
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let state = tempfile::tempdir().unwrap();
    let first = with_stop(Mode::Daemon, &api)
        .state_dir(state.path())
        .start();
    let session = open(&first, &vm, "127.0.0.1");
    let killed = Instant::now();
    drop(first); // SIGKILL, sessions and all
    session.wait_closed(PATIENCE);
    let second = with_stop(Mode::Daemon, &api)
        .state_dir(state.path())
        .start();
    let stops = api.wait_for_requests_to("/stop", 1, PATIENCE);
    assert!(stops[0].at.duration_since(killed) >= IDLE);
    // The API has the request before the daemon has its answer and records it.
    second
        .log
        .wait_for(PATIENCE, |l| l.contains(r#"decision="stopped""#));
    assert_eq!(
        common::proxy::status(state.path())["vms"][0]["state"],
        "stopped"
    );
}

both_modes! {
    /// Two profiles on two ports of one host, each with its own VM and APIs, and `status` for both.
    fn two_profiles_on_two_ports(mode) {
        let (lab, ci) = (Vm::new(), Vm::new());
        let (lab_api, ci_api) = (StartApi::lab(&lab, BOOT_TIME), StartApi::lab(&ci, BOOT_TIME));
        let ci_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ci_port = ci_listener.local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                "profile = \"lab\"\n\
                 stop_url = \"{}\"\n\
                 idle_timeout = \"{}ms\"\n\
                 [profiles.ci]\n\
                 ports = [{ci_port}]\n\
                 api_url = \"{}\"\n\
                 stop_url = \"{}\"\n\
                 vm_scope = \"profile\"\n",
                lab_api.stop_url(),
                IDLE.as_millis(),
                ci_api.url(),
                ci_api.stop_url(),
            ),
        )
        .unwrap();
        let proxy = Proxy::builder_in(mode, &lab_api.url())
            .config(config.display().to_string())
            .listener(ci_listener, None)
            .start();
        let ci_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ci_port));
        assert_echo(proxy.addr, &lab.client_key(), "lab");
        assert_echo(ci_addr, &ci.client_key(), "ci");
        assert_eq!(lab_api.requests_to("/start")[0].json()["profile"], "lab");
        assert_eq!(ci_api.requests_to("/start")[0].json()["profile"], "ci");
        let status = proxy.status();
        let keys: Vec<&str> = status["vms"].as_array().unwrap().iter().map(|vm| vm["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["ci", "lab@127.0.0.1"]);
        for api in [&lab_api, &ci_api] {
            let stop = &api.wait_for_requests_to("/stop", 1, PATIENCE)[0];
            assert!(stop.json()["profile"].is_string());
        }
        assert!(ci_api.requests_to("/stop")[0].json().get("client_addr").is_none());
        assert!(!lab.is_up() && !ci.is_up());
    }
}

/// Without a stop_url nothing is ever stopped, and `status` says the VM is idle.
#[test]
fn without_a_stop_url_the_vm_stays_up() {
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = Proxy::start(&api.url());
    assert_echo(proxy.addr, &vm.client_key(), "once");
    proxy.wait_for_summary(1);
    let status = vm_status(&proxy);
    assert_eq!(status["state"], "idle");
    assert!(status["stop_due"].is_null());
    assert!(vm.is_up());
    let text = Command::new(binary())
        .args(["status", "--config=/dev/null"])
        .arg(format!("--state-dir={}", proxy.state_dir.display()))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(&format!("default@127.0.0.1: {}", vm.addr())),
        "{text}"
    );
    assert!(text.contains("state: idle since"), "{text}");
    assert!(
        text.contains("last start: ") && text.contains(" ok, after "),
        "{text}"
    );
}

fn kill(pid: i32) {
    let pid = rustix::process::Pid::from_raw(pid).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
}

both_modes! {
    /// A warm login asks the running VM's sshd while the start API answers, so that the API's latency hides
    /// behind sshd's: here the API answers only once sshd has seen the login's connection.
    fn warm_login_reaches_sshd_while_the_api_answers(mode) {
        let vm = Vm::new();
        let api = {
            let vm = vm.clone();
            let mut logins = 0;
            StartApi::serve(move |_| {
                logins += 1;
                if logins == 1 {
                    vm.boot_after(BOOT_TIME);
                } else {
                    let log = vm.log().expect("the VM runs");
                    log.wait_until(PATIENCE, |lines| {
                        let connections = lines.iter().filter(|l| l.contains("Connection from")).count();
                        (connections == logins).then_some(())
                    });
                }
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let proxy = Proxy::start_in(mode, &api.url());
        assert_echo(proxy.addr, &vm.client_key(), "cold");
        assert_echo(proxy.addr, &vm.client_key(), "warm");
        assert_eq!(vm.connections(), 2, "one connection per login");
    }

    /// When the start API answers another address than the VM that ran, the login goes there.
    fn warm_login_follows_the_api_to_another_vm(mode) {
        let (first, second) = (Vm::new(), Vm::new());
        first.start();
        second.start();
        let api = {
            let (first, second) = (first.clone(), second.clone());
            let mut logins = 0;
            StartApi::serve(move |_| {
                logins += 1;
                let vm = if logins == 1 { &first } else { &second };
                Answer::json(json!({ "vm_ip": vm.ip().to_string() }))
            })
        };
        let proxy = Proxy::start_in(mode, &api.url());
        assert_echo(proxy.addr, &first.client_key(), "first");
        // The VMs share no key: only the second VM lets this login in.
        assert_echo(proxy.addr, &second.client_key(), "second");
        assert_eq!(second.connections(), 1);
    }
}
