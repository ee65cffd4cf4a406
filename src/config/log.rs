//! `[log]`: the format and level of log lines.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::string_enum;

/// `[log]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A level or `tracing` filter (`info`, `debug`,
    /// `matrix_gatekeeper=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        check_log_filter(&self.level).map_err(|message| {
            ConfigError::invalid("log.level", format!("{message}: \"{}\"", self.level))
        })
    }
}

string_enum!(
    /// Log line format.
    LogFormat {
        /// Human-readable lines.
        Text => "text",
        /// One JSON object per line.
        Json => "json",
    } default Text
);

/// The level names a log filter takes.
const LOG_LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Checks a log filter (`log.level` or `RUST_LOG`): comma-separated
/// directives, each a level (`info`) or `target=level`
/// (`matrix_gatekeeper::audit=warn`). `tracing`'s own parser also takes a
/// bare word as a target to log at every level, which turns a typo such as
/// `inof` into a filter that silently drops every line; that is refused.
pub fn check_log_filter(filter: &str) -> Result<(), String> {
    let is_level = |word: &str| {
        LOG_LEVELS
            .iter()
            .any(|l| l.eq_ignore_ascii_case(word.trim()))
    };
    if filter.split(',').all(|d| d.trim().is_empty()) {
        return Err("empty; expected a level such as info".to_owned());
    }
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.trim().is_empty() => level,
            Some(_) => return Err(format!("directive {directive:?} names no target")),
            None => directive,
        };
        if !is_level(level) {
            return Err(format!(
                "{level:?} is not a level (expected one of {})",
                LOG_LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|e| format!("not a filter ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn format_and_level_parse() {
        let c = Config::from_toml("[log]\nformat = \"json\"\nlevel = \"debug\"\n").unwrap();
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "debug");
    }

    #[test]
    fn level_typos_are_refused() {
        assert!(err("[log]\nlevel = \"very=loud=x\"\n").starts_with("log.level:"));
        for typo in [
            "inof",
            "",
            " , ",
            "debug,matrix_gatekeeper",
            "=info",
            "x=loud",
        ] {
            let message = err(&format!("[log]\nlevel = \"{typo}\"\n"));
            assert!(message.starts_with("log.level:"), "{typo:?}: {message}");
        }
        for good in [
            "info",
            "WARN",
            "warn,matrix_gatekeeper::audit=info",
            "a[span]=debug",
        ] {
            Config::from_toml(&format!("[log]\nlevel = \"{good}\"\n"))
                .unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
    }
}
