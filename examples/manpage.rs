//! Writes the man pages ssh-on-demand.8 and ssh-on-demand.toml.5 into the directory given as the only
//! argument (packaging/build-deb uses target/man). The synopsis, description and options come from the clap
//! definition the binary parses, and the configuration file's keys from the same settings
//! (`cli::settings_reference`), so they cannot drift from it; the other sections name files and journal
//! fields from the crate's own constants.
//!
//!     cargo run --example manpage -- target/man

use std::{env, fs, io, path::PathBuf, process::ExitCode};

use clap::CommandFactory;
use clap_mangen::{
    Man,
    roff::{Roff, bold, italic, roman},
};
use ssh_on_demand::{
    cli::{Cli, settings_reference},
    config::{
        DEFAULT_CONFIG_FILE, HEADERS_CREDENTIAL, TOKEN_CREDENTIAL,
        defaults::STATE_DIR as DEFAULT_STATE_DIR,
    },
    logging::SYSLOG_IDENTIFIER,
    report::{Outcome, SUMMARY_MESSAGE_ID},
    vm::lifecycle::LIFECYCLE_MESSAGE_ID,
};

/// Where the units load the token from (`LoadCredential=api-token:ssh-on-demand.api-token`).
const CREDSTORE_TOKEN: &str = "/etc/credstore/ssh-on-demand.api-token";
/// Where the units load secret extra headers from (`LoadCredential=api-headers:ssh-on-demand.api-headers`).
const CREDSTORE_HEADERS: &str = "/etc/credstore/ssh-on-demand.api-headers";

