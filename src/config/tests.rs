use std::fs;

use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn given(url: &str) -> Settings {
    Settings {
        api_url: Some(url.to_owned()),
        ..Settings::default()
    }
}

/// Resolves `text` as the file, with `settings` as the flags.
fn resolve_file(text: &str, settings: Settings) -> Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", text);
    Config::resolve(Some(&file), settings, None)
}

/// Resolves without a TOML file, whatever is installed in /etc on this machine.
fn resolve(settings: Settings, credentials_dir: Option<&Path>) -> Result<Config> {
    let dir = tempfile::tempdir().unwrap();
    let empty = write(dir.path(), "empty.toml", "");
    Config::resolve(Some(&empty), settings, credentials_dir)
}

fn default(config: &Config) -> &Profile {
    config.default.as_ref().unwrap()
}

#[test]
fn flags_beat_file_and_file_beats_defaults() {
    let flags = Settings {
        profile: Some("from-flag".into()),
        ..Settings::default()
    };
    let config = resolve_file(
        "api_url = \"http://file/\"\nprofile = \"from-file\"\nboot_timeout = \"3m\"\n",
        flags,
    )
    .unwrap();
    let profile = default(&config);
    assert_eq!(profile.api.url.expose().as_str(), "http://file/");
    assert_eq!(profile.name.as_deref(), Some("from-flag"));
    assert_eq!(profile.boot_timeout, Duration::from_secs(180));
    assert_eq!(profile.vm_port, defaults::VM_PORT);
    assert_eq!(profile.api.timeout, defaults::API_TIMEOUT);
    assert_eq!(profile.vm_scope, VmScope::Client);
    assert!(profile.stop.is_none());
    assert_eq!(config.state_dir, Path::new(defaults::STATE_DIR));
}

#[test]
fn unknown_keys_are_errors() {
    let error = format!(
        "{:#}",
        resolve_file(
            "api_url = \"http://x/\"\nboot_timout = \"1s\"\n",
            Settings::default()
        )
        .unwrap_err()
    );
    assert!(error.contains("unknown field `boot_timout`"), "{error}");
    let error = format!(
        "{:#}",
        resolve_file(
            "api_url = \"http://x/\"\n[profiles.ci]\nports = [2222]\nidle_timout = \"1s\"\n",
            Settings::default()
        )
        .unwrap_err()
    );
    assert!(error.contains("unknown field `idle_timout`"), "{error}");
    let error = format!(
        "{:#}",
        resolve_file(
            "api_url = \"http://x/\"\n[profiles.ci]\nports = [2222]\nstate_dir = \"/x\"\n",
            Settings::default()
        )
        .unwrap_err()
    );
    assert!(
        error.contains("state_dir is a setting of the host: set it at the top level"),
        "{error}"
    );
}

#[test]
fn profiles_inherit_the_top_level_and_take_their_ports() {
    let config = resolve_file(
        r#"
        api_url = "http://api/start"
        stop_url = "http://api/stop"
        idle_timeout = "5m"
        boot_timeout = "1m"

        [profiles.ci]
        ports = [2222, 2223]
        api_url = "http://ci/start"
        vm_scope = "profile"
        idle_timeout = "30s"
        "#,
        Settings::default(),
    )
    .unwrap();
    let ci = config.profile_for_port(2222).unwrap();
    assert_eq!(ci.name.as_deref(), Some("ci"));
    assert_eq!(ci.api.url.expose().as_str(), "http://ci/start");
    assert_eq!(ci.vm_scope, VmScope::Profile);
    assert_eq!(ci.boot_timeout, Duration::from_secs(60), "inherited");
    let stop = ci.stop.as_ref().unwrap();
    assert_eq!(stop.url.expose().as_str(), "http://api/stop", "inherited");
    assert_eq!(stop.idle_timeout, Duration::from_secs(30));
    let other = config.profile_for_port(22).unwrap();
    assert_eq!(other.name, None);
    assert_eq!(other.label(), "default");
    assert_eq!(
        other.stop.as_ref().unwrap().idle_timeout,
        Duration::from_secs(300)
    );
    assert!(config.profile_named("ci").is_some());
}

