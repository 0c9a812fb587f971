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
    let result = match &cli.command {
        // Its exit status says what the client got (report::Outcome); its errors are told to the client.
        None => return mode::activated::serve(Config::load(&cli), Some(&cli)),
        Some(Command::Daemon { listen }) => mode::daemon::run(&cli, listen),
        Some(Command::Sweep) => Config::load(&cli).and_then(commands::sweep),
        // Run by hand: one plain line on the terminal, not a log record.
        Some(Command::Status { json }) => {
            return by_hand("ssh-on-demand status: ", commands::status(&cli, *json));
        }
        Some(Command::CheckConfig { quiet }) => {
            let checked = commands::check_config(&cli).map(|report| {
                if !quiet {
                    let _ = std::io::stdout().write_all(report.as_bytes());
                }
            });
            return by_hand("error: ", checked);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exit status of a command run at a terminal, its error on stderr.
fn by_hand(prefix: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "{prefix}{e:#}");
            ExitCode::FAILURE
        }
    }
}
