use std::{process::ExitCode, sync::Arc};

use anyhow::{Context, Result};
use clap::Parser;
use ssh_on_demand_api::{
    cli::{Cli, Command},
    config::{self, Config, TOKEN_CREDENTIAL},
    logging,
    server::{self, App},
    vms::Vms,
};
use ssh_on_demand_common::secret::Secret;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread exists: it takes LISTEN_FDS and friends out of the environment.
    let mut passed = listenfd::ListenFd::from_env();
    let result = match &cli.command {
        Some(Command::CheckConfig { credentials_dir }) => {
            check_config(&cli, credentials_dir.clone())
        }
        Some(Command::Serve) | None => {
            logging::init(cli.log_target, cli.log_level).and_then(|()| serve(&cli, &mut passed))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ssh-on-demand-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(cli: &Cli, passed: &mut listenfd::ListenFd) -> Result<()> {
    let config = Config::load(&cli.config)?;
    let token = token(&config)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let vms = Vms::new(&config)?;
        let listeners = server::listeners(passed, cli.listen.as_ref().or(config.listen.as_ref()))?;
        server::serve(Arc::new(App { vms, token }), listeners).await
    })
}

fn check_config(cli: &Cli, credentials_dir: Option<std::path::PathBuf>) -> Result<()> {
    if let Some(dir) = credentials_dir {
        config::use_credentials_dir(dir);
    }
    let config = Config::load(&cli.config)?;
    let token = token(&config)?;
    // Building the backends reads their secrets; reqwest needs a runtime around it.
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async { Vms::new(&config).map(drop) })?;
    print!("{}", config.to_toml()?);
    println!("# token: {token}, read");
    Ok(())
}

fn token(config: &Config) -> Result<Secret> {
    let path = match &config.token_file {
        Some(path) => path.clone(),
        None => config::credential(TOKEN_CREDENTIAL).with_context(|| {
            format!("no token_file and no {TOKEN_CREDENTIAL:?} systemd credential: the API needs a bearer token")
        })?,
    };
    Secret::from_file(&path).context("the bearer token")
}