#[test]
fn only_named_profiles_is_fine_and_ports_are_unique() {
    let config = resolve_file(
        "[profiles.a]\nports = [1]\napi_url = \"http://a/\"\n",
        Settings::default(),
    )
    .unwrap();
    assert!(config.default.is_none());
    assert!(config.profile_for_port(2).is_none());

    let error = resolve_file(
        "[profiles.a]\nports = [1]\napi_url = \"http://a/\"\n[profiles.b]\nports = [1]\napi_url = \"http://b/\"\n",
        Settings::default(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("port 1 is in the ports of both"),
        "{error}"
    );
    let error = resolve_file(
        "[profiles.\"a/b\"]\nports = [1]\napi_url = \"http://a/\"\n",
        Settings::default(),
    )
    .unwrap_err();
    assert!(
        format!("{error:#}").contains("must be 1 to 64 letters"),
        "{error:#}"
    );
}

#[test]
fn idle_timeout_needs_a_stop_url() {
    let settings = Settings {
        idle_timeout: Some(Duration::from_secs(1)),
        ..given("http://x/")
    };
    let error = resolve(settings, None).unwrap_err();
    assert!(error.to_string().contains("need a stop_url"), "{error}");
}

#[test]
fn missing_named_file_is_an_error() {
    let error = Config::resolve(
        Some(Path::new("/nonexistent/ssh-on-demand.toml")),
        given("http://x/"),
        None,
    )
    .unwrap_err();
    assert!(format!("{error:#}").contains("/nonexistent/ssh-on-demand.toml"));
}

#[test]
fn api_url_is_required_and_must_be_http() {
    let error = resolve(Settings::default(), None).unwrap_err();
    assert!(error.to_string().contains("api_url is not set"), "{error}");
    let error = resolve(given("ftp://x/"), None).unwrap_err();
    assert!(error.to_string().contains("not ftp://"), "{error}");
    let error = resolve(given("http://user:hunter2@[::1/"), None).unwrap_err();
    assert!(!format!("{error:#}").contains("hunter2"), "{error:#}");
}

#[test]
fn token_comes_from_the_credential_unless_a_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), TOKEN_CREDENTIAL, "from-credential\n");
    write(dir.path(), "ci-token", "from-ci-credential\n");
    let token = |config: &Config| {
        default(config)
            .api
            .token
            .as_ref()
            .unwrap()
            .expose()
            .to_owned()
    };
    let config = resolve(given("http://x/"), Some(dir.path())).unwrap();
    assert_eq!(token(&config), "from-credential");

    let settings = Settings {
        api_token_credential: Some("ci-token".into()),
        ..given("http://x/")
    };
    let config = resolve(settings, Some(dir.path())).unwrap();
    assert_eq!(token(&config), "from-ci-credential");

    let file = write(dir.path(), "token", "from-file");
    let settings = Settings {
        api_token_file: Some(file),
        ..given("http://x/")
    };
    let config = resolve(settings, Some(dir.path())).unwrap();
    assert_eq!(token(&config), "from-file");
}

#[test]
fn empty_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "token", "\n");
    let settings = Settings {
        api_token_file: Some(file),
        ..given("http://x/")
    };
    let error = resolve(settings, None).unwrap_err();
    assert!(error.to_string().contains("is empty"), "{error}");
}

#[test]
fn display_masks_tokens_header_values_and_url_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "token", "s3cret-token");
    let settings = Settings {
        api_token_file: Some(file),
        api_headers: vec!["X-Api-Key: s3cret-header".into()],
        stop_url: Some("https://bob:s3cret-pass@api/stop?key=s3cret-key".into()),
        ..given("http://x/start?key=s3cret-key")
    };
    let shown = resolve(settings, None).unwrap().to_string();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(shown.contains("x-api-key: ***"), "{shown}");
    assert!(shown.contains("# token: ***"), "{shown}");
    assert!(shown.contains("https://***@api/stop?key=***"), "{shown}");
}

#[test]
fn display_is_a_valid_file_with_the_same_profiles() {
    let text = "api_url = \"http://a/\"\nstop_url = \"http://a/stop\"\n\
                [profiles.ci]\nports = [2222]\nvm_scope = \"profile\"\n";
    let shown = resolve_file(text, Settings::default()).unwrap().to_string();
    let again = resolve_file(&shown, Settings::default())
        .unwrap()
        .to_string();
    // All but the first line, which names the (temporary) file.
    let settings = |text: &str| text.lines().skip(1).collect::<Vec<_>>().join("\n");
    assert_eq!(settings(&again), settings(&shown));
}

#[test]
fn bad_headers_and_zero_timeouts_are_errors() {
    let settings = Settings {
        api_headers: vec!["no colon".into()],
        ..given("http://x/")
    };
    assert!(resolve(settings, None).is_err());
    let settings = Settings {
        boot_timeout: Some(Duration::ZERO),
        ..given("http://x/")
    };
    let error = resolve(settings, None).unwrap_err();
    assert!(error.to_string().contains("boot_timeout"), "{error}");
}

