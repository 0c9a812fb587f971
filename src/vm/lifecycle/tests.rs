use super::*;
use crate::{
    cli::Settings,
    config::Config,
    vm::{
        state::{FORGET_AFTER, Phase, Record, Write, millis},
        store::local::Local,
    },
};

fn config(dir: &std::path::Path) -> Config {
    let file = dir.join("config.toml");
    std::fs::write(&file, "api_url = \"http://127.0.0.1:9/start\"\n").unwrap();
    let mut config = Config::resolve(Some(&file), Settings::default(), None).unwrap();
    config.state_dir = dir.join("state");
    config
}

fn vm_key(client: &str) -> VmKey {
    VmKey {
        profile: "default".into(),
        client: Some(client.parse().unwrap()),
    }
}

async fn put(store: &Store, key: &VmKey, record: Record) {
    store
        .transact(key, false, move |_| (Write::Put(record.clone()), ()))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_sweep_forgets_vms_that_have_not_run_for_a_day() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let store = Store::Local(Local::new(&config.state_dir));
    let lifecycle = Lifecycle::new(store.clone());
    let long_ago = now_ms() - millis(FORGET_AFTER) - 1;
    let at = |phase, since| Record {
        phase,
        since,
        ..Record::default()
    };
    let vm = "192.0.2.7:22".parse().unwrap();
    put(
        &store,
        &vm_key("203.0.113.1"),
        at(
            Phase::Failed {
                detail: "no".into(),
            },
            long_ago,
        ),
    )
    .await;
    put(&store, &vm_key("203.0.113.2"), at(Phase::Stopped, now_ms())).await;
    put(
        &store,
        &vm_key("203.0.113.3"),
        at(Phase::Up { vm }, long_ago),
    )
    .await;

    let watches = sweep(&lifecycle, &config, now_ms()).await;
    assert!(watches.is_empty(), "nothing to stop without a stop_url");
    let left: Vec<String> = store
        .vms()
        .await
        .unwrap()
        .iter()
        .map(VmKey::to_string)
        .collect();
    assert_eq!(left, ["default@203.0.113.2", "default@203.0.113.3"]);
}

/// A start call that fails for a VM that runs (its other sessions relay) must not make it look stopped: it
/// would then never be stopped when idle.
#[tokio::test]
async fn a_failed_start_of_a_running_vm_leaves_it_running() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let profile = config.default.clone().unwrap();
    let lifecycle = Lifecycle::new(Store::Local(Local::new(&config.state_dir)));
    let client: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    let vm: SocketAddr = "192.0.2.7:22".parse().unwrap();

    let first = lifecycle.join(&profile, client).await.unwrap();
    let start = first.start(async { Ok(Started::known(vm)) }).await;
    assert_eq!((start.result.unwrap().addr, start.how), (vm, How::Woke));
    first.ready(vm).await;

    // Past boot_timeout a login asks again rather than share; here it asks while the VM runs.
    let second = lifecycle.join(&profile, client).await.unwrap();
    let failed = ApiError::Shared("the start API answered 503".into());
    assert!(second.start(async { Err(failed) }).await.result.is_err());
    let view = lifecycle
        .store()
        .view(second.key(), false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.record.phase, Phase::Up { vm });
}

/// A refused answer (here: an address `vm_networks` does not allow) is a failed start: the next login asks
/// the API again instead of sharing an address nobody may use.
#[tokio::test]
async fn a_refused_answer_is_recorded_as_a_failed_start() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config(tmp.path());
    let profile = config.default.clone().unwrap();
    let lifecycle = Lifecycle::new(Store::Local(Local::new(&config.state_dir)));
    let client: SocketAddr = "203.0.113.9:5000".parse().unwrap();
    let addr: SocketAddr = "127.0.0.1:22".parse().unwrap();

    let lease = lifecycle.join(&profile, client).await.unwrap();
    let refused = ApiError::NotAllowed {
        addr,
        why: crate::vm::targets::NotAllowed::Loopback,
    };
    assert!(lease.start(async { Err(refused) }).await.result.is_err());
    let record = lifecycle
        .store()
        .view(lease.key(), false)
        .await
        .unwrap()
        .unwrap()
        .record;
    assert!(matches!(record.phase, Phase::Failed { .. }), "{record:?}");
    assert_eq!(record.last_start.map(|c| c.ok), Some(false));
    assert_eq!(lifecycle.running(&profile, client).await, None);
}
