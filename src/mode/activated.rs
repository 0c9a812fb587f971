//! Activated mode: one process per connection (`Accept=yes`): takes the connection systemd hands over, serves
//! it, waits out the VM's idle timeout if it was the VM's last session, and exits with the outcome.

use std::{
    fs::File,
    net::TcpStream,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::{Context, Result, bail, ensure};
use listenfd::ListenFd;
use socket2::SockRef;
use tracing::{error, info, warn};

use crate::{
    cli::Cli,
    config::{Config, Profile, StoreConfig},
    logging::is_tcp,
    session::{self, Host},
    vm::{api::Api, lifecycle::Profiles, store::now_ms},
};

/// Serves the one connection systemd handed to this process, with `config` or, if it is an error, by telling
/// the client the host is misconfigured; then, if it was its VM's last session, waits out the VM's idle
/// timeout, reading the configuration of `cli` again when it changes. Returns the exit status: 0 when the
/// client was relayed or left, 1 when it got no VM, 2 when there was no connection to serve.
pub fn serve(config: Result<Config>, cli: Option<&Cli>) -> ExitCode {
    let client = match take_client() {
        Ok(client) => client,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(2);
        }
    };
    // One connection per process: a single-threaded runtime starts fastest and is all the relay needs.
    let runtime = match crate::runtime(false) {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    // Boxed: passed by value, its 10 KiB would be copied into each of block_on's frames on the stack, which
    // the process keeps for its session's life.
    let outcome = runtime.block_on(Box::pin(async {
        let client = tokio::net::TcpStream::from_std(client)?;
        let config = match config.and_then(per_connection) {
            Ok(config) => config,
            Err(error) => return Ok(session::refuse_misconfigured(client, &error).await),
        };
        let file = config.file.clone();
        let ctx = Host::new(Arc::new(config), true);
        let report = session::run(client, &ctx, None).await;
        // The client's socket is closed by now; the process stays only for the VM.
        if let Some((watch, api)) = report.idle {
            let in_s = watch.due().saturating_sub(now_ms()) / 1000;
            let text = format!(
                "idle: stopping {} in {in_s} s unless someone logs in",
                watch.key()
            );
            info!("{text}");
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
            let reread = Reread {
                cli,
                file,
                seen: Mutex::default(),
            };
            watch.run(api, &reread).await;
        }
        Ok::<_, std::io::Error>(report.outcome)
    }));
    match outcome {
        Ok(outcome) => outcome.exit_code(),
        Err(e) => {
            error!("registering the client's socket: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration as it is now, for the idle wait, which may end long after this process read it: read
/// again whenever the file has changed since it was last read.
struct Reread<'a> {
    cli: Option<&'a Cli>,
    file: Option<PathBuf>,
    seen: Mutex<Option<Seen>>,
}

/// The file's modification time, inode and size when it was last read, and what it said then (`None`:
/// unusable).
type Seen = (Option<(SystemTime, u64, u64)>, Option<Arc<Host>>);

impl Profiles for Reread<'_> {
    fn now(&self, label: &str) -> Option<(Arc<Profile>, Arc<Api>)> {
        let cli = self.cli?;
        // Its time, and its inode and size too: two writes within one clock tick share a time.
        let modified = self.file.as_ref().and_then(|file| {
            let meta = file.metadata().ok()?;
            Some((meta.modified().ok()?, meta.ino(), meta.len()))
        });
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = match &*seen {
            Some((at, ctx)) if *at == modified => ctx.clone(),
            _ => {
                let ctx = match Config::load(cli) {
                    Ok(config) => Some(Arc::new(Host::new(Arc::new(config), false))),
                    Err(e) => {
                        warn!("the idle wait keeps the configuration it has: {e:#}");
                        None
                    }
                };
                *seen = Some((modified, ctx.clone()));
                ctx
            }
        };
        ctx?.now(label)
    }
}

/// The configuration, if this mode can serve it. The etcd store needs a process that lives between
/// connections, to hold the host's lease and keep it alive: the daemon.
fn per_connection(config: Config) -> Result<Config> {
    ensure!(
        matches!(config.store, StoreConfig::Local),
        "state_store = \"etcd\" needs the daemon (ssh-on-demand-daemon.socket): a per-connection instance lives \
         only as long as its connection and cannot hold this host's etcd lease"
    );
    Ok(config)
}

/// Takes the client's connection the way systemd passes it with `Accept=yes`: as fd 3 with `LISTEN_FDS=1`, or
/// else as fd 0 (`StandardInput=socket`). Call it before any thread starts: it reads and clears `LISTEN_*`.
pub fn take_client() -> Result<TcpStream> {
    let mut listen_fds = ListenFd::from_env();
    let fd = match listen_fds.len() {
        0 => {
            let fd = rustix::stdio::stdin()
                .try_clone_to_owned()
                .context("fd 0 is not open")?;
            check_connected_tcp(&fd).context(
                "fd 0 is not a connected TCP socket; ssh-on-demand serves one connection handed over by a \
                 systemd socket unit with Accept=yes (see docs/operations.md), or run `ssh-on-demand check-config`",
            )?;
            // With fd 0 on /dev/null our duplicate is the only handle on the connection, so dropping it closes
            // the connection rather than leaving it half-open until exit.
            let null = File::open("/dev/null").context("opening /dev/null")?;
            rustix::stdio::dup2_stdin(&null).context("pointing fd 0 at /dev/null")?;
            fd
        }
        1 => {
            let raw = listen_fds
                .take_raw_fd(0)?
                .context("the LISTEN_FDS socket was already taken")?;
            // SAFETY: under the sd_listen_fds protocol fd 3 is ours, and ListenFd hands each fd out only once.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            check_connected_tcp(&fd).context(
                "LISTEN_FDS passed a socket that is not a connected TCP socket: the socket unit needs Accept=yes",
            )?;
            fd
        }
        n => bail!(
            "systemd passed {n} sockets (LISTEN_FDS={n}); with Accept=yes it passes exactly one connection"
        ),
    };
    let stream = TcpStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// A TCP connection, or one the client has reset already (it has no peer any more, but is still a
/// connection to record); not a listening socket, which a unit with Accept=no would pass.
fn check_connected_tcp(fd: &OwnedFd) -> Result<()> {
    ensure!(is_tcp(fd), "not a TCP socket");
    ensure!(
        !SockRef::from(fd).is_listener().unwrap_or(false),
        "a listening socket"
    );
    Ok(())
}
