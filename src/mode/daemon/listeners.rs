//! The daemon's listening sockets: systemd's (`Accept=no`, named after a profile with `FileDescriptorName=`)
//! and those of `--listen`.

use std::net::{SocketAddr, TcpListener as StdListener};

use anyhow::{Context as _, Result, bail};
use listenfd::ListenFd;
use tokio::net::TcpListener;
use tracing::warn;

/// A listening socket, and the profile it is for if systemd named it after one (`FileDescriptorName=`).
pub(super) struct Listener {
    pub(super) socket: TcpListener,
    pub(super) name: Option<String>,
}

pub(super) fn inherited_listeners() -> Result<Vec<(StdListener, Option<String>)>> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|names| names.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = ListenFd::from_env();
    (0..fds.len())
        .map(|i| {
            let listener = fds
                .take_tcp_listener(i)
                .with_context(|| format!("LISTEN_FDS socket {i} is not a TCP listening socket"))?
                .context("LISTEN_FDS socket taken twice")?;
            Ok((listener, names.get(i).cloned()))
        })
        .collect()
}

pub(super) async fn bind(
    inherited: Vec<(StdListener, Option<String>)>,
    listen: &[(SocketAddr, Option<String>)],
) -> Result<Vec<Listener>> {
    let mut listeners = Vec::new();
    for (listener, name) in inherited {
        listener.set_nonblocking(true)?;
        listeners.push(Listener {
            socket: TcpListener::from_std(listener)?,
            name,
        });
    }
    for (addr, name) in listen {
        let socket = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        listeners.push(Listener {
            socket,
            name: name.clone(),
        });
    }
    if listeners.is_empty() {
        bail!(
            "no socket to listen on: give --listen ADDR, or start the daemon from a socket unit (Accept=no)"
        );
    }
    Ok(listeners)
}

/// The soft limit of open files is 1024 by default; every session holds two sockets and more. Raised to
/// the hard limit, which systemd sets high.
pub(super) fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            warn!("raising the open files limit: {e}");
        }
    }
}
