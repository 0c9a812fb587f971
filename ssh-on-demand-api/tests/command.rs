//! The command backend with real scripts: one that prints the address, one that waits so that concurrent
//! starts meet, one that exits 1, one that hangs, one that floods stdout; stop, then kill.

use testkit as common;

use std::{fs, thread};

use common::{
    PATIENCE,
    api_server::{Companion, client, start_body},
    script,
};
use serde_json::json;

fn config(dir: &std::path::Path, start: &str, extra: &str) -> String {
    format!(
        "stop_timeout = \"1s\"\n\
         [backends.scripts]\ntype = \"command\"\ntimeout = \"2s\"\nstart = [\"{}/{start}\", \"{{vm}}\"]\n{extra}\n\
         [profiles.lab]\nbackend = \"scripts\"\nvm = \"dev\"\n\
         [profiles.class]\nbackend = \"scripts\"\nby_client = {{ \"203.0.113.9\" = \"pc-9\" }}\nport = 2222\n",
        dir.display()
    )
}

/// A directory of scripts that outlives the companion started on it.
fn scripts() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    script(
        &dir.path().join("ok"),
        &format!("echo \"$1\" >> {d}/started\necho 127.0.0.1"),
    );
    script(
        &dir.path().join("json"),
        r#"echo '{"vm_ip": "2001:db8::7", "port": 22}'"#,
    );
    script(
        &dir.path().join("fails"),
        "echo 'starting domain' >&2\necho \"error: not enough memory to start domain '$1'\" >&2\nexit 1",
    );
    script(
        &dir.path().join("hangs"),
        &format!("sleep 1000 &\necho $! > {d}/sleeper\nwait"),
    );
    script(&dir.path().join("floods"), "exec cat /dev/zero");
    // Waits until the test writes to the fifo, so that concurrent starts are in flight together.
    script(
        &dir.path().join("gated"),
        &format!("echo \"$1\" >> {d}/started\nread line < {d}/gate\necho 127.0.0.1"),
    );
    dir
}

#[test]
fn start_answers_what_the_script_prints_and_needs_the_token() {
    let dir = scripts();
    let api = Companion::start(&config(dir.path(), "ok", ""), &[]);
    let reply = api.start_vm("lab");
    assert_eq!(reply.vm_ip(), "127.0.0.1");
    assert_eq!(reply.body["port"], 22);
    assert_eq!(
        fs::read_to_string(dir.path().join("started")).unwrap(),
        "dev\n"
    );

    let refused = api.post_with(
        &client(),
        "/start",
        start_body("lab", "203.0.113.9"),
        Some("wrong"),
    );
    assert_eq!(refused.status, 401, "{refused:?}");
    let refused = api.post_with(&client(), "/start", start_body("lab", "203.0.113.9"), None);
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(refused.error().contains("bearer token"), "{refused:?}");
    // The token never reaches the log.
    assert!(!api.log.lines().iter().any(|l| l.contains(&api.token)));

    let unknown = api.start_vm("gpu");
    assert_eq!(
        (unknown.status, unknown.error()),
        (404, "there is no VM profile named \"gpu\"")
    );
}

#[test]
fn json_output_and_the_vm_from_the_client_table() {
    let dir = scripts();
    let api = Companion::start(&config(dir.path(), "json", ""), &[]);
    let reply = api.start_vm("class");
    assert_eq!(reply.vm_ip(), "2001:db8::7");
    assert_eq!(reply.body["port"], 2222);
    let stranger = api.post("/start", start_body("class", "198.51.100.1"));
    assert_eq!(stranger.status, 404, "{stranger:?}");
    assert!(
        stranger.error().contains("no VM for client 198.51.100.1"),
        "{stranger:?}"
    );
}

#[test]
fn concurrent_starts_run_the_start_command_once() {
    let dir = scripts();
    let gate = dir.path().join("gate");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&gate)
            .status()
            .unwrap()
            .success()
    );
    let api = Companion::start(&config(dir.path(), "gated", ""), &[]);
    let replies: Vec<_> = thread::scope(|s| {
        let asks: Vec<_> = (0..4).map(|_| s.spawn(|| api.start_vm("lab"))).collect();
        // All four are in: one runs the command, three joined it.
        api.log.wait_until(PATIENCE, |lines| {
            (lines
                .iter()
                .filter(|l| l.contains("joining the start already under way"))
                .count()
                == 3)
                .then_some(())
        });
        fs::write(&gate, "go\n").unwrap();
        asks.into_iter().map(|a| a.join().unwrap()).collect()
    });
    for reply in replies {
        assert_eq!(reply.vm_ip(), "127.0.0.1");
    }
    assert_eq!(
        fs::read_to_string(dir.path().join("started")).unwrap(),
        "dev\n"
    );
}

#[test]
fn a_failing_script_gives_its_last_stderr_line_and_is_not_retried() {
    let dir = scripts();
    let api = Companion::start(&config(dir.path(), "fails", ""), &[]);
    let reply = api.start_vm("lab");
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(
        reply.error(),
        "error: not enough memory to start domain 'dev'"
    );
}

