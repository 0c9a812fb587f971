//! Issue 18 on a real VM: a Debian kernel with busybox and dropbear under QEMU (TCG), booted, suspended and
//! resumed by the companion's command backend (tests/guest/qemu-vm: QEMU's migration to a file, restored
//! with -incoming), and logged into through the real proxy both times. The first run fetches and builds the
//! guest (tests/guest/build, cached under target/guest).

use testkit as common;

use std::time::{Duration, Instant};

use common::{
    companion::Companion,
    guest::Guest,
    proxy::Proxy,
    ssh::{run, ssh},
};

/// A cold boot under TCG takes seconds here, and may take a minute on a loaded machine.
const LOGIN_LIMIT: Duration = Duration::from_secs(180);
/// A suspend writes the guest's memory (128 MiB, about half of it in use) to a file.
const SUSPEND_LIMIT: Duration = Duration::from_secs(90);

#[test]
fn cold_boot_then_suspend_then_resume_with_a_login_through_the_proxy() {
    let guest = Guest::prepare();
    let api = Companion::start(
        &format!(
            "stop_timeout = \"60s\"\n{}\n[profiles.lab]\nbackend = \"qemu\"\nvm = \"{}\"\nport = {}\n\
             stop_mode = \"suspend\"\n",
            guest.backend(),
            guest.vm(),
            guest.port
        ),
        &[],
    );
    let proxy = Proxy::builder(&api.start_url())
        .args([
            "--stop-url",
            &api.stop_url(),
            "--idle-timeout",
            "1s",
            "--profile",
            "lab",
            "--boot-timeout",
            "170s",
        ])
        .arg(format!("--api-token-file={}", api.token_file.display()))
        .start();

    let began = Instant::now();
    let cold = run(
        ssh(proxy.addr, &guest.key).arg("cat /proc/uptime; exit 3"),
        LOGIN_LIMIT,
    );
    let cold_login = began.elapsed();
    assert_eq!(
        cold.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&cold.stderr)
    );
    api.log.wait_for(LOGIN_LIMIT, |l| {
        l.contains("start answered with the address") && l.contains("HOW=\"booted\"")
    });

    // The proxy's idle stop, 1 s after the logout: the companion saves the guest and ends QEMU.
    api.log
        .wait_for(SUSPEND_LIMIT, |l| l.contains("stop: suspended"));

    let began = Instant::now();
    let warm = run(
        ssh(proxy.addr, &guest.key).arg("cat /proc/uptime; exit 7"),
        LOGIN_LIMIT,
    );
    let resumed_login = began.elapsed();
    assert_eq!(
        warm.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&warm.stderr)
    );
    let record = api.log.wait_for(LOGIN_LIMIT, |l| {
        l.contains("start answered with the address") && l.contains("HOW=\"resumed\"")
    });
    // The proxy's record says so too.
    let summary = proxy.wait_for_summary(2);
    assert!(summary.contains(r#"start_how="resumed in "#), "{summary}");
    // The same guest, not a new boot: it has been up since before the suspend.
    let uptime = |out: &[u8]| -> f64 {
        let text = String::from_utf8_lossy(out);
        let first = text.split_whitespace().next().unwrap_or_default();
        first
            .parse()
            .unwrap_or_else(|_| panic!("not /proc/uptime: {text:?}"))
    };
    assert!(
        uptime(&warm.stdout) > uptime(&cold.stdout),
        "the guest booted again: uptime {:?} after {:?}",
        String::from_utf8_lossy(&warm.stdout),
        String::from_utf8_lossy(&cold.stdout)
    );
    eprintln!(
        "login with a cold boot: {cold_login:.1?}; login with a resume: {resumed_login:.1?}; \
         the companion: {record}"
    );
}
