//! Keep-warm windows, the start ahead of logins at a window's start, and `min_run_time`, in both modes:
//! real sshd "VMs", a real HTTP start/stop API, the real ssh client, and the sweep as its timer runs it.

use testkit as common;
use testkit::both_modes;

use std::{thread, time::Duration};

use common::{
    PATIENCE,
    api::StartApi,
    proxy::{Mode, Proxy, ProxyBuilder},
    ssh::assert_echo,
    vm::Vm,
};
use serde_json::Value;

const BOOT_TIME: Duration = Duration::from_millis(300);
const IDLE: Duration = Duration::from_millis(1500);
/// A window that covers every moment: the tests run whenever CI does.
const ALWAYS: &str = "daily 00:00-24:00 UTC";

fn with_stop(mode: Mode, api: &StartApi) -> ProxyBuilder {
    Proxy::builder_in(mode, &api.url()).args([
        format!("--stop-url={}", api.stop_url()),
        format!("--idle-timeout={}ms", IDLE.as_millis()),
    ])
}

fn vm_status(proxy: &Proxy) -> Value {
    let status = proxy.status();
    status["vms"][0].clone()
}

both_modes! {
    /// Inside a keep-warm window an idle VM is not stopped, and `status` says until when it is kept.
    fn an_idle_vm_is_kept_inside_a_keep_warm_window(mode) {
        let vm = Vm::new();
        let api = StartApi::lab(&vm, BOOT_TIME);
        let proxy = with_stop(mode, &api).arg(format!("--keep-warm={ALWAYS}")).start();
        assert_echo(proxy.addr, &vm.client_key(), "in");
        proxy.wait_for_summary(1);
        thread::sleep(IDLE * 3); // the time under test: far past the idle timeout
        assert!(api.requests_to("/stop").is_empty(), "stopped inside a keep-warm window");
        let status = vm_status(&proxy);
        assert_eq!(status["state"], "idle", "{status:#}");
        assert!(status["kept_warm_until"].is_u64(), "{status:#}");
        assert!(status["stop_due"].as_u64() >= status["kept_warm_until"].as_u64(), "{status:#}");
        assert!(vm.is_up());
    }

    /// A VM is not stopped sooner than min_run_time after its start, however soon it is idle.
    fn min_run_time_holds_the_stop(mode) {
        const MIN_RUN: Duration = Duration::from_secs(5);
        let vm = Vm::new();
        let api = StartApi::lab(&vm, BOOT_TIME);
        let proxy = with_stop(mode, &api)
            .arg(format!("--min-run-time={}ms", MIN_RUN.as_millis()))
            .start();
        assert_echo(proxy.addr, &vm.client_key(), "in");
        let started = api.requests_to("/start")[0].at;
        let stop = &api.wait_for_requests_to("/stop", 1, PATIENCE)[0];
        let ran = stop.at.duration_since(started);
        assert!(ran >= MIN_RUN, "stopped {ran:?} after its start");
    }
}

/// With pre_wake, the sweep starts a profile's VM at a window's start, once per window, with no client in
/// the request; the first login then finds it up.
#[test]
fn pre_wake_starts_the_vm_ahead_of_the_first_login() {
    let vm = Vm::new();
    let api = StartApi::lab(&vm, BOOT_TIME);
    let proxy = with_stop(Mode::Activated, &api)
        .args([
            format!("--keep-warm={ALWAYS}"),
            "--pre-wake=true".to_owned(),
            "--vm-scope=profile".to_owned(),
        ])
        .start();
    proxy.sweep();
    let start = &api.wait_for_requests_to("/start", 1, PATIENCE)[0];
    let body = start.json();
    assert_eq!(body["reason"], "pre_wake", "{body}");
    assert!(body.get("client_addr").is_none(), "{body}");
    proxy.sweep();
    assert_eq!(api.requests_to("/start").len(), 1, "once per window");
    assert_eq!(vm_status(&proxy)["state"], "idle");

    assert_echo(proxy.addr, &vm.client_key(), "warm");
    assert_eq!(vm.connections(), 1);
}