#[test]
fn a_hanging_script_is_ended_with_what_it_started() {
    let dir = scripts();
    let api = Companion::start(&config(dir.path(), "hangs", ""), &[]);
    let reply = api.start_vm("lab");
    assert_eq!(reply.status, 504, "{reply:?}");
    assert_eq!(
        reply.error(),
        "the start command did not finish within 2s; it was ended"
    );
    // The sleep it left running in its process group was killed too (gone, or a zombie awaiting init).
    let pid = fs::read_to_string(dir.path().join("sleeper")).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = std::time::Instant::now() + PATIENCE;
    while fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the command's child survived"
        );
        thread::yield_now();
    }
}

#[test]
fn a_flooding_script_is_ended_at_the_output_cap() {
    let dir = scripts();
    let api = Companion::start(&config(dir.path(), "floods", ""), &[]);
    let reply = api.start_vm("lab");
    assert_eq!(reply.status, 409, "{reply:?}");
    assert_eq!(
        reply.error(),
        "the start command printed more than 65536 bytes; it was ended"
    );
}

#[test]
fn stop_runs_the_stop_command_then_kill_when_it_hangs() {
    let dir = scripts();
    let d = dir.path().display();
    script(
        &dir.path().join("stop-ok"),
        &format!("echo \"$1\" >> {d}/stopped"),
    );
    script(&dir.path().join("stop-hangs"), "exec sleep 1000");
    script(
        &dir.path().join("kill"),
        &format!("echo \"$1\" >> {d}/killed"),
    );

    let graceful =
        format!("stop = [\"{d}/stop-ok\", \"{{vm}}\"]\nkill = [\"{d}/kill\", \"{{vm}}\"]");
    let api = Companion::start(&config(dir.path(), "ok", &graceful), &[]);
    assert_eq!(api.stop_vm("lab", "127.0.0.1").status, 202);
    // The VM's name is in the message itself, which is all `journalctl -t ssh-on-demand-api` shows.
    api.log.wait_for(PATIENCE, |l| {
        l.contains("dev: stop: off after a graceful shutdown")
    });
    assert_eq!(
        fs::read_to_string(dir.path().join("stopped")).unwrap(),
        "dev\n"
    );
    assert!(!dir.path().join("killed").exists());
    drop(api);

    let hanging =
        format!("stop = [\"{d}/stop-hangs\", \"{{vm}}\"]\nkill = [\"{d}/kill\", \"{{vm}}\"]");
    let api = Companion::start(&config(dir.path(), "ok", &hanging), &[]);
    assert_eq!(api.stop_vm("lab", "127.0.0.1").status, 202);
    api.log
        .wait_for(PATIENCE, |l| l.contains("dev: stop: forced off"));
    assert_eq!(
        fs::read_to_string(dir.path().join("killed")).unwrap(),
        "dev\n"
    );
    assert!(
        api.log
            .lines()
            .iter()
            .any(|l| l.contains("the stop command did not finish within 1s"))
    );
}

#[test]
fn serves_http_on_a_unix_socket() {
    let dir = scripts();
    let (api, socket) = Companion::start_on_unix_socket(&config(dir.path(), "ok", ""));
    let unix = reqwest::blocking::Client::builder()
        .unix_socket(socket)
        .timeout(PATIENCE)
        .build()
        .unwrap();
    let reply = api.post_with(
        &unix,
        "/start",
        start_body("lab", "203.0.113.9"),
        Some(&api.token),
    );
    assert_eq!(reply.vm_ip(), "127.0.0.1");
    let stop = api.post_with(
        &unix,
        "/stop",
        json!({"vm_ip": "127.0.0.1", "profile": "lab"}),
        Some(&api.token),
    );
    assert_eq!(stop.status, 409, "no stop command is configured: {stop:?}");
}

/// Scripts that keep a "VM" state in files: `start` boots (prints a plain address), `suspend` saves,
/// `resume` restores or fails as the test says (a file `resume-fails` holding QEMU-like words).
fn suspending_scripts() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    script(
        &dir.path().join("start"),
        &format!("echo \"start $1\" >> {d}/log\necho 127.0.0.1"),
    );
    script(
        &dir.path().join("stop"),
        &format!("echo \"stop $1\" >> {d}/log"),
    );
    script(
        &dir.path().join("suspend"),
        &format!(
            "echo \"suspend $1\" >> {d}/log\n\
             if [ -e {d}/suspend-fails ]; then cat {d}/suspend-fails >&2; exit 1; fi"
        ),
    );
    script(
        &dir.path().join("resume"),
        &format!(
            "echo \"resume $1\" >> {d}/log\n\
             if [ -e {d}/resume-fails ]; then cat {d}/resume-fails >&2; exit 1; fi\n\
             echo '{{\"vm_ip\": \"127.0.0.1\", \"how\": \"resumed\"}}'"
        ),
    );
    dir
}

