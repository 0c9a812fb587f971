use super::*;

const MINIMAL: &str = r#"
    [backends.scripts]
    type = "command"
    start = ["/bin/echo", "127.0.0.1"]
    [profiles.lab]
    backend = "scripts"
    vm = "dev"
"#;

#[test]
fn a_minimal_file_gets_the_defaults() {
    let config = Config::parse(MINIMAL).unwrap();
    assert_eq!(config.address_timeout, Duration::from_secs(120));
    assert_eq!(config.profiles["lab"].port, 22);
    assert!(
        config
            .to_toml()
            .unwrap()
            .contains("address_timeout = \"2m\"")
    );
}

#[test]
fn unknown_keys_are_errors_at_every_level() {
    for (text, key) in [
        (format!("colour = 1\n{MINIMAL}"), "colour"),
        (
            MINIMAL.replace("vm = \"dev\"", "vm = \"dev\"\nvms = 2"),
            "vms",
        ),
        (
            MINIMAL.replace("type = \"command\"", "type = \"command\"\nshell = true"),
            "shell",
        ),
    ] {
        let error = format!("{:#}", Config::parse(&text).unwrap_err());
        assert!(error.contains(&format!("unknown field `{key}`")), "{error}");
    }
}

#[test]
fn profiles_must_name_a_backend_and_one_way_to_pick_the_vm() {
    let missing = MINIMAL.replace("backend = \"scripts\"", "backend = \"nope\"");
    let error = format!("{:#}", Config::parse(&missing).unwrap_err());
    assert!(error.contains("no [backends.nope] section"), "{error}");

    let both = MINIMAL.replace(
        "vm = \"dev\"",
        "vm = \"dev\"\nby_client = { \"127.0.0.1\" = \"x\" }",
    );
    let error = format!("{:#}", Config::parse(&both).unwrap_err());
    assert!(error.contains("either vm or by_client"), "{error}");

    let bad_client = MINIMAL.replace("vm = \"dev\"", "by_client = { \"lab-7\" = \"x\" }");
    assert!(Config::parse(&bad_client).is_err());
}

#[test]
fn stop_modes_only_where_the_platform_has_them() {
    let error = |text: &str| format!("{:#}", Config::parse(text).unwrap_err());
    let with = |mode: &str| MINIMAL.replace("vm = \"dev\"", &format!("vm = \"dev\"\n{mode}"));
    assert!(error(&with("stop_mode = \"suspend\"")).contains("needs a suspend command"));
    let suspend = with("stop_mode = \"suspend\"").replace(
        "start = [",
        "suspend = [\"/bin/true\"]\nresume = [\"/bin/echo\", \"127.0.0.1\"]\nstart = [",
    );
    let config = Config::parse(&suspend).unwrap();
    assert_eq!(config.profiles["lab"].stop_mode, StopMode::Suspend);
    assert_eq!(config.profiles["lab"].if_resume_fails, IfResumeFails::Fail);
    assert!(error(&with("stop_mode = \"hibernate\"")).contains("one suspend command"));
    assert!(error(&with("stop_mode = \"sleep\"")).contains("unknown variant `sleep`"));

    let libvirt =
        "[backends.host]\ntype = \"libvirt\"\n[profiles.lab]\nbackend = \"host\"\nvm = \"dev\"\n";
    assert!(Config::parse(&format!("{libvirt}stop_mode = \"suspend\"")).is_ok());
    assert!(
        error(&format!("{libvirt}stop_mode = \"hibernate\""))
            .contains("managed save keeps the state on disk")
    );

    let pve = "[backends.pve]\ntype = \"proxmox\"\nurl = \"https://pve:8006\"\nnode = \"n\"\n\
               token_id = \"a@pve!b\"\n[profiles.lab]\nbackend = \"pve\"\n";
    assert!(Config::parse(&format!("{pve}vm = \"105\"\nstop_mode = \"hibernate\"")).is_ok());
    assert!(
        error(&format!("{pve}vm = \"lxc/200\"\nstop_mode = \"suspend\""))
            .contains("Proxmox VE suspends QEMU VMs")
    );
    assert!(
        error(&format!(
            "{pve}vm = \"105\"\nstop_mode = \"hibernate\"\nif_resume_fails = \"boot\""
        ))
        .contains("works with stop_mode = \"suspend\" only")
    );

    let ec2 = "[backends.aws]\ntype = \"ec2\"\nregion = \"eu-central-1\"\n\
               [profiles.lab]\nbackend = \"aws\"\nvm = \"i-0abc\"\n";
    assert!(Config::parse(&format!("{ec2}stop_mode = \"hibernate\"")).is_ok());
    assert!(error(&format!("{ec2}stop_mode = \"suspend\"")).contains("no suspend to memory"));
    assert!(
        error(&format!(
            "{ec2}stop_mode = \"hibernate\"\nif_resume_fails = \"boot\""
        ))
        .contains("offers no boot instead")
    );
}

#[test]
fn listen_is_loopback_or_a_unix_socket() {
    assert_eq!(
        "127.0.0.1:8080".parse::<Listen>().unwrap(),
        Listen::Tcp("127.0.0.1:8080".parse().unwrap())
    );
    assert_eq!(
        "unix:/run/x.sock".parse::<Listen>().unwrap(),
        Listen::Unix("/run/x.sock".into())
    );
    assert!("0.0.0.0:8080".parse::<Listen>().is_err());
    assert!("unix:relative.sock".parse::<Listen>().is_err());
}
