//! `[registration]`: the registration routes as a whole: open or closed,
//! enforced or shadowed, and the lockdown that closes them when
//! registrations come too fast.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;
use super::values::{string_enum, HumanDuration};

/// `[registration]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// `false`: every registration route answers `403 M_FORBIDDEN`.
    pub enabled: bool,
    /// Largest registration body accepted.
    pub max_body_bytes: usize,
    /// Whether Synapse's shared-secret admin registration may be reached
    /// through the gate.
    pub allow_admin_register: bool,
    /// `enforce`, or `shadow`: forward everything and only log and count
    /// what would have been refused.
    pub mode: GateMode,
    /// Closes registration for a while when completed registrations come
    /// too fast, server-wide (absent: off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lockdown: Option<LockdownSpec>,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        RegistrationConfig {
            enabled: true,
            max_body_bytes: 65536,
            allow_admin_register: false,
            mode: GateMode::Enforce,
            lockdown: None,
        }
    }
}

impl RegistrationConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "registration.max_body_bytes",
                "must be greater than zero",
            ));
        }
        if let Some(lockdown) = &self.lockdown {
            lockdown.validate()?;
        }
        Ok(())
    }
}

string_enum!(
    /// Whether the gate enforces its decisions.
    GateMode {
        /// Refusals are answered.
        Enforce => "enforce",
        /// Everything is forwarded; refusals are only logged and counted.
        Shadow => "shadow",
    } default Enforce
);

/// `[registration] lockdown = { count = N, period = P, close_for = D }`:
/// when N registrations complete within P (a sliding window), registration
/// closes for D.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LockdownSpec {
    /// Completed registrations that close registration.
    pub count: u32,
    /// The window they are counted in.
    pub period: HumanDuration,
    /// How long registration stays closed.
    pub close_for: HumanDuration,
}

impl LockdownSpec {
    /// Largest `count`: the window keeps one timestamp per registration.
    pub const MAX_COUNT: u32 = 100_000;

    fn validate(&self) -> Result<(), ConfigError> {
        if self.count == 0 || self.count > Self::MAX_COUNT {
            return Err(ConfigError::invalid(
                "registration.lockdown.count",
                format!(
                    "expected 1 to {} (remove lockdown to turn it off), got {}",
                    Self::MAX_COUNT,
                    self.count
                ),
            ));
        }
        self.period.check_positive("registration.lockdown.period")?;
        self.close_for
            .check_positive("registration.lockdown.close_for")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn body_limit_and_mode_are_named() {
        assert!(
            err("[registration]\nmax_body_bytes = 0\n").starts_with("registration.max_body_bytes:")
        );
        let c = Config::from_toml("[registration]\nmode = \"shadow\"\n").unwrap();
        assert_eq!(c.registration.mode, GateMode::Shadow);
        assert!(err("[registration]\nmode = \"loud\"\n").starts_with("registration.mode:"));
    }
}
