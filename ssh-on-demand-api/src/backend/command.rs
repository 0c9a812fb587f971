//! The command backend: argv templates run without a shell, in the spirit of shell2http. Covers `virsh`,
//! `qm`, `incus`, `VBoxManage` and scripts.
//!
//! The only placeholder is `{vm}`, and its values come from the configuration, never from a request. The
//! start command prints the address (`192.0.2.7`, or `{"vm_ip": "192.0.2.7"}`, which may say how it went:
//! `"how": "booted"`, `"resumed"` or `"running"`) and must be idempotent: it runs for every start, including
//! for a VM that is already up.
//!
//! With `stop_mode = "suspend"`, the suspend command keeps the VM's state, and the next start runs the
//! resume command (or the start command, if there is none). A command has no state to ask, so this backend
//! remembers which VMs it suspended, for as long as the companion runs.

use std::{
    collections::HashSet,
    net::IpAddr,
    os::unix::process::ExitStatusExt,
    process::{ExitStatus, Stdio},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{Begun, How, Power};
use crate::error::Failure;

/// What a command may print on stdout and stderr; more is a fault (a runaway loop), and the command is ended.
pub const OUTPUT_LIMIT: usize = 64 * 1024;
const PLACEHOLDER: &str = "{vm}";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// Starts the VM and prints its address.
    pub start: Vec<String>,
    /// Shuts the VM down gracefully; bounded by `stop_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Powers the VM off at once, when `stop` failed or did not finish in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill: Option<Vec<String>>,
    /// Stops the VM keeping its state (`stop_mode = "suspend"`); bounded by `stop_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<Vec<String>>,
    /// Brings back what `suspend` kept and prints the address, as `start` does; default: `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Vec<String>>,
    /// Bounds the start, resume and kill commands.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl CommandConfig {
    pub fn check(&self) -> Result<()> {
        for (name, argv) in [
            ("start", Some(&self.start)),
            ("stop", self.stop.as_ref()),
            ("kill", self.kill.as_ref()),
            ("suspend", self.suspend.as_ref()),
            ("resume", self.resume.as_ref()),
        ] {
            let Some(argv) = argv else { continue };
            ensure!(!argv.is_empty(), "{name}: an empty command");
            ensure!(
                argv[0].starts_with('/'),
                "{name}: {:?} is not an absolute path (there is no shell and no PATH search)",
                argv[0]
            );
            for arg in argv {
                let rest = arg.replace(PLACEHOLDER, "");
                if rest.contains('{') || rest.contains('}') {
                    bail!(
                        "{name}: {arg:?} has a placeholder other than {PLACEHOLDER}, the only one there is"
                    );
                }
            }
        }
        Ok(())
    }
}

/// VM names go into argv: refuse what a command could take for an option, and control characters.
pub fn check_vm_name(vm: &str) -> Result<()> {
    ensure!(!vm.is_empty(), "an empty VM name");
    ensure!(
        !vm.starts_with('-'),
        "VM name {vm:?} starts with '-', which a command would take for an option"
    );
    ensure!(
        !vm.chars().any(char::is_control),
        "VM name {vm:?} has control characters"
    );
    Ok(())
}

pub struct Command {
    config: CommandConfig,
    /// The VMs whose suspend command succeeded and that no start has brought back yet.
    suspended: Mutex<HashSet<String>>,
}

impl Command {
    pub fn new(config: CommandConfig) -> Command {
        Command {
            config,
            suspended: Mutex::default(),
        }
    }

    pub fn power(&self, vm: &str) -> Power {
        if self.suspended().contains(vm) {
            Power::Suspended
        } else {
            Power::Unknown
        }
    }

    pub async fn start(&self, vm: &str) -> Result<Begun, Failure> {
        self.run_start("start", &self.config.start, vm, How::Started)
            .await
    }

