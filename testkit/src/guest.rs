//! A real VM, not a process standing in for one: a Debian kernel and an initramfs with busybox and dropbear
//! (built once by tests/guest/build and cached under target/guest), run by QEMU with TCG under
//! tests/guest/qemu-vm, which the companion's command backend calls to boot, suspend and resume it. Its
//! sshd is forwarded to 127.0.0.1:`port` by QEMU's user networking.

use std::{
    fs,
    io::Read,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tempfile::TempDir;
use wait_timeout::ChildExt;

/// The first build fetches the kernel package (27 MB) and unpacks it.
const BUILD_LIMIT: Duration = Duration::from_secs(600);

pub struct Guest {
    /// The VM's directory: vm.json, and what qemu-vm keeps there (QEMU's PID, its QMP socket, the saved state).
    pub dir: TempDir,
    /// Where QEMU forwards the guest's port 22, on 127.0.0.1.
    pub port: u16,
    /// The private key root logs in with.
    pub key: PathBuf,
    _keys: TempDir,
}

impl Guest {
    /// Builds the guest (or takes it from the cache) and prepares a VM directory whose guest lets a fresh key
    /// in as root. Nothing runs yet.
    pub fn prepare() -> Guest {
        let (kernel, image) = build();
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("id_ed25519");
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "guest-test", "-f"])
            .arg(&key)
            .stdin(Stdio::null())
            .status()
            .expect("ssh-keygen (apt-get install openssh-client)");
        assert!(made.success());
        let dir = tempfile::tempdir().unwrap();
        // The kernel unpacks concatenated archives in turn: the cached image, then this run's key.
        let mut initrd = fs::read(&image).unwrap();
        initrd.extend(authorized_keys_archive(
            &key.with_extension("pub"),
            keys.path(),
        ));
        fs::write(dir.path().join("initrd"), initrd).unwrap();
        // A free port, given up just before QEMU binds it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = serde_json::json!({"kernel": kernel, "initrd": dir.path().join("initrd"),
                                      "port": port, "memory_mib": 128});
        fs::write(dir.path().join("vm.json"), spec.to_string()).unwrap();
        Guest {
            dir,
            port,
            key,
            _keys: keys,
        }
    }

    /// The companion's `[backends.qemu]`: tests/guest/qemu-vm for every action, the VM named by its directory.
    pub fn backend(&self) -> String {
        let script = script("qemu-vm");
        let argv = |action: &str| format!("[\"{}\", \"{action}\", \"{{vm}}\"]", script.display());
        format!(
            "[backends.qemu]\ntype = \"command\"\ntimeout = \"60s\"\nstart = {}\nresume = {}\nsuspend = {}\n\
             stop = {}\nkill = {}\n",
            argv("start"),
            argv("resume"),
            argv("suspend"),
            argv("stop"),
            argv("kill")
        )
    }

    /// The VM's name in the companion's configuration: its directory.
    pub fn vm(&self) -> String {
        self.dir.path().display().to_string()
    }
}

impl Drop for Guest {
    /// Ends the QEMU this test's companion started, by the PID qemu-vm wrote, if it still runs.
    fn drop(&mut self) {
        let _ = Command::new(script("qemu-vm"))
            .arg("kill")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .status();
        // What QEMU and the guest's console said, for a test that failed.
        if std::thread::panicking() {
            for name in ["qemu.log", "console.log"] {
                if let Ok(text) = fs::read_to_string(self.dir.path().join(name)) {
                    eprintln!("[{name}]\n{text}");
                }
            }
        }
    }
}

fn script(name: &str) -> PathBuf {
    super::workspace().join("tests/guest").join(name)
}

/// tests/guest/build into target/guest: the kernel's path and the initramfs's.
fn build() -> (PathBuf, PathBuf) {
    let target = super::target_dir();
    let mut child = Command::new(script("build"))
        .arg(target.join("guest"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running tests/guest/build");
    let Some(status) = child.wait_timeout(BUILD_LIMIT).unwrap() else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("tests/guest/build did not finish within {BUILD_LIMIT:?}");
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        status.success(),
        "tests/guest/build failed (its message is above; on Debian 12: apt-get install qemu-system-x86 \
         busybox-static dropbear-bin cpio, and apt-get update for the kernel package)"
    );
    let mut lines = out.lines().map(PathBuf::from);
    match (lines.next(), lines.next()) {
        (Some(kernel), Some(image)) => (kernel, image),
        _ => {
            panic!("tests/guest/build printed {out:?}, not the kernel's and the initramfs's paths")
        }
    }
}

/// A cpio archive (newc) holding /root/.ssh/authorized_keys with `public_key`, owned by root.
fn authorized_keys_archive(public_key: &Path, scratch: &Path) -> Vec<u8> {
    let root = scratch.join("archive");
    fs::create_dir_all(root.join("root/.ssh")).unwrap();
    fs::copy(public_key, root.join("root/.ssh/authorized_keys")).unwrap();
    let mut cpio = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cpio (apt-get install cpio)");
    {
        use std::io::Write;
        let mut names = cpio.stdin.take().unwrap();
        names
            .write_all(b"root/.ssh\nroot/.ssh/authorized_keys\n")
            .unwrap();
    }
    let out = cpio.wait_with_output().unwrap();
    assert!(out.status.success(), "cpio failed");
    out.stdout
}
