//! The containers' root filesystem: a Debian rootfs made once by debootstrap and cached under target/, and
//! the private copies of it that tests boot.

use std::{
    fs,
    os::fd::AsFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use tempfile::TempDir;

/// Name of the cached rootfs; bump the number whenever `debootstrap`'s arguments below change, so that an old
/// cache is not taken for the new recipe.
const ROOTFS: &str = "bookworm-3";
/// systemd, and dbus for `systemctl` and `systemd-analyze security`; man-db so that `systemd-analyze verify`
/// checks that the unit's `Documentation=man:ssh-on-demand(8)` resolves; procps, which the package depends on;
/// openssh-server, as on a stock server (its sshd on port 22, and the "VM" of docs/first-login.md), with
/// the client the walkthrough logs in with.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,man-db,procps,openssh-server";
const MIRROR: &str = "http://deb.debian.org/debian";

/// The pristine rootfs, made by debootstrap on first use (about 35 s and 250 MB) and reused by every later
/// run. Only a copy of it is ever booted.
pub fn cached_rootfs() -> PathBuf {
    let cache = cache_dir();
    fs::create_dir_all(&cache).unwrap();
    let rootfs = cache.join(ROOTFS);
    // Test processes running at once must not both debootstrap: the first builds, the others wait.
    let _lock = lock(&cache.join(format!("{ROOTFS}.lock")));
    remove_stale_copies(&cache);
    if rootfs.is_dir() {
        return rootfs;
    }
    // Built under another name and renamed when complete, so that an interrupted build is never mistaken
    // for a rootfs: the final name exists only once debootstrap succeeded.
    let partial = cache.join(format!("{ROOTFS}.partial"));
    eprintln!(
        "building the container rootfs {} with debootstrap (once; about half a minute)",
        rootfs.display()
    );
    debootstrap(&partial, &cache.join(format!("{ROOTFS}.debs")));
    // Containers share the host's network unless booted with Network::Private: there, sshd would take the
    // host's port 22, or fail to. Those that want it enable it (enable_ssh).
    ssh_at_boot(&partial, "disable");
    fs::rename(&partial, &rootfs).unwrap();
    rootfs
}

/// How often debootstrap is run before the rootfs is given up on: it fetches about 150 packages, and one
/// dropped download, or a mirror caught mid-sync, fails the whole run.
const DEBOOTSTRAP_TRIES: u32 = 3;
/// The pause before a retry, for a mirror's hiccup to pass.
const DEBOOTSTRAP_RETRY_AFTER: Duration = Duration::from_secs(15);

/// Runs debootstrap into `target`, keeping its downloads in `debs` so that a retry fetches only what is
/// missing; the downloads go once the rootfs is made. A failure names what is most often behind it first,
/// the free space and debootstrap's last words, as a long log can be cut in the middle where it is shown.
fn debootstrap(target: &Path, debs: &Path) {
    fs::create_dir_all(debs).unwrap();
    let mut last = String::new();
    for attempt in 1..=DEBOOTSTRAP_TRIES {
        if target.exists() {
            fs::remove_dir_all(target).unwrap();
        }
        let output = Command::new("debootstrap")
            .args([
                "--variant=minbase",
                &format!("--include={PACKAGES}"),
                &format!("--cache-dir={}", debs.display()),
                "bookworm",
            ])
            .arg(target)
            .arg(MIRROR)
            .stdin(Stdio::null())
            .output()
            .expect("running debootstrap (apt-get install debootstrap)");
        if output.status.success() {
            let _ = fs::remove_dir_all(debs);
            return;
        }
        let said = [&output.stdout[..], &output.stderr[..]].concat();
        let log = fs::read(target.join("debootstrap/debootstrap.log")).unwrap_or_default();
        last = format!(
            "{}\nits last lines:\n{}\nthe end of debootstrap/debootstrap.log:\n{}",
            output.status,
            tail(&said, 15),
            tail(&log, 15)
        );
        eprintln!("debootstrap, try {attempt} of {DEBOOTSTRAP_TRIES}, failed: {last}");
        if attempt < DEBOOTSTRAP_TRIES {
            thread::sleep(DEBOOTSTRAP_RETRY_AFTER);
        }
    }
    panic!(
        "debootstrap failed {DEBOOTSTRAP_TRIES} times; {} free on {}; the last time: {last}",
        free_space(target.parent().unwrap()),
        target.parent().unwrap().display()
    );
}

/// The last `n` lines of a command's output.
fn tail(bytes: &[u8], n: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The space left to an unprivileged writer on the filesystem of `dir`, for messages.
fn free_space(dir: &Path) -> String {
    match rustix::fs::statvfs(dir) {
        Ok(fs) => format!("{} MiB", fs.f_bavail * fs.f_frsize / (1 << 20)),
        Err(e) => format!("(statvfs: {e})"),
    }
}

/// Enables sshd at boot in the copy at `root` (before [`super::Container::boot`] boots it), as on a stock server.
pub fn enable_ssh(root: &Path) {
    ssh_at_boot(root, "enable");
}

/// `systemctl enable` or `disable` of sshd in the rootfs at `root`, which is not running.
fn ssh_at_boot(root: &Path, verb: &str) {
    let status = Command::new("systemctl")
        .arg(format!("--root={}", root.display()))
        .args([verb, "--quiet", "ssh.service"])
        .status()
        .unwrap();
    assert!(
        status.success(),
        "systemctl {verb} ssh.service in {}",
        root.display()
    );
}

/// target/tmp/nspawn: kept between runs, removed by `cargo clean`.
fn cache_dir() -> PathBuf {
    crate::target_tmp().join("nspawn")
}

/// An exclusive lock, held until the returned file is dropped.
fn lock(path: &Path) -> fs::File {
    let file = fs::File::create(path).unwrap();
    rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::LockExclusive).unwrap();
    file
}

/// Copies are named `run-<pid>-…` after the test process that made them. One whose process is gone was left
/// by a run that was killed (Ctrl-C) before it could clean up; it is only disk space, so it goes.
fn remove_stale_copies(cache: &Path) {
    for entry in fs::read_dir(cache).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("run-").and_then(|r| r.split('-').next()) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            eprintln!(
                "removing {}, left by an interrupted run",
                entry.path().display()
            );
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A private copy of `rootfs`, removed when dropped; named after this process, so that a copy left by a killed
/// run is found and removed.
pub fn copy(rootfs: &Path) -> TempDir {
    let root = tempfile::Builder::new()
        .prefix(&format!("run-{}-", std::process::id()))
        .tempdir_in(rootfs.parent().unwrap())
        .unwrap();
    // A plain copy takes well under a second for this rootfs, and reflinks where the filesystem can.
    let status = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(rootfs.join("."))
        .arg(root.path())
        .status()
        .unwrap();
    assert!(status.success(), "copying {}", rootfs.display());
    root
}