#[test]
fn toml_errors_say_where_and_never_quote_the_line() {
    let cases = [
        (
            "api_url = \"http://x/\"\napi_headers = \"X-Api-Key: s3cret\"\n",
            "line 2",
            "(api_headers)",
        ),
        (
            "api_url = \"http://x/\"\napi_headers = [\"X-Api-Key: s3cret\"\n",
            "line 2",
            "(api_headers)",
        ),
        (
            "api_headers = [\n  \"X-Api-Key: s3cret\",\n  s3cret2,\n]\n",
            "line 3, column 3",
            "(api_headers)",
        ),
        (
            "api_url = \"http://u:s3cret@h/\" s3cret\n",
            "line 1",
            "(api_url)",
        ),
        (
            "api_headers = \"\"\"\nX-Api-Key: s3cret\"\"\"\n",
            "line 1",
            "(api_headers)",
        ),
        // A line of a multi-line string that looks like a key is no setting's name.
        (
            "api_headers = [\"\"\"\ns3cret = 1\n\"\"\", 7]\n",
            "line 3, column 6",
            "(api_headers)",
        ),
        (
            "api_url = \"http://x/\"\n[profiles.gpu]\nports = [2222]\napi_headers = [1, \"X: s3cret\"]\n",
            "line 4",
            "(profiles.gpu.api_headers)",
        ),
    ];
    for (text, line, key) in cases {
        let error = format!("{:#}", resolve_file(text, Settings::default()).unwrap_err());
        assert!(!error.contains("s3cret"), "{text:?}: {error}");
        assert!(!error.contains('\n'), "{text:?}: {error}");
        assert!(
            error.contains(line) && error.contains(key),
            "{text:?}: {error}"
        );
    }
}

#[test]
fn malformed_headers_are_not_echoed() {
    for line in [
        "Authorization Bearer s3cret",
        "Authorization Bearer s3cret:x",
        "X-Api-Key: s3cret\u{1}",
    ] {
        let settings = Settings {
            api_headers: vec!["X-Tenant: blue".into(), line.into()],
            ..given("http://x/")
        };
        let error = format!("{:#}", resolve(settings, None).unwrap_err());
        assert!(!error.contains("s3cret"), "{error}");
        assert!(error.starts_with("api_headers entry 2: "), "{error}");
    }
}

#[test]
fn headers_come_from_a_file_or_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let text = "# for the start API\nX-Api-Key: s3cret-one\n\nX-Other: s3cret-two\n";
    let file = write(dir.path(), "headers", text);
    let settings = Settings {
        api_headers: vec!["X-Tenant: blue".into()],
        api_headers_file: Some(file.clone()),
        ..given("http://x/")
    };
    let config = resolve(settings, None).unwrap();
    let headers: Vec<String> = default(&config)
        .api
        .all_headers()
        .map(|(name, value)| format!("{name}: {}", value.expose()))
        .collect();
    assert_eq!(
        headers,
        [
            "x-tenant: blue",
            "x-api-key: s3cret-one",
            "x-other: s3cret-two"
        ]
    );
    let shown = config.to_string();
    assert!(!shown.contains("s3cret"), "{shown}");
    assert!(
        shown.contains(&format!(
            "api_headers_file = \"{}\"  # x-api-key: ***, x-other: ***",
            file.display()
        )),
        "{shown}"
    );

    // Under systemd: the credential, unless a file is named.
    let credentials = tempfile::tempdir().unwrap();
    write(
        credentials.path(),
        HEADERS_CREDENTIAL,
        "X-Api-Key: from-credential\n",
    );
    let config = resolve(given("http://x/"), Some(credentials.path())).unwrap();
    let (path, headers) = default(&config).api.headers_file.as_ref().unwrap();
    assert_eq!(path, &credentials.path().join(HEADERS_CREDENTIAL));
    assert_eq!(headers[0].1.expose(), "from-credential");

    // A bad line is named by its number, not shown.
    write(
        dir.path(),
        "headers",
        "X-Api-Key: fine\nAuthorization Bearer s3cret\n",
    );
    let settings = Settings {
        api_headers_file: Some(file.clone()),
        ..given("http://x/")
    };
    let error = format!("{:#}", resolve(settings, None).unwrap_err());
    assert!(!error.contains("s3cret"), "{error}");
    assert!(
        error.contains("headers, line 2: not of the form"),
        "{error}"
    );

    // Authorization from the file and a token: one too many.
    write(dir.path(), "headers", "Authorization: Bearer s3cret\n");
    let token = write(dir.path(), "token", "t0ken");
    let settings = Settings {
        api_headers_file: Some(file),
        api_token_file: Some(token),
        ..given("http://x/")
    };
    let error = resolve(settings, None).unwrap_err().to_string();
    assert!(
        error.contains("set Authorization and an API token"),
        "{error}"
    );
}
