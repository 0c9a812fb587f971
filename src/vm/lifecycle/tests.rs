use super::sweep::FORGET_AFTER;
use super::*;
use crate::{cli::Settings, config::Config};

fn config(dir: &std::path::Path) -> Config {
    let file = dir.join("config.toml");
    std::fs::write(&file, "api_url = \"http://127.0.0.1:9/start\"\n").unwrap();
    Config::resolve(Some(&file), Settings::default(), None).unwrap()
}

/// Writes `state` for the VM of `client` and returns its directory.
fn vm(store: &Store, client: &str, state: &VmState) -> VmDir {
    let key = VmKey {
        profile: "default".into(),
        client: Some(client.parse().unwrap()),
    };
    let dir = store.vm(&key).unwrap();
    dir.try_gate().unwrap().unwrap().write(state).unwrap();
    dir
}

#[tokio::test]
async fn the_sweep_forgets_vms_that_have_not_run_for_a_day() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::new(tmp.path().join("state"));
    let lifecycle = Lifecycle::new(store.clone());
    let long_ago = now_ms() - millis(FORGET_AFTER) - 1;
    let mut old = VmState::default();
    old.enter(Phase::Failed, long_ago);
    let mut recent = VmState::default();
    recent.enter(Phase::Stopped, now_ms());
    let mut running = VmState::default();
    running.enter(Phase::Up, long_ago);
    running.vm = Some("192.0.2.7:22".parse().unwrap());
    vm(&store, "203.0.113.1", &old);
    vm(&store, "203.0.113.2", &recent);
    vm(&store, "203.0.113.3", &running);

    let watches = sweep(&lifecycle, &config(tmp.path()), now_ms()).await;
    assert!(watches.is_empty(), "nothing to stop without a stop_url");
    let left: Vec<String> = store
        .vms()
        .unwrap()
        .iter()
        .map(|d| d.key().to_string())
        .collect();
    assert_eq!(left, ["default@203.0.113.2", "default@203.0.113.3"]);
}

/// A start call that fails for a VM that runs (its other sessions relay) must not make it look stopped:
/// it would then never be stopped when idle.
#[tokio::test]
async fn a_failed_start_of_a_running_vm_leaves_it_running() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = config(tmp.path());
    config.state_dir = tmp.path().join("state");
    let profile = config.default.clone().unwrap();
    let lifecycle = Lifecycle::new(Store::new(&config.state_dir));
    let client: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    let vm: SocketAddr = "192.0.2.7:22".parse().unwrap();

    let first = lifecycle.join(&profile, client).unwrap();
    let (started, shared) = first
        .start(async {
            Ok(Started {
                addr: vm,
                attempts: 1,
            })
        })
        .await
        .unwrap();
    assert_eq!((started.unwrap().addr, shared), (vm, false));
    first.ready();

    let second = lifecycle.join(&profile, client).unwrap();
    let failed = ApiError::Shared("the start API answered 503".into());
    let (result, _) = second.start(async { Err(failed) }).await.unwrap();
    assert!(result.is_err());
    let state = lifecycle
        .store()
        .existing(second.key())
        .unwrap()
        .state()
        .unwrap();
    assert_eq!(state.phase, Phase::Up);
    assert!(state.may_run());
    assert_eq!(state.last_start.map(|c| c.ok), Some(false));
}