fn suspending_config(dir: &std::path::Path, profile: &str) -> String {
    let d = dir.display();
    format!(
        "stop_timeout = \"5s\"\n\
         [backends.scripts]\ntype = \"command\"\nstart = [\"{d}/start\", \"{{vm}}\"]\nstop = [\"{d}/stop\", \"{{vm}}\"]\n\
         suspend = [\"{d}/suspend\", \"{{vm}}\"]\nresume = [\"{d}/resume\", \"{{vm}}\"]\n\
         [profiles.lab]\nbackend = \"scripts\"\nvm = \"dev\"\nstop_mode = \"suspend\"\n{profile}\n"
    )
}

fn script_log(dir: &std::path::Path) -> String {
    fs::read_to_string(dir.join("log")).unwrap_or_default()
}

#[test]
fn a_suspended_vm_is_resumed_by_the_next_start() {
    let dir = suspending_scripts();
    let api = Companion::start(&suspending_config(dir.path(), ""), &[]);
    // The start command printed a plain address: it ran, and did not say whether it booted.
    let first = api.start_vm("lab");
    assert_eq!(first.how(), "started");
    assert!(first.body["ms"].is_u64(), "{first:?}");

    assert_eq!(
        api.stop_vm("lab", "127.0.0.1").stop_status(),
        (202, "suspending")
    );
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: suspended"));
    // Suspended now: a second stop has nothing to do.
    assert_eq!(
        api.stop_vm("lab", "127.0.0.1").stop_status(),
        (200, "suspended")
    );

    let resumed = api.start_vm("lab");
    assert_eq!((resumed.vm_ip(), resumed.how()), ("127.0.0.1", "resumed"));
    assert!(resumed.body["ms"].is_u64(), "{resumed:?}");
    let record = api.log.wait_for(PATIENCE, |l| {
        l.contains("start answered with the address") && l.contains("HOW=\"resumed\"")
    });
    assert!(record.contains("RESUME_MS="), "{record}");
    // Running again: the next start runs the start command, which is idempotent.
    assert_eq!(api.start_vm("lab").how(), "started");
    assert_eq!(
        script_log(dir.path()),
        "start dev\nsuspend dev\nresume dev\nstart dev\n"
    );
}

#[test]
fn a_failed_resume_is_reported_or_followed_by_a_boot() {
    let dir = suspending_scripts();
    fs::write(
        dir.path().join("resume-fails"),
        "qemu-system-x86_64: load of migration failed: Invalid argument\n",
    )
    .unwrap();
    let api = Companion::start(&suspending_config(dir.path(), ""), &[]);
    api.start_vm("lab").vm_ip();
    api.stop_vm("lab", "127.0.0.1");
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: suspended"));
    let failed = api.start_vm("lab");
    assert_eq!(
        (failed.status, failed.error()),
        (
            409,
            "qemu-system-x86_64: load of migration failed: Invalid argument"
        )
    );
    // The kept state is worth another try: the next start resumes again.
    assert_eq!(api.start_vm("lab").status, 409);
    assert_eq!(
        script_log(dir.path()),
        "start dev\nsuspend dev\nresume dev\nresume dev\n"
    );
    drop(api);

    fs::remove_file(dir.path().join("log")).unwrap();
    let api = Companion::start(
        &suspending_config(dir.path(), "if_resume_fails = \"boot\""),
        &[],
    );
    api.start_vm("lab").vm_ip();
    api.stop_vm("lab", "127.0.0.1");
    api.log
        .wait_for(PATIENCE, |l| l.contains("stop: suspended"));
    let booted = api.start_vm("lab");
    assert_eq!((booted.vm_ip(), booted.how()), ("127.0.0.1", "booted"));
    let warning = api.log.wait_for(PATIENCE, |l| l.contains("resume failed"));
    assert!(warning.contains("load of migration failed"), "{warning}");
    assert_eq!(
        script_log(dir.path()),
        "start dev\nsuspend dev\nresume dev\nstart dev\n"
    );
}

#[test]
fn a_failed_suspend_is_reported_or_followed_by_a_shutdown() {
    let dir = suspending_scripts();
    fs::write(
        dir.path().join("suspend-fails"),
        "migration failed: no space left on device\n",
    )
    .unwrap();
    let api = Companion::start(&suspending_config(dir.path(), ""), &[]);
    // A command's suspend lasts as long as the save: the proxy hears at once, the outcome is logged.
    assert_eq!(
        api.stop_vm("lab", "127.0.0.1").stop_status(),
        (202, "suspending")
    );
    let error = api.log.wait_for(PATIENCE, |l| l.contains("suspend failed"));
    assert!(error.contains("no space left on device"), "{error}");
    assert!(!script_log(dir.path()).contains("stop dev"));
    drop(api);

    fs::remove_file(dir.path().join("log")).unwrap();
    let api = Companion::start(
        &suspending_config(dir.path(), "if_suspend_fails = \"shutdown\""),
        &[],
    );
    assert_eq!(
        api.stop_vm("lab", "127.0.0.1").stop_status(),
        (202, "suspending")
    );
    api.log.wait_for(PATIENCE, |l| {
        l.contains("stop: off after a graceful shutdown")
    });
    assert!(api.count("shutting it down instead") == 1);
    assert_eq!(script_log(dir.path()), "suspend dev\nstop dev\n");
    // Shut down, not suspended: the next start boots.
    assert_eq!(api.start_vm("lab").how(), "started");
}
