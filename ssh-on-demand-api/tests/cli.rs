//! The command line: check-config on good and bad files, and the man page.

use testkit as common;

use std::{fs, process::Command};

use common::api_server::binary;

fn check_config(config: &str, credentials: &[(&str, &str)]) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("config.toml"), config).unwrap();
    let creds = dir.path().join("credstore");
    fs::create_dir(&creds).unwrap();
    for (name, content) in credentials {
        fs::write(creds.join(name), content).unwrap();
    }
    let output = Command::new(binary())
        .arg("--config")
        .arg(dir.path().join("config.toml"))
        .arg("check-config")
        .arg("--credentials-dir")
        .arg(&creds)
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (
        output.status.success(),
        text(&output.stdout),
        text(&output.stderr),
    )
}

const GOOD: &str = "listen = \"127.0.0.1:8040\"\n\
    [backends.pve]\ntype = \"proxmox\"\nurl = \"https://127.0.0.1:8006\"\nnode = \"pve1\"\n\
    token_id = \"ssh@pve!companion\"\nfingerprint = \"AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB:AB\"\n\
    [profiles.lab]\nbackend = \"pve\"\nvm = \"lxc/200\"\n";

#[test]
fn check_config_prints_the_effective_settings_and_no_secret() {
    let creds = [
        ("ssh-on-demand-api.api-token", "hunter2\n"),
        ("ssh-on-demand-api.proxmox-token", "pve-secret\n"),
    ];
    let (ok, out, err) = check_config(GOOD, &creds);
    assert!(ok, "{err}");
    assert!(out.contains("address_timeout = \"2m\""), "{out}");
    assert!(out.contains("# token: ***, read"), "{out}");
    assert!(
        !out.contains("hunter2") && !out.contains("pve-secret"),
        "{out}"
    );
}

#[test]
fn check_config_names_what_is_wrong() {
    let (ok, _, err) = check_config(&format!("{GOOD}colour = \"blue\"\n"), &[("api-token", "t")]);
    assert!(!ok);
    assert!(err.contains("unknown field `colour`"), "{err}");

    let (ok, _, err) = check_config(GOOD, &[("api-token", "t")]);
    assert!(!ok);
    assert!(
        err.contains("no token_secret_file and no \"proxmox-token\" systemd credential"),
        "{err}"
    );

    let (ok, _, err) = check_config(GOOD, &[]);
    assert!(!ok);
    assert!(err.contains("the API needs a bearer token"), "{err}");

    let public = GOOD.replace("127.0.0.1:8040", "0.0.0.0:8040");
    let (ok, _, err) = check_config(&public, &[("api-token", "t")]);
    assert!(!ok);
    assert!(err.contains("not a loopback address"), "{err}");
}

#[test]
fn the_man_page_documents_the_endpoints_and_credentials() {
    let page = String::from_utf8(ssh_on_demand_api::manpage::render().unwrap()).unwrap();
    assert_eq!(
        ssh_on_demand_api::manpage::file_name(),
        "ssh-on-demand-api.8"
    );
    for section in [
        "ENDPOINTS",
        "CONFIGURATION",
        "CREDENTIALS",
        "check\\-config",
        "proxmox\\-token",
        "stop_mode",
        "RESUME_MS",
    ] {
        assert!(page.contains(section), "no {section} in the man page");
    }
}

#[test]
fn the_example_configuration_passes_check_config() {
    let example = include_str!("../config.example.toml");
    // The example's CA file is not on this host: Proxmox's other way of trust instead.
    let fingerprint = format!("fingerprint = \"{}\"", ["AB"; 32].join(":"));
    let config = example.replace(
        "ca_file = \"/etc/ssh-on-demand-api/pve-root-ca.pem\"",
        &fingerprint,
    );
    let creds = [
        ("api-token", "t\n"),
        ("proxmox-token", "pve-secret\n"),
        (
            "aws-credentials",
            "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = secret\n",
        ),
    ];
    let (ok, out, err) = check_config(&config, &creds);
    assert!(ok, "{err}");
    assert!(out.contains("stop_mode = \"hibernate\""), "{out}");
}
