//! `[username]`: which localparts may be registered.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{string_enum, DenyPattern};

/// `[username]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsernameConfig {
    /// How upper-case letters are treated.
    pub case: CaseMode,
    /// Names nobody may register (answered as taken).
    pub reserved: Vec<String>,
    /// Also refuse look-alikes of reserved names.
    pub reserved_lookalikes: bool,
    /// Regexes over the mapped localpart; a match refuses the name.
    pub deny_patterns: Vec<DenyPattern>,
    /// Allow localparts starting with `_` (appservice namespace).
    pub allow_leading_underscore: bool,
    /// Allow all-digit localparts (Synapse's guest namespace).
    pub allow_numeric: bool,
}

/// The reserved names used when the operator gives none.
pub const DEFAULT_RESERVED: &[&str] = &[
    "abuse",
    "admin",
    "administrator",
    "help",
    "helpdesk",
    "hostmaster",
    "info",
    "mailer-daemon",
    "matrix",
    "mod",
    "moderator",
    "noc",
    "noreply",
    "no-reply",
    "official",
    "postmaster",
    "root",
    "security",
    "server",
    "staff",
    "support",
    "synapse",
    "sysadmin",
    "system",
    "webmaster",
];

impl Default for UsernameConfig {
    fn default() -> Self {
        UsernameConfig {
            case: CaseMode::Lowercase,
            reserved: DEFAULT_RESERVED.iter().map(|s| (*s).to_owned()).collect(),
            reserved_lookalikes: true,
            deny_patterns: Vec::new(),
            allow_leading_underscore: false,
            allow_numeric: false,
        }
    }
}

impl UsernameConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (i, reserved) in self.reserved.iter().enumerate() {
            if reserved.is_empty() || reserved.chars().any(|c| c.is_uppercase()) {
                return Err(ConfigError::invalid(
                    format!("username.reserved[{i}]"),
                    format!("reserved names are non-empty and lowercase, got \"{reserved}\""),
                ));
            }
        }
        Ok(())
    }
}

string_enum!(
    /// How upper-case letters in a requested username are treated.
    CaseMode {
        /// Map to lower case exactly as Synapse does, then check.
        Lowercase => "lowercase",
        /// Refuse names that are not already lower case.
        Reject => "reject",
    } default Lowercase
);

#[cfg(test)]
mod tests {
    use crate::config::tests::err;

    #[test]
    fn bad_regex_and_reserved_names_are_named() {
        assert!(err("[username]\ndeny_patterns = [\"(\"]\n").starts_with("username.deny_patterns"));
        assert!(err("[username]\nreserved = [\"Admin\"]\n").starts_with("username.reserved[0]:"));
    }
}
