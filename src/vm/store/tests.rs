use super::*;

fn key(client: Option<&str>) -> VmKey {
    VmKey {
        profile: "lab".into(),
        client: client.map(|c| c.parse().unwrap()),
    }
}

#[test]
fn keys_round_trip_through_directory_names() {
    for key in [
        key(None),
        key(Some("203.0.113.9")),
        key(Some("2001:db8::7")),
    ] {
        assert_eq!(VmKey::from_dir_name(&key.dir_name()), Some(key));
    }
    assert_eq!(VmKey::from_dir_name(".tmp"), None);
}

#[tokio::test]
async fn the_gate_excludes_even_within_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Store::new(dir.path()).vm(&key(None)).unwrap();
    let gate = vm.gate().await.unwrap();
    assert!(vm.try_gate().unwrap().is_none());
    assert!(vm.gate_busy().unwrap());
    drop(gate);
    assert!(vm.try_gate().unwrap().is_some());
}

#[tokio::test]
async fn sessions_are_live_while_held_and_dead_once_leaked() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Store::new(dir.path())
        .vm(&key(Some("203.0.113.9")))
        .unwrap();
    let info = SessionInfo {
        client: "203.0.113.9:5000".parse().unwrap(),
        pid: std::process::id(),
        since: now_ms(),
    };
    let session = vm.register(&info).unwrap();
    let found = vm.sessions().unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].live);
    assert_eq!(found[0].info.as_ref(), Some(&info));

    // What a killed process leaves: the file without its lock.
    let path = session.abandon();
    assert!(path.exists());
    let gate = vm.gate().await.unwrap();
    assert_eq!(gate.live_sessions().unwrap(), (0, 1));
    assert!(!path.exists(), "the dead session's file is removed");
}

#[tokio::test]
async fn one_idle_waiter_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let vm = Store::new(dir.path()).vm(&key(None)).unwrap();
    let gate = vm.gate().await.unwrap();
    let idle = gate.try_idle().unwrap().unwrap();
    assert!(gate.try_idle().unwrap().is_none());
    drop(idle);
    assert!(gate.try_idle().unwrap().is_some());
}

#[test]
fn state_is_replaced_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new(dir.path());
    let vm = store.vm(&key(None)).unwrap();
    assert_eq!(vm.state().unwrap(), VmState::default());
    let gate = vm.try_gate().unwrap().unwrap();
    let mut state = VmState::default();
    state.enter(Phase::Starting, 5);
    gate.write(&state).unwrap();
    assert_eq!(vm.state().unwrap(), state);
    assert_eq!(store.vms().unwrap().len(), 1);
}
