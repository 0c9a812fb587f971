use std::{net::IpAddr, os::unix::fs::symlink};

use super::*;
use crate::vm::state::{Holder, Phase, Record};

fn key(client: Option<&str>) -> VmKey {
    VmKey {
        profile: "lab".into(),
        client: client.map(|c| c.parse().unwrap()),
    }
}

fn info() -> SessionInfo {
    SessionInfo {
        client: "203.0.113.9:5000".parse().unwrap(),
        pid: std::process::id(),
        since: 1,
        host: None,
    }
}

fn up() -> Record {
    Record {
        phase: Phase::Up {
            vm: "192.0.2.7:22".parse().unwrap(),
        },
        since: 5,
        ..Record::default()
    }
}

/// Writes `record` and returns the view the write was decided on.
async fn put(store: &Local, vm: &VmKey, record: &Record) -> View {
    let record = record.clone();
    store
        .transact(vm, true, move |_| (Write::Put(record.clone()), ()))
        .await
        .unwrap()
        .0
}

async fn read(store: &Local, vm: &VmKey) -> View {
    store
        .transact(vm, true, |_| (Write::Keep, ()))
        .await
        .unwrap()
        .0
}

#[test]
fn keys_round_trip_through_names() {
    for key in [
        key(None),
        key(Some("203.0.113.9")),
        key(Some("2001:db8::7")),
    ] {
        assert_eq!(VmKey::from_name(&key.name()), Some(key));
    }
    assert_eq!(VmKey::from_name(".tmp"), None);
    assert_eq!(VmKey::from_name("a/b"), None);
}

#[tokio::test]
async fn records_are_replaced_whole_and_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path().join("state"));
    let vm = key(None);
    assert!(
        store.view(&vm, false).unwrap().is_none(),
        "unknown before its first write"
    );
    put(&store, &vm, &up()).await;
    assert_eq!(store.view(&vm, false).unwrap().unwrap().record, up());
    assert_eq!(store.vms().unwrap(), [vm]);
}

#[tokio::test]
async fn sessions_are_live_while_held_and_dead_once_their_process_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(Some("203.0.113.9"));
    let session = store.register(&vm, &info()).unwrap();
    assert_eq!(read(&store, &vm).await.sessions, Some(1));
    assert_eq!(store.sessions(&vm).unwrap(), [info()]);

    // What a killed process leaves: its file, unlocked.
    let leftover = dir.path().join(vm.name()).join("sessions/99999.0");
    std::fs::write(&leftover, serde_json::to_vec(&info()).unwrap()).unwrap();
    assert_eq!(read(&store, &vm).await.sessions, Some(1));
    assert!(
        !leftover.exists(),
        "a dead session's file is removed under the lock"
    );

    drop(session);
    assert_eq!(read(&store, &vm).await.sessions, Some(0));
}

#[tokio::test]
async fn a_holder_is_alive_as_long_as_its_claim() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(None);
    let claim = store.claim(&vm).unwrap();
    let starting = Record {
        phase: Phase::Starting {
            holder: Holder {
                host: None,
                pid: std::process::id(),
                claim: claim.name.clone(),
            },
            was: None,
        },
        ..Record::default()
    };
    put(&store, &vm, &starting).await;
    assert!(read(&store, &vm).await.holder_alive);

    // A waiter wakes when the holder lets go.
    let seen = read(&store, &vm).await;
    let waiting = {
        let store = store.clone();
        let vm = vm.clone();
        tokio::spawn(async move { store.wait(&vm, &seen).await })
    };
    drop(claim);
    tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("the waiter woke")
        .unwrap()
        .unwrap();
    assert!(!read(&store, &vm).await.holder_alive);
}

#[tokio::test]
async fn one_idle_waiter_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(None);
    let waiter = store.try_idle_waiter(&vm).unwrap().unwrap();
    assert!(store.try_idle_waiter(&vm).unwrap().is_none());
    drop(waiter);
    assert!(store.try_idle_waiter(&vm).unwrap().is_some());
}

