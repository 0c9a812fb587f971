use std::{io::Write, process::ExitCode};

use clap::Parser;
use ssh_on_demand::{
    activation,
    config::{Cli, Command},
    logging,
};
use tracing::level_filters::LevelFilter;

fn main() -> ExitCode {
    // Before anything can print: under Accept=yes, stdout and stderr may be the client's socket.
    let stdio = activation::protect_stdio();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if stdio.stderr_usable || !e.use_stderr() => e.exit(),
        Err(e) => {
            // stderr is gone; the journal is the only place an operator will find this.
            let _ = logging::init(logging::LogTarget::Journald, LevelFilter::INFO, false);
            tracing::error!("bad command line: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = logging::init(cli.log_target, cli.log_level, stdio.stderr_usable) {
        if stdio.stderr_usable {
            let _ = writeln!(std::io::stderr(), "ssh-on-demand: {e:#}");
        }
        return ExitCode::from(2);
    }
    match cli.command {
        Some(Command::CheckConfig) => match ssh_on_demand::check_config(&cli) {
            Ok(report) => {
                let _ = std::io::stdout().write_all(report.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                let _ = writeln!(std::io::stderr(), "error: {e:#}");
                ExitCode::FAILURE
            }
        },
        None => ssh_on_demand::serve_activated_connection(&cli),
    }
}
