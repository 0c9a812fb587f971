use anyhow::Result;
use ssh_on_demand_common::logging::{self, Program};
use tracing::level_filters::LevelFilter;

pub use ssh_on_demand_common::logging::LogTarget;

pub const SYSLOG_IDENTIFIER: &str = "ssh-on-demand-api";

/// Installs the global subscriber: the journal's records carry fields such as `PROFILE`, `VM` and
/// `CLIENT_ADDR`.
pub fn init(target: LogTarget, level: LevelFilter) -> Result<()> {
    let program = Program {
        syslog_identifier: SYSLOG_IDENTIFIER,
        crate_name: env!("CARGO_CRATE_NAME"),
    };
    // The companion never has a client's connection on stderr.
    logging::init(program, target, level, true)
}
