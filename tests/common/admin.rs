//! The admin API's test helpers: a token file, a gate with its admin
//! listener, and requests that carry the token.

use http::Method;
use matrix_gatekeeper::Config;

use super::{send, Answer, FakeHomeserver, Gate, Listeners};

pub const TOKEN: &str = "s3cr3t-admin-token-0123456789";

/// A token file of its own for each test.
pub fn token_file(name: &str, token: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mgk-admin-{}-{name}.token", std::process::id()));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    path
}

pub fn toml(hs: &FakeHomeserver, extra: &str) -> String {
    format!(
        "[upstream]\nurl = \"{}\"\nresponse_timeout = \"10s\"\nconnect_timeout = \"2s\"\n{extra}",
        hs.url()
    )
}

/// A gate with its admin listener and, when `token` names a file, the API.
pub async fn gate(hs: &FakeHomeserver, extra: &str, token: Option<&std::path::Path>) -> Gate {
    let admin = token
        .map(|path| format!("[admin]\ntoken_file = \"{}\"\n", path.display()))
        .unwrap_or_default();
    let config = Config::from_toml(&toml(hs, &format!("{extra}{admin}"))).unwrap();
    Gate::start_full(config, true, None).await
}

pub const LIMITS: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1\"]\n\
    [rate_limit]\nregistrations_per_ip = { count = 2, period = \"1h\" }\n\
    registrations_global = { count = 1000, period = \"1h\" }\n";

/// A registration from `client` (through the trusted proxy of
/// [`LIMITS`]) that the homeserver completes.
pub async fn register(gate: &Gate, client: &str) -> Answer {
    send(
        Method::POST,
        &gate.url("/_matrix/client/v3/register"),
        &[
            ("content-type", "application/json"),
            ("x-forwarded-for", client),
            ("x-test-status", "200"),
        ],
        r#"{"username":"someone"}"#,
    )
    .await
}

/// An admin request with the right token.
pub async fn admin(gate: &impl Listeners, method: Method, path: &str, body: &str) -> Answer {
    let auth = format!("Bearer {TOKEN}");
    send(
        method,
        &gate.admin_url(path),
        &[("authorization", auth.as_str())],
        body.to_owned(),
    )
    .await
}

/// `DELETE /v1/clients/{client}/limits`: gives `client` its budgets back.
pub async fn reset_limits(gate: &impl Listeners, client: &str) -> Answer {
    admin(
        gate,
        Method::DELETE,
        &format!("/v1/clients/{client}/limits"),
        "",
    )
    .await
}
