//! `[guest]`: whether guests may register.

use serde::{Deserialize, Serialize};

use super::values::string_enum;

/// `[guest]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Whether `kind=guest` registrations may pass.
    pub access: GuestAccess,
}

string_enum!(
    /// Whether guests may register.
    GuestAccess {
        /// Guest registration passes with a stripped body.
        Allow => "allow",
        /// Guest registration is refused with `403 M_FORBIDDEN`.
        Deny => "deny",
    } default Deny
);
