//! Writes the man page ssh-on-demand-api.8 into the directory given as the only argument.
//!
//!     cargo run -p ssh-on-demand-api --example api-manpage -- target/man
//!
//! (Not `manpage`: the proxy's example has that name, and examples of one workspace share target/*/examples/.)

use std::{env, fs, path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let Some(dir) = env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: api-manpage OUTPUT-DIRECTORY");
        return ExitCode::from(2);
    };
    let written = ssh_on_demand_api::manpage::render().and_then(|page| {
        fs::create_dir_all(&dir)?;
        fs::write(dir.join(ssh_on_demand_api::manpage::file_name()), page)
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manpage: {e}");
            ExitCode::FAILURE
        }
    }
}
