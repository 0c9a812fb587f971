//! The packages under test, built from the current sources as a maintainer builds them, and what they
//! install; and the companion's two flavours replacing each other under dpkg.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use libtest_mimic::{Arguments, Trial};
use tempfile::TempDir;

use crate::{
    common::{
        container::{self, Container, Network},
        steps,
    },
    inspect::is_active,
};

/// The packages under test are built as released (the release profile: no debug assertions, abort on
/// panic, stripped) but unoptimised: the same code and behaviour, which is what these tests look at, in half
/// the build time (a from-scratch build for musl: 137 s without link-time optimisation, 73 s without any),
/// and three release builds were most of this test's minutes. The benchmark measures the optimised build.
const QUICK_RELEASE: [(&str, &str); 3] = [
    ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0"),
    ("CARGO_PROFILE_RELEASE_LTO", "false"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "256"),
];

/// Packages built into a directory of their own, then a container booted on `network` with them copied into
/// its /root (after `prepare` has written what it should find at boot). `Err(why)` when this machine cannot
/// run containers.
pub struct Booted {
    pub container: Container,
    pub debs: Vec<PathBuf>,
    /// Where the packages are: kept until the container is gone.
    pub dir: TempDir,
}

pub fn boot_with_packages(
    build: impl FnOnce(&Path) -> Vec<PathBuf>,
    network: Network,
    prepare: impl FnOnce(&Path),
) -> Result<Booted, String> {
    if let Some(why) = container::unavailable() {
        return Err(why);
    }
    let dir = tempfile::tempdir().unwrap();
    let debs = build(dir.path());
    let rootfs = container::cached_rootfs();
    Container::preflight(&rootfs)?;
    let started = Instant::now();
    let container = Container::boot_on(&rootfs, network, |root| {
        prepare(root);
        for deb in &debs {
            fs::copy(deb, root.join("root").join(deb.file_name().unwrap())).unwrap();
        }
    });
    eprintln!("container booted in {:?}", started.elapsed());
    Ok(Booted {
        container,
        debs,
        dir,
    })
}

/// Builds the package from the current sources with packaging/build-deb, as a maintainer would, into `dir`
/// (ours alone, so that another test run building at the same time cannot swap it under us). Cargo rebuilds
/// only what changed: a few seconds when nothing did, and never a stale binary. Returns the .deb's path.
pub fn build_deb(dir: &Path) -> PathBuf {
    build_package("build-deb", &[], dir)
}

/// Builds the companion's package with packaging/build-deb-api into `dir`: ssh-on-demand-api, or with
/// `libvirt` ssh-on-demand-api-libvirt.
pub fn build_api_deb(dir: &Path, libvirt: bool) -> PathBuf {
    build_package(
        "build-deb-api",
        if libvirt { &["--libvirt"] } else { &[] },
        dir,
    )
}

