//! matrix-gatekeeper: a reverse proxy that guards account registration on a
//! Matrix homeserver.
//!
//! The gate intercepts the registration routes of the client-server API,
//! enforces the username grammar and the operator's name and guest policy,
//! and forwards only what it validated, in one canonical form. Every other
//! request passes straight through, streamed.
//!
//! - [`config`]: the typed, strict TOML configuration.
//! - [`gate`]: the tower layer, usable in any tower stack.
//! - [`upstream`]: the pooled client to the homeserver.
//! - [`server`]: the accept loop and graceful shutdown.
//! - [`probe`]: the `probe` command, which checks that registration
//!   requests reach the gate.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod appservice;
pub mod client_ip;
pub mod config;
pub mod defences;
pub mod error;
pub mod explain;
mod fast_path;
pub mod gate;
pub mod notify;
pub mod probe;
pub mod ratelimit;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
mod tls;
pub mod upstream;

pub use config::Config;
pub use gate::{NetworkView, RegistrationGate, RegistrationGateLayer};
pub use server::{build_service, Server};