    /// The resume command, or the start command where there is none (it finds the kept state itself).
    pub async fn resume(&self, vm: &str) -> Result<Begun, Failure> {
        match &self.config.resume {
            Some(argv) => self.run_start("resume", argv, vm, How::Resumed).await,
            None => {
                self.run_start("start", &self.config.start, vm, How::Resumed)
                    .await
            }
        }
    }

    /// The start command, which is to boot the VM afresh: it is not told of the kept state.
    pub async fn boot_instead(&self, vm: &str) -> Result<Begun, Failure> {
        self.run_start("start", &self.config.start, vm, How::Booted)
            .await
    }

    pub async fn suspend(&self, vm: &str, limit: Duration) -> Result<(), Failure> {
        let Some(argv) = &self.config.suspend else {
            return Err(Failure::refused("no suspend command is configured"));
        };
        run("suspend", argv, vm, limit).await?;
        self.suspended().insert(vm.to_owned());
        Ok(())
    }

    /// Runs a command that prints the address; `how` is what happened unless it says.
    async fn run_start(
        &self,
        name: &str,
        argv: &[String],
        vm: &str,
        how: How,
    ) -> Result<Begun, Failure> {
        let out = run(name, argv, vm, self.config.timeout).await?;
        let (ip, said) = parse_output(&out).map_err(|why| {
            Failure::refused(format!("the {name} command's output is unusable: {why}"))
        })?;
        self.suspended().remove(vm);
        Ok(Begun {
            ip: Some(ip),
            how: Some(said.unwrap_or(how)),
        })
    }

    fn suspended(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.suspended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn can_stop(&self) -> bool {
        self.config.stop.is_some() || self.config.kill.is_some()
    }

    pub async fn stop(&self, vm: &str, limit: Duration) -> Result<(), Failure> {
        match &self.config.stop {
            Some(argv) => run("stop", argv, vm, limit).await.map(drop),
            None => Err(Failure::refused("no stop command is configured")),
        }
    }

    pub async fn kill(&self, vm: &str) -> Result<bool, Failure> {
        match &self.config.kill {
            Some(argv) => run("kill", argv, vm, self.config.timeout)
                .await
                .map(|_| true),
            None => Ok(false),
        }
    }
}

/// Runs `argv` with `{vm}` filled in, stdin closed, within `limit`; returns stdout. A non-zero exit is an
/// error with the last line of stderr, the platform's own words.
async fn run(name: &str, argv: &[String], vm: &str, limit: Duration) -> Result<String, Failure> {
    let args: Vec<String> = argv.iter().map(|a| a.replace(PLACEHOLDER, vm)).collect();
    let Some((program, rest)) = args.split_first() else {
        return Err(Failure::refused(format!("the {name} command is empty")));
    };
    let mut child = tokio::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout ends whatever the command started too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::refused(format!("cannot run the {name} command {program}: {e}")))?;
    let pid = child.id();
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Failure::unavailable(format!(
            "the {name} command's output pipes are missing"
        )));
    };
    let outcome = tokio::time::timeout(limit, async {
        tokio::try_join!(read_capped(stdout), read_capped(stderr), async {
            child.wait().await.map_err(Overflow::Io)
        })
    })
    .await;
    let (out, err, status) = match outcome {
        Ok(Ok(done)) => done,
        Ok(Err(fault)) => {
            kill_group(pid);
            return Err(match fault {
                Overflow::Limit => Failure::refused(format!(
                    "the {name} command printed more than {OUTPUT_LIMIT} bytes; it was ended"
                )),
                Overflow::Io(e) => {
                    Failure::unavailable(format!("reading the {name} command's output: {e}"))
                }
            });
        }
        Err(_) => {
            kill_group(pid);
            return Err(Failure::timeout(format!(
                "the {name} command did not finish within {}; it was ended",
                humantime::format_duration(limit)
            )));
        }
    };
    let err = String::from_utf8_lossy(&err);
    if !status.success() {
        let last = err.lines().rev().map(str::trim).find(|l| !l.is_empty());
        return Err(Failure::refused(match last {
            Some(line) => line.to_owned(),
            None => format!("the {name} command {}", describe(status)),
        }));
    }
    tracing::debug!(command = name, stderr = %err.trim(), "command succeeded");
    Ok(String::from_utf8_lossy(&out).into_owned())
}

