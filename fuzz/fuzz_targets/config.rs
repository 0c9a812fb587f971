//! The configuration file: any text either fails with a message or resolves (`Config::resolve`, as the proxy
//! and `check-config` do) into a configuration whose deadlines can be set and whose `check-config` output
//! reads back as the same configuration.
#![no_main]

use std::{fs, path::PathBuf, sync::OnceLock, time::Instant};

use libfuzzer_sys::fuzz_target;
use ssh_on_demand::{
    cli::Settings,
    config::{Config, Profile},
};

/// One scratch directory for the whole run; each input overwrites the same two files.
fn scratch() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static SCRATCH: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (file, shown) = (dir.path().join("config.toml"), dir.path().join("shown.toml"));
        (dir, file, shown)
    })
}

/// Token and header files are read whole: a fuzzed path could name /dev/zero. Those inputs are left out.
fn reads_files(settings: &Settings) -> bool {
    settings.api_token_file.is_some()
        || settings.api_headers_file.is_some()
        || settings.profiles.values().any(reads_files)
}

fn resolve(path: &std::path::Path, text: &str) -> anyhow::Result<Config> {
    fs::write(path, text).expect("writing the scratch file");
    Config::resolve(Some(path), Settings::default(), None)
}

/// `check-config`'s output without its first line, which names the file.
fn shown(config: &Config) -> String {
    let text = config.to_string();
    text.split_once('\n').map_or(String::new(), |(_, rest)| rest.to_owned())
}

fn check_deadlines(profile: &Profile) {
    // Sessions set their deadlines from now (`Instant::now() + boot_timeout`, and per attempt to the VM).
    let now = Instant::now();
    for (name, duration) in [
        ("boot_timeout", profile.boot_timeout),
        ("api_timeout", profile.api.timeout),
        ("vm_connect_timeout", profile.vm_connect_timeout),
        ("vm_banner_timeout", profile.vm_banner_timeout),
        ("client_banner_timeout", profile.client_banner_timeout),
    ] {
        assert!(
            now.checked_add(duration).is_some(),
            "{name} = {duration:?} was accepted, but no deadline can be set that far"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = toml::from_str::<Settings>(text) else {
        return;
    };
    if reads_files(&settings) {
        return;
    }
    let (_, file, shown_file) = scratch();
    let Ok(config) = resolve(file, text) else {
        return;
    };
    for profile in config.all_profiles() {
        check_deadlines(profile);
    }
    let first = shown(&config);
    let again = resolve(shown_file, &config.to_string())
        .unwrap_or_else(|e| panic!("check-config's output does not read back: {e:#}\n{first}"));
    assert_eq!(first, shown(&again), "check-config's output reads back as another configuration");
});
