use std::{io::Write, process::ExitCode};

use clap::Parser;
use ssh_on_demand::{
    cli::{Cli, Command},
    commands,
    config::Config,
    logging::{self, LogTarget},
    mode,
};
use tracing::level_filters::LevelFilter;

fn main() -> ExitCode {
    // Before anything can print: under Accept=yes, stdout and stderr may be the client's socket.
    let stdio = logging::protect_stdio();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, or a mistake typed at a terminal: clap says it best.
        Err(e) if !e.use_stderr() || !stdio.connection_waiting => e.exit(),
        Err(e) => {
            // Started for a connection by a unit whose command line is wrong: log why, and tell the client.
            let _ = logging::init(LogTarget::Auto, LevelFilter::INFO, stdio.stderr_usable);
            let error = anyhow::anyhow!("invalid command line: {}", e.render());
            return mode::activated::serve(Err(error), None);
        }
    };
    if let Err(e) = logging::init(cli.log_target, cli.log_level, stdio.stderr_usable) {
        if stdio.stderr_usable {
            let _ = writeln!(std::io::stderr(), "ssh-on-demand: {e:#}");
        }
        return ExitCode::from(2);
    }
    match &cli.command {
        None => mode::activated::serve(Config::load(&cli), Some(&cli)),
        Some(Command::Daemon { listen }) => mode::daemon::run(&cli, listen),
        Some(Command::Status { json }) => commands::status(&cli, *json),
        Some(Command::Sweep) => commands::sweep(Config::load(&cli)),
        Some(Command::CheckConfig { quiet }) => match commands::check_config(&cli) {
            Ok(report) => {
                if !quiet {
                    let _ = std::io::stdout().write_all(report.as_bytes());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}