enum Overflow {
    Limit,
    Io(std::io::Error),
}

async fn read_capped(mut pipe: impl AsyncRead + Unpin) -> Result<Vec<u8>, Overflow> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = pipe.read(&mut chunk).await.map_err(Overflow::Io)?;
        if n == 0 {
            return Ok(buf);
        }
        if buf.len() + n > OUTPUT_LIMIT {
            return Err(Overflow::Limit);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) else {
        return;
    };
    // It may have exited and taken its group with it; nothing to do then.
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Why a start or resume command's output names no address: the operator's script is wrong, so the login is
/// refused with this and the script's own words.
#[derive(Debug, thiserror::Error)]
pub enum UnusableOutput {
    #[error("it printed nothing; it must print the VM's IP address")]
    Empty,
    #[error("JSON without vm_ip, or with an unknown how ({0})")]
    Json(#[from] serde_json::Error),
    /// The text, cut to 80 characters.
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
}

/// The address a start or resume command printed (an IP address alone, or JSON `{"vm_ip": "…"}`), and how
/// it went if it said (JSON `"how"`).
pub fn parse_output(out: &str) -> Result<(IpAddr, Option<How>), UnusableOutput> {
    let text = out.trim();
    let address = |text: &str| {
        text.parse()
            .map_err(|_| UnusableOutput::NotAnAddress(text.chars().take(80).collect()))
    };
    if text.starts_with('{') {
        #[derive(Deserialize)]
        struct Answer {
            vm_ip: String,
            how: Option<How>,
        }
        let answer: Answer = serde_json::from_str(text)?;
        return Ok((address(&answer.vm_ip)?, answer.how));
    }
    if text.is_empty() {
        return Err(UnusableOutput::Empty);
    }
    Ok((address(text)?, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_address(out: &str) -> Result<IpAddr, UnusableOutput> {
        parse_output(out).map(|(ip, _)| ip)
    }

    #[test]
    fn addresses_plain_or_json() {
        assert_eq!(
            parse_address("192.0.2.7\n").unwrap(),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_address("2001:db8::7").unwrap(),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            parse_address(r#"{"vm_ip": "192.0.2.7", "port": 22}"#).unwrap(),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert!(matches!(parse_address(""), Err(UnusableOutput::Empty)));
        assert!(
            parse_address("vm-7.internal")
                .unwrap_err()
                .to_string()
                .contains("not an IP address")
        );
        assert!(matches!(parse_address("{}"), Err(UnusableOutput::Json(_))));
        assert_eq!(
            parse_output(r#"{"vm_ip": "127.0.0.1", "how": "resumed"}"#).unwrap(),
            ("127.0.0.1".parse().unwrap(), Some(How::Resumed))
        );
        assert!(
            parse_output(r#"{"vm_ip": "127.0.0.1", "how": "teleported"}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown how")
        );
    }

    #[test]
    fn templates_allow_only_the_vm_placeholder_and_absolute_programs() {
        let config = |start: &[&str]| CommandConfig {
            start: start.iter().map(|s| s.to_string()).collect(),
            stop: None,
            kill: None,
            suspend: None,
            resume: None,
            timeout: default_timeout(),
        };
        assert!(config(&["/usr/bin/virsh", "start", "{vm}"]).check().is_ok());
        assert!(
            config(&["/usr/bin/x", "{client_addr}"])
                .check()
                .unwrap_err()
                .to_string()
                .contains("placeholder")
        );
        assert!(
            config(&["virsh"])
                .check()
                .unwrap_err()
                .to_string()
                .contains("absolute")
        );
        assert!(config(&[]).check().is_err());
        assert!(check_vm_name("--all").is_err());
        assert!(check_vm_name("dev").is_ok());
    }
}
