//! The gate's defences that do not depend on one request: what it knows
//! of clients and networks before a request arrives, kept current in the
//! background and consulted by the gate on the guarded routes.
//!
//! - [`lists`]: deny lists of addresses and e-mail domains, from files or
//!   fetched from URLs;
//! - [`networks`]: the autonomous system and country of an address, from
//!   MaxMind DB databases;
//! - [`dnsbl`]: DNS blocklists, asked and cached;
//! - [`bans`]: temporary bans set through the admin API, shared through
//!   Redis;
//! - [`lockdown`]: registration closed server-wide after a burst of
//!   completed registrations.

pub mod bans;
pub mod dnsbl;
pub mod lists;
pub mod lockdown;
pub mod networks;
