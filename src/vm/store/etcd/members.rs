//! The cluster's members, a client each, asked in turn: a request that one member cannot answer (it is down,
//! or cut off from its leader) goes to the next at once, so that a member lost changes nothing for logins.
//! (etcd-client balances requests over all endpoints, a dead one included, and fails those sent there.)

use std::{
    future::Future,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::{sync::OnceCell, time::timeout};

use crate::{config::EtcdConfig, vm::store::StoreError};

/// One try at one member, connect included. A request tries each member once, so it takes at most this
/// times the number of members.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Members {
    endpoints: Vec<String>,
    options: ConnectOptions,
    /// Connected on first use: a member that is down when the host starts is no reason not to serve.
    clients: Vec<OnceCell<Client>>,
    /// The member that answered last, asked first.
    current: AtomicUsize,
}

impl Members {
    pub fn new(config: &EtcdConfig) -> anyhow::Result<Members> {
        Ok(Members {
            endpoints: config.endpoints.clone(),
            options: options(config)?,
            clients: config.endpoints.iter().map(|_| OnceCell::new()).collect(),
            current: AtomicUsize::new(0),
        })
    }

    /// Runs `request` against the member that answered last, then each other in turn until one answers.
    pub async fn call<T, F, Fut>(&self, request: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed);
        let mut failure = StoreError::Etcd("no etcd endpoint".to_owned());
        for k in 0..n {
            let i = (first + k) % n;
            let attempt = async {
                let client = self.client(i).await?;
                request(client).await
            };
            match timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(Ok(answer)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Ok(Err(e)) => failure = StoreError::Etcd(format!("{}: {e}", self.endpoints[i])),
                Err(_) => failure = StoreError::Timeout(ATTEMPT_TIMEOUT),
            }
            self.current.store((i + 1) % n, Ordering::Relaxed);
        }
        Err(failure)
    }

    async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        self.clients[i]
            .get_or_try_init(|| Client::connect([&self.endpoints[i]], Some(self.options.clone())))
            .await
            .cloned()
    }
}

fn options(config: &EtcdConfig) -> anyhow::Result<ConnectOptions> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(ATTEMPT_TIMEOUT)
        .with_timeout(ATTEMPT_TIMEOUT)
        // HTTP/2 pings notice a member that vanished under a watch or the lease's keep-alive stream.
        .with_keep_alive(Duration::from_secs(5), ATTEMPT_TIMEOUT)
        // A member cut off from its leader says so at once, and the next member is asked.
        .with_require_leader(true);
    if let Some((user, password)) = &config.user {
        options = options
            .with_user(user.clone(), password.expose().to_owned())
            .with_auto_token_refresh(true);
    }
    if config.tls() {
        let mut tls = TlsOptions::new().with_enabled_roots();
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| anyhow::anyhow!("etcd_ca_file {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        if let Some((cert, key)) = &config.identity {
            let cert = std::fs::read(cert)
                .map_err(|e| anyhow::anyhow!("etcd_cert_file {}: {e}", cert.display()))?;
            let key = std::fs::read(key)
                .map_err(|e| anyhow::anyhow!("etcd_key_file {}: {e}", key.display()))?;
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}