#[tokio::test]
async fn a_damaged_record_is_reset_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(None);
    put(&store, &vm, &up()).await;
    let file = dir.path().join(vm.name()).join(STATE);
    std::fs::write(&file, b"{\"phase\": {\"phase\": \"up\", \"vm\"").unwrap();
    assert_eq!(read(&store, &vm).await.record, Record::default());
    let repaired: Record = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        repaired,
        Record::default(),
        "repaired at once, not logged at every login"
    );
}

#[tokio::test]
async fn a_forgotten_vm_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(Some("203.0.113.9"));
    put(&store, &vm, &up()).await;
    store
        .transact(&vm, true, |_| (Write::Forget, ()))
        .await
        .unwrap();
    assert!(store.vms().unwrap().is_empty());
    assert!(!dir.path().join(vm.name()).exists());
}

/// Planted symlinks: whoever can write to the state directory must not make a login (or `sweep` run as root)
/// write or create files elsewhere.
#[tokio::test]
async fn planted_symlinks_are_refused_never_followed() {
    for planted in [
        "state.json",
        ".state.json",
        "lock",
        "idle",
        "sessions",
        "claims",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = Local::new(dir.path().join("state"));
        let vm = key(None);
        put(&store, &vm, &up()).await;
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let target = elsewhere.join("target");
        std::fs::write(&target, b"precious").unwrap();
        let entry = dir.path().join("state").join(vm.name()).join(planted);
        let _ = std::fs::remove_file(&entry);
        let _ = std::fs::remove_dir_all(&entry);
        let pointed = if matches!(planted, "sessions" | "claims") {
            &elsewhere
        } else {
            &target
        };
        symlink(pointed, &entry).unwrap();

        // Whatever each operation says, nothing outside the state directory changes.
        let _ = store.register(&vm, &info());
        let _ = store.claim(&vm);
        let _ = store.try_idle_waiter(&vm);
        let _ = store.transact(&vm, true, |_| (Write::Put(up()), ())).await;
        let _ = store.view(&vm, true);
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"precious",
            "{planted} followed"
        );
        let names: Vec<_> = std::fs::read_dir(&elsewhere)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["target"], "{planted}: files created elsewhere");
    }
}

/// A FIFO planted as a session cannot hang a reader, and is not counted.
#[tokio::test]
async fn entries_that_are_not_plain_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let vm = key(None);
    put(&store, &vm, &up()).await;
    let fifo = dir.path().join(vm.name()).join("sessions/1.1");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        FileType::Fifo,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let view = tokio::time::timeout(std::time::Duration::from_secs(10), read(&store, &vm))
        .await
        .expect("a FIFO does not block the reader");
    assert_eq!(view.sessions, Some(0));
}

#[tokio::test]
async fn source_records_are_kept_apart_from_vms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Local::new(dir.path());
    let source: IpAddr = "203.0.113.9".parse().unwrap();
    let seen = store
        .transact_source(source, |current| {
            (Some(b"one".to_vec()), current.map(<[u8]>::to_vec))
        })
        .await
        .unwrap();
    assert_eq!(seen, None);
    let seen = store
        .transact_source(source, |current| (None, current.map(<[u8]>::to_vec)))
        .await
        .unwrap();
    assert_eq!(seen.as_deref(), Some(&b"one"[..]));
    assert!(store.sources().unwrap().is_empty(), "removed");
    store
        .transact_source(source, |_| (Some(b"two".to_vec()), ()))
        .await
        .unwrap();
    assert_eq!(store.sources().unwrap(), [(source, b"two".to_vec())]);
    assert!(store.vms().unwrap().is_empty(), "sources are no VMs");

    // A planted symlink in its place is replaced, never written through.
    let target = dir.path().join("precious");
    std::fs::write(&target, b"precious").unwrap();
    let entry = dir.path().join(SOURCES).join(source.to_string());
    std::fs::remove_file(&entry).unwrap();
    symlink(&target, &entry).unwrap();
    store
        .transact_source(source, |_| (Some(b"three".to_vec()), ()))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    assert_eq!(store.sources().unwrap(), [(source, b"three".to_vec())]);
}