/// Runs packaging/`script` with `args` into `dir`; returns the path it prints last.
pub fn build_package(script: &str, args: &[&str], dir: &Path) -> PathBuf {
    let started = Instant::now();
    let output = Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("packaging")
            .join(script),
    )
    .args(args)
    .arg(format!("--output={}", dir.display()))
    // Lighter compression of the same files: a second less per run.
    .arg("--fast")
    .env("CARGO", env!("CARGO"))
    .envs(QUICK_RELEASE)
    .stdin(Stdio::null())
    .output()
    .unwrap_or_else(|e| panic!("running packaging/{script}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "packaging/{script} failed ({}); is cargo-deb installed (cargo install --locked cargo-deb)?\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let deb = stdout
        .lines()
        .last()
        .unwrap_or_else(|| panic!("packaging/{script} prints the path"));
    eprintln!("built {deb} in {:?}", started.elapsed());
    PathBuf::from(deb)
}

/// What the package installed, before the operator touches anything.
pub fn check_installed_package(container: &Container) {
    let files = container.run_ok("dpkg", &["--listfiles", "ssh-on-demand"]);
    for expected in [
        "/usr/bin/ssh-on-demand",
        "/etc/ssh-on-demand/config.toml",
        "/usr/share/doc/ssh-on-demand/examples/config.toml",
        "/usr/share/doc/ssh-on-demand/README.md",
        "/usr/share/man/man8/ssh-on-demand.8.gz",
        "/usr/share/man/man5/ssh-on-demand.toml.5.gz",
        "/usr/share/doc/ssh-on-demand/docs/api.md",
    ] {
        assert!(files.lines().any(|f| f == expected), "{expected}:\n{files}");
    }
    let units: Vec<&str> = files
        .lines()
        .filter(|f| f.contains("/systemd/system/ssh-on-demand"))
        .collect();
    assert_eq!(units.len(), 6, "{files}");

    // Linked statically for musl (packaging/build-release): every login starts this program, and glibc's loader
    // and CPU probe were most of its start-up.
    let linked = container.run_ok("ldd", &["/usr/bin/ssh-on-demand"]);
    assert_eq!(linked.trim(), "statically linked", "{linked}");

    // Nothing enabled or started: port 22 is usually the host's own sshd.
    for unit in [
        "ssh-on-demand.socket",
        "ssh-on-demand-daemon.socket",
        "ssh-on-demand-sweep.timer",
    ] {
        let enabled = container.run("systemctl", &["is-enabled", unit]);
        assert_eq!(
            String::from_utf8_lossy(&enabled.stdout).trim(),
            "disabled",
            "{unit}"
        );
        assert!(!is_active(container, unit), "{unit}");
    }

    // The conffile has every setting commented out, and says what is missing.
    let check = container.run("ssh-on-demand", &["check-config"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("api_url is not set"));

    check_units(container, &units);
}

/// systemd's own checks of `units` as installed: `systemd-analyze verify` finds nothing to say (with man-db
/// in the container it also finds the man page that Documentation= names), and the exposure of every
/// service is at most 1.5 (--threshold is in tenths: it fails above 15).
fn check_units(container: &Container, units: &[&str]) {
    let verify = container.run("systemd-analyze", &[&["verify"], units].concat());
    let said = [verify.stdout, verify.stderr].concat();
    assert!(
        verify.status.success() && said.is_empty(),
        "systemd-analyze verify: {}\n{}",
        verify.status,
        String::from_utf8_lossy(&said)
    );
    for service in units.iter().filter(|u| u.ends_with(".service")) {
        let security = container.run(
            "systemd-analyze",
            &[
                "security",
                "--offline=yes",
                "--threshold=15",
                "--no-pager",
                service,
            ],
        );
        let report = String::from_utf8_lossy(&security.stdout);
        let overall = report
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no overall exposure level in:\n{report}"));
        eprintln!("systemd-analyze security: {overall}");
        assert!(security.status.success(), "{report}");
    }
}

/// What the companion's package installed, before the operator touches anything: its files, units that
/// systemd finds clean and hardened, and no need of libvirt, whose backend it refuses with the reason.
pub fn check_installed_api_package(container: &Container, deb: &Path) {
    let files = container.run_ok("dpkg", &["--listfiles", "ssh-on-demand-api"]);
    for expected in [
        "/usr/bin/ssh-on-demand-api",
        "/usr/libexec/ssh-on-demand-api/start-unit",
        "/etc/ssh-on-demand-api/config.toml",
        "/usr/share/doc/ssh-on-demand-api/examples/config.toml",
        "/usr/share/doc/ssh-on-demand-api/README.md",
        "/usr/share/doc/ssh-on-demand-api/docs/command-backend.md",
        "/usr/share/man/man8/ssh-on-demand-api.8.gz",
        "/usr/lib/systemd/system/ssh-on-demand-api.socket",
        "/usr/lib/systemd/system/ssh-on-demand-api.service",
    ] {
        assert!(files.lines().any(|f| f == expected), "{expected}:\n{files}");
    }
    let depends = control(deb, "Depends");
    assert!(
        depends.contains("libc6") && !depends.contains("libvirt"),
        "{depends}"
    );
    let linked = container.run_ok("ldd", &["/usr/bin/ssh-on-demand-api"]);
    assert!(
        !linked.contains("libvirt") && !linked.contains("not found"),
        "{linked}"
    );
    assert!(!is_active(container, "ssh-on-demand-api.socket"));

    // The conffile sets nothing, and check-config says what is missing; a libvirt backend is refused.
    let check = container.run("ssh-on-demand-api", &["check-config"]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stderr).contains("no [profiles.NAME] section"));
    fs::write(
        container.root().join("root/libvirt.toml"),
        "[backends.host]\ntype = \"libvirt\"\n[profiles.lab]\nbackend = \"host\"\nvm = \"dev\"\n",
    )
    .unwrap();
    let check = container.run(
        "ssh-on-demand-api",
        &["--config", "/root/libvirt.toml", "check-config"],
    );
    let said = String::from_utf8_lossy(&check.stderr);
    assert!(
        !check.status.success() && said.contains("install the package ssh-on-demand-api-libvirt"),
        "{said}"
    );

    check_units(
        container,
        &[
            "/usr/lib/systemd/system/ssh-on-demand-api.socket",
            "/usr/lib/systemd/system/ssh-on-demand-api.service",
        ],
    );
}

/// The companion's two flavours, built into a directory of their own.
pub struct Flavours {
    plain: PathBuf,
    libvirt: PathBuf,
    _dir: TempDir,
}

/// The companion's two flavours: the libvirt one depends on libvirt0, and each replaces the other under dpkg,
/// handing over the conffile with the operator's edits (in a copy of the container's rootfs, without systemd:
/// the maintainer scripts then leave the units alone).
pub fn companion_flavours(args: &Arguments) -> Vec<Trial> {
    steps::scenario(
        args,
        "companion_flavours",
        || {
            if let Some(why) = container::unavailable() {
                return Err(why);
            }
            let dir = tempfile::tempdir().unwrap();
            Ok(Flavours {
                plain: build_api_deb(dir.path(), false),
                libvirt: build_api_deb(dir.path(), true),
                _dir: dir,
            })
        },
        &[
            (
                "conflict_and_replace_each_other",
                conflict_and_replace_each_other,
            ),
            (
                "hand_over_the_edited_configuration",
                hand_over_the_edited_configuration,
            ),
        ],
    )
}

/// A field of a package's control file.
fn control(deb: &Path, field: &str) -> String {
    let output = Command::new("dpkg-deb")
        .arg("--field")
        .arg(deb)
        .arg(field)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn conflict_and_replace_each_other(flavours: &Flavours) {
    let Flavours { plain, libvirt, .. } = flavours;
    assert!(control(libvirt, "Depends").contains("libvirt0"));
    for field in ["Conflicts", "Replaces", "Provides"] {
        assert_eq!(control(libvirt, field), "ssh-on-demand-api", "{field}");
    }
    for field in ["Conflicts", "Replaces"] {
        assert_eq!(
            control(plain, field),
            "ssh-on-demand-api-libvirt",
            "{field}"
        );
    }
}

fn hand_over_the_edited_configuration(flavours: &Flavours) {
    let root = container::copy(&container::cached_rootfs());
    let conffile = root.path().join("etc/ssh-on-demand-api/config.toml");
    let dpkg = |deb: &Path| {
        fs::copy(deb, root.path().join("root/flavour.deb")).unwrap();
        // libvirt0 is not in the rootfs; the dependency is checked by the step before.
        let output = Command::new("chroot")
            .arg(root.path())
            .args(["dpkg", "--install", "--force-depends", "/root/flavour.deb"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "dpkg --install {}:\n{}",
            deb.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let owner = Command::new("chroot")
            .arg(root.path())
            .args(["dpkg", "--search", "/etc/ssh-on-demand-api/config.toml"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&owner.stdout).into_owned()
    };
    dpkg(&flavours.plain);
    let edited = format!(
        "{}# the operator's\n",
        fs::read_to_string(&conffile).unwrap()
    );
    fs::write(&conffile, &edited).unwrap();
    assert!(dpkg(&flavours.libvirt).starts_with("ssh-on-demand-api-libvirt: "));
    assert_eq!(fs::read_to_string(&conffile).unwrap(), edited);
    assert!(dpkg(&flavours.plain).starts_with("ssh-on-demand-api: "));
    assert_eq!(fs::read_to_string(&conffile).unwrap(), edited);
}
