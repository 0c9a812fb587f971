//! The settings as one list, for the man page ssh-on-demand.toml(5) and the tests that keep the
//! configuration reference and the shipped file in step with the settings that exist.

use clap::Args;

use super::Settings;

/// One key of the configuration file.
#[derive(Debug, Clone)]
pub struct SettingDoc {
    /// The key in the file, which is also the field's name.
    pub key: String,
    /// `--api-url`, when a flag sets it too.
    pub flag: Option<String>,
    /// `SSH_ON_DEMAND_API_URL`, when the environment sets it too.
    pub env: Option<String>,
    /// What `--help` says of it, its default included.
    pub help: String,
}

/// The keys no flag sets. clap cannot read their fields' doc comments, so the words are here, once; the
/// fields' comments point here.
const FILE_ONLY: [(&str, &str); 2] = [
    (
        "api_headers",
        "File only: extra headers for the start and stop API that are no secret, as [\"Name: value\", ...]. \
         The file is readable by every local user: secret values go in api_headers_file or its credential",
    ),
    (
        "ports",
        "Profile only: the local ports whose connections this profile takes",
    ),
];

impl SettingDoc {
    /// A setting of the host, which only the file's top level may set: its help says so ("Host:",
    /// "Daemon:"), in `--help` as here.
    pub fn host_only(&self) -> bool {
        self.help.starts_with("Host:") || self.help.starts_with("Daemon:")
    }
}

/// Every setting of the file's top level and of its `[profiles.NAME]` tables (that is, every field of
/// [`Settings`] but `profiles`), in the order of `--help`, the file-only keys last.
pub fn settings_reference() -> Vec<SettingDoc> {
    let command = Settings::augment_args(clap::Command::new("settings"));
    let flags = command.get_arguments().map(|arg| SettingDoc {
        key: arg.get_id().to_string(),
        flag: arg.get_long().map(|long| format!("--{long}")),
        env: arg.get_env().map(|env| env.to_string_lossy().into_owned()),
        help: arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default(),
    });
    let file_only = FILE_ONLY.iter().map(|(key, help)| SettingDoc {
        key: (*key).to_owned(),
        flag: None,
        env: None,
        help: (*help).to_owned(),
    });
    flags.chain(file_only).collect()
}
