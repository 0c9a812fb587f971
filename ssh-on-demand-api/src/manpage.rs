//! The man page ssh-on-demand-api(8): synopsis and options from the clap definition the binary parses, then
//! the configuration, credentials, endpoints and files.

use clap::CommandFactory;
use clap_mangen::{
    Man,
    roff::{Roff, bold, roman},
};

use crate::{
    backend::{ec2_credentials, proxmox},
    cli::Cli,
    config::{DEFAULT_CONFIG_FILE, TOKEN_CREDENTIAL},
    logging::SYSLOG_IDENTIFIER,
};

pub fn file_name() -> String {
    Man::new(Cli::command()).section("8").get_filename()
}

pub fn render() -> std::io::Result<Vec<u8>> {
    let man = Man::new(Cli::command())
        .section("8")
        .manual("System Administration")
        .source(format!("ssh-on-demand-api {}", env!("CARGO_PKG_VERSION")));
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    let mut roff = Roff::new();
    let section = |roff: &mut Roff, title: &str, paragraphs: &[&str]| {
        roff.control("SH", [title]);
        for p in paragraphs {
            roff.control("PP", []).text([roman(*p)]);
        }
    };
    section(
        &mut roff,
        "ENDPOINTS",
        &[
            "POST /start with the proxy's JSON body ({\"client_addr\", \"client_port\", \"local_addr\", \"local_port\", \"profile\"}) answers 200 {\"vm_ip\", \"port\", \"how\", \"ms\"} as soon as the VM has an address; how is running, booted, resumed, or started (a start command that did not say), ms how long the platform took to boot or resume it up to its address. 404 for an unknown profile or client; 409 when the platform refused (its own words, which the ssh user reads; not retried); 502 when the platform could not be reached; 504 when no address came within address_timeout (both retried by the proxy).",
            "POST /stop with {\"vm_ip\", \"profile\", \"client_addr\"} answers 202 {\"status\": \"stopping\"} once a graceful shutdown was asked for (the VM is forced off after stop_timeout), or 202 {\"status\": \"suspending\"} for a profile with a stop_mode of suspend or hibernate; 200 {\"status\": \"off\"} or {\"status\": \"suspended\"} if there was nothing to do. Every request needs Authorization: Bearer with the token.",
        ],
    );
    let config = format!(
        "The TOML file (default {DEFAULT_CONFIG_FILE}); unknown keys are errors. Top level: listen (127.0.0.1:PORT, [::1]:PORT or unix:/PATH; ignored under socket activation), token_file, address_timeout (default 2m), stop_timeout (default 2m). [backends.NAME] sections with type = \"command\", \"libvirt\", \"proxmox\" or \"ec2\"; [profiles.NAME] sections with backend, vm or by_client (a table from client address to VM), port (default 22), stop_mode (shutdown, the default; suspend: libvirt's managed save, Proxmox VE's suspend to RAM, a command backend's suspend command; hibernate: Proxmox VE's suspend to disk, EC2's hibernation), if_suspend_fails (fail, the default, or shutdown) and if_resume_fails (fail, the default, or boot: the kept state is discarded). A start resumes a suspended VM. A command backend has start, stop, kill, suspend and resume argument vectors and a timeout. The profile \"default\" serves requests without a profile."
    );
    section(&mut roff, "CONFIGURATION", &[config.as_str()]);
    let credentials = format!(
        "From $CREDENTIALS_DIRECTORY, filled by the unit's LoadCredential=: {TOKEN_CREDENTIAL} (the bearer token, required), {} (the Proxmox API token's secret), {} (an AWS shared credentials file). check-config --credentials-dir /etc/credstore reads them where they lie, as NAME or ssh-on-demand-api.NAME.",
        proxmox::TOKEN_CREDENTIAL,
        ec2_credentials::CREDENTIAL
    );
    section(&mut roff, "CREDENTIALS", &[credentials.as_str()]);
    let logs = format!(
        "Under systemd, journal records with SYSLOG_IDENTIFIER={SYSLOG_IDENTIFIER} and the fields PROFILE, VM, VM_IP, CLIENT_ADDR: journalctl -t {SYSLOG_IDENTIFIER} VM=dev. A start's record says how it went: HOW (running, booted, resumed, started) and BOOT_MS or RESUME_MS; a suspend's HOW (suspended, hibernated) and SUSPEND_MS; failures carry RESUME_ERROR or SUSPEND_ERROR: journalctl -t {SYSLOG_IDENTIFIER} HOW=resumed."
    );
    section(&mut roff, "LOGS", &[logs.as_str()]);
    roff.control("SH", ["SEE ALSO"]).text([
        bold("ssh-on-demand"),
        roman("(8), "),
        bold("systemd.exec"),
        roman("(5)"),
    ]);
    roff.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}