fn main() -> ExitCode {
    let Some(dir) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: manpage OUTPUT-DIRECTORY");
        return ExitCode::from(2);
    };
    let man = Man::new(Cli::command())
        .section("8")
        .manual("System Administration")
        .source(format!("ssh-on-demand {}", env!("CARGO_PKG_VERSION")));
    let mut page = Vec::new();
    render(&man, &mut page).expect("rendering to memory");
    for (name, page) in [
        (man.get_filename(), page),
        (
            "ssh-on-demand.toml.5".to_owned(),
            config_page().render().into_bytes(),
        ),
    ] {
        let path = dir.join(&name);
        // Written aside, then renamed: a build running at the same time never packages a half-written page.
        let partial = dir.join(format!(".{name}.{}", std::process::id()));
        let written = fs::create_dir_all(&dir)
            .and_then(|()| fs::write(&partial, page))
            .and_then(|()| fs::rename(&partial, &path));
        if let Err(e) = written {
            eprintln!("writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("{}", path.display());
    }
    ExitCode::SUCCESS
}

/// clap_mangen's sections up to OPTIONS, then ours. Its own SUBCOMMANDS section would point at pages
/// (ssh-on-demand-check-config(8)) that nobody writes, and its EXTRA section at a README.md without saying
/// where the package puts it (SEE ALSO does).
fn render(man: &Man, page: &mut Vec<u8>) -> io::Result<()> {
    man.render_title(page)?;
    man.render_name_section(page)?;
    man.render_synopsis_section(page)?;
    man.render_description_section(page)?;
    man.render_options_section(page)?;
    extra_sections().to_writer(page)
}

/// COMMANDS, FILES, JOURNAL, EXIT STATUS and SEE ALSO: what an operator looks up besides the options.
fn extra_sections() -> Roff {
    let mut roff = Roff::new();
    let item = |roff: &mut Roff, term: &str, text: &str| {
        roff.control("TP", [])
            .text([bold(term)])
            .text([roman(text)]);
    };

    roff.control("SH", ["COMMANDS"]);
    for command in Cli::command().get_subcommands() {
        let about = command
            .get_about()
            .map(|a| a.to_string())
            .unwrap_or_default();
        item(
            &mut roff,
            &format!("ssh-on-demand {}", command.get_name()),
            &about,
        );
    }

    roff.control("SH", ["FILES"]);
    item(
        &mut roff,
        DEFAULT_CONFIG_FILE,
        "Settings, read by every connection's process, so changes apply to the next connection. \
         Keys are the long options with _ for -; unknown keys are errors. The package installs it \
         with every setting commented out; an annotated copy is in \
         /usr/share/doc/ssh-on-demand/examples/config.toml.",
    );
    item(
        &mut roff,
        CREDSTORE_TOKEN,
        &format!(
            "The start API's bearer token (mode 0600). The unit passes it to the service as the \
             systemd credential \"{TOKEN_CREDENTIAL}\"; without the file, requests carry no token."
        ),
    );
    item(
        &mut roff,
        CREDSTORE_HEADERS,
        &format!(
            "Secret extra headers for the start and stop APIs, one \"Name: value\" per line (mode 0600). The \
             units pass it to the service as the systemd credential \"{HEADERS_CREDENTIAL}\". Header values \
             are never taken from the command line, which every local user can read."
        ),
    );
    item(
        &mut roff,
        "/usr/lib/systemd/system/ssh-on-demand.socket",
        "Listens on port 22 with Accept=yes: one ssh-on-demand@.service instance per connection. \
         Not enabled by the package; change ListenStream= with systemctl edit ssh-on-demand.socket, \
         then systemctl enable --now ssh-on-demand.socket.",
    );
    item(
        &mut roff,
        "/usr/lib/systemd/system/ssh-on-demand@.service",
        "One connection: the client's socket on standard input, logs to the journal, progress in \
         systemctl status (STATUS=). The last session of a VM stays for its idle_timeout, then stops it.",
    );
    item(
        &mut roff,
        "/usr/lib/systemd/system/ssh-on-demand-sweep.timer",
        "Runs ssh-on-demand sweep every minute (started with the socket): stops VMs whose idle waiter was \
         killed, and forgets VMs that have not run for a day.",
    );
    item(
        &mut roff,
        "/usr/lib/systemd/system/ssh-on-demand-daemon.socket",
        "The daemon mode instead (Accept=no, one process for every connection, Type=notify with watchdog, \
         reload and drain): systemctl disable --now ssh-on-demand.socket, then systemctl enable --now \
         ssh-on-demand-daemon.socket.",
    );
    item(
        &mut roff,
        DEFAULT_STATE_DIR,
        "What connections share about each VM (starts in flight, sessions, idle clocks), in flock(2)-guarded \
         files; read by ssh-on-demand status.",
    );

    roff.control("SH", ["JOURNAL"]);
    roff.text([roman(format!(
        "Records carry SYSLOG_IDENTIFIER={SYSLOG_IDENTIFIER} and, once known, the fields CLIENT_ADDR, \
         CLIENT_PORT, PROFILE and VM. Each connection ends with one summary record, \
         MESSAGE_ID={SUMMARY_MESSAGE_ID}, with OUTCOME, REASON, API_MS, VM_WAIT_MS, BYTES_TO_VM, \
         BYTES_TO_CLIENT and DURATION_MS. It has priority warning when the user got no VM and notice \
         otherwise, so "
    ))]);
    roff.text([bold(format!(
        "journalctl -t {SYSLOG_IDENTIFIER} -p warning MESSAGE_ID={SUMMARY_MESSAGE_ID}"
    ))]);
    roff.text([roman(format!(
        "lists the failed logins (and failed stops). Each decision about a VM's life (idle, keep, stop, \
         stopped, stop_failed) is one record with MESSAGE_ID={LIFECYCLE_MESSAGE_ID} and VM_KEY, PROFILE, \
         VM, DECISION, WHY and IDLE_S. OUTCOME is one of:"
    ))]);
    for (outcome, meaning) in [
        (Outcome::Relayed, "the client was relayed to its VM"),
        (
            Outcome::ClientGone,
            "the client left before its VM was ready",
        ),
        (
            Outcome::NotSsh,
            "the client did not speak SSH, so nothing was started",
        ),
        (Outcome::ApiFailed, "the start API gave no usable address"),
        (
            Outcome::VmNotReady,
            "the VM's sshd did not answer by boot_timeout",
        ),
        (Outcome::Misconfigured, "the configuration is unusable"),
        (Outcome::Busy, "daemon: over one of its limits, or stopping"),
    ] {
        item(&mut roff, outcome.as_str(), meaning);
    }

    roff.control("SH", ["EXIT STATUS"]);
    item(
        &mut roff,
        "0",
        "The client was relayed, or left, or did not speak SSH.",
    );
    item(
        &mut roff,
        "1",
        "The user got no VM (api_failed, vm_not_ready, misconfigured, busy); the ssh client was told why. \
         check-config: the configuration is unusable.",
    );
    item(
        &mut roff,
        "2",
        "No connection to serve, or a bad command line.",
    );

    roff.control("SH", ["SEE ALSO"]);
    let pages = [
        ("systemd.socket", "5"),
        ("systemd.exec", "5"),
        ("systemd-analyze", "1"),
        ("journalctl", "1"),
        ("ssh", "1"),
        ("sshd", "8"),
    ];
    for (i, (page, section)) in pages.iter().enumerate() {
        let separator = if i + 1 < pages.len() { "), " } else { ")" };
        roff.text([italic(*page), roman(format!("({section}{separator}"))]);
    }
    roff.control("PP", []).text([roman(
        "ssh-on-demand.toml(5): every setting. /usr/share/doc/ssh-on-demand/: README.md, and docs/ with the \
         start API's contract (api.md), the units and troubleshooting (operations.md).",
    )]);
    roff
}

/// ssh-on-demand.toml(5): the file's format and every key, from the settings themselves.
fn config_page() -> Roff {
    let mut roff = Roff::new();
    let version = format!("ssh-on-demand {}", env!("CARGO_PKG_VERSION"));
    roff.control(
        "TH",
        [
            "SSH-ON-DEMAND.TOML",
            "5",
            "",
            &version,
            "File Formats Manual",
        ],
    );
    roff.control("SH", ["NAME"]);
    roff.text([roman("ssh-on-demand.toml - configuration of ssh-on-demand")]);
    roff.control("SH", ["SYNOPSIS"]);
    roff.text([bold(DEFAULT_CONFIG_FILE)]);
    roff.control("SH", ["DESCRIPTION"]);
    roff.text([roman(
        "A TOML file. Settings come from, highest first: command-line options, SSH_ON_DEMAND_* environment \
         variables, this file (or the one --config names), then the defaults. Each key is the long option's \
         name with _ for -; an unknown key is an error. Durations are written 90s, 2m, 1m 30s or 500ms. \
         Every connection's process reads the file, so a change applies to the next connection; the daemon \
         reads it at start and on reload. ssh-on-demand check-config prints the effective configuration, \
         secrets masked, or says precisely what is wrong.",
    )]);
    roff.control("SH", ["PROFILES"]);
    roff.text([roman(
        "A table [profiles.NAME] holds the settings of the connections that arrive on its ports; what it does \
         not set comes from the top level, which serves every other port. Settings marked Host or Daemon \
         belong to the top level only.",
    )]);
    roff.control("SH", ["SETTINGS"]);
    for setting in settings_reference() {
        roff.control("TP", []).text([bold(&setting.key)]);
        let mut text = setting.help.clone();
        let also: Vec<String> = [setting.flag.clone(), setting.env.clone()]
            .into_iter()
            .flatten()
            .collect();
        if !also.is_empty() {
            text.push_str(&format!(" (also {})", also.join(", ")));
        }
        roff.text([roman(text)]);
    }
    roff.control("SH", ["EXAMPLE"]);
    roff.control("nf", []);
    roff.text([roman(
        "api_url = \"https://vms.example.org/start\"\n\
         stop_url = \"https://vms.example.org/stop\"\n\
         idle_timeout = \"15m\"\n\
         \n\
         [profiles.gpu]\n\
         ports = [2222]\n\
         api_url = \"https://gpu.example.org/start\"\n\
         vm_scope = \"profile\"",
    )]);
    roff.control("fi", []);
    roff.control("SH", ["FILES"]);
    roff.control("TP", []).text([bold(DEFAULT_CONFIG_FILE)]);
    roff.text([roman(
        "The file. The package installs it with every setting commented out; a pristine copy is in \
         /usr/share/doc/ssh-on-demand/examples/config.toml.",
    )]);
    roff.control("TP", []).text([bold(CREDSTORE_TOKEN)]);
    roff.text([roman(
        "The start and stop API's bearer token: never in this file, which every local user can read.",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        italic("ssh-on-demand"),
        roman("(8); /usr/share/doc/ssh-on-demand/docs/configuration.md"),
    ]);
    roff
}
