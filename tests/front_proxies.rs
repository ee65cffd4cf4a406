//! The shipped nginx, Caddy and Traefik configurations, run for real in
//! front of the real gate and stand-in homeservers (one for Synapse's client
//! listener, one for its federation listener), on free loopback ports.
//!
//! Each layout must send every registration spelling, and every spelling
//! of a pick at Synapse's SSO username picker, to the gate (the gate's own
//! refusal comes back, the homeservers see nothing) and ordinary
//! traffic to the homeserver, and its federation port must serve nothing
//! but federation and keys. The layouts in which a registration was seen to
//! reach Synapse in practice are rebuilt here too, and the same check must
//! report them: that is what shows the check can fail.
//!
//! Every layout is also probed from outside with `matrix-gatekeeper probe`
//! (the library's [`probe::run`], the same code as the command): on a
//! shipped layout every spelling of every registration route, at the client
//! and the federation port, is answered by the gate or refused in front of
//! the homeserver (exit status 0); on a bypass layout the probe names the
//! spellings that got through (exit status 1).
//!
//! nginx also runs with TLS, as deployed, with a certificate for the site's
//! name from a CA made for the test: the `probe` command, given the CA,
//! probes the `https://` ports like the plain ones, and refuses to probe
//! (exit status 2, naming the certificate error) without it.

mod common;
mod proxy_harness;

use common::certificates::Certificates;

use std::process::Output;

use common::{FakeHomeserver, Gate};
use matrix_gatekeeper::gate::routes::{classify, GuardedRoute};
use matrix_gatekeeper::probe::{self, Report};
use proxy_harness::{
    check, deploy, free_port, probe_proxy, Backends, Problems, Proxy, Rewrite, Seen, HOST,
    ORDER_DEPENDENT_SNIPPET, PICK_SPELLINGS, SYNAPSE_DOCUMENTED_LOCATION,
};

impl Seen for FakeHomeserver {
    fn seen(&self) -> usize {
        self.requests().len()
    }
}

/// A gate and the two stand-in homeservers.
struct Stand {
    client_hs: FakeHomeserver,
    federation_hs: FakeHomeserver,
    _gate: Gate,
    rewrite: Rewrite,
}

impl Stand {
    async fn start() -> Stand {
        let client_hs = FakeHomeserver::start().await;
        let federation_hs = FakeHomeserver::start().await;
        let gate = Gate::start(
            &client_hs.url(),
            "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
        )
        .await;
        let rewrite = Rewrite::new(Backends {
            gate: gate.addr,
            client: client_hs.addr,
            federation: federation_hs.addr,
        });
        Stand {
            client_hs,
            federation_hs,
            _gate: gate,
            rewrite,
        }
    }

    /// Waits for the proxy, then runs the check on both ports (the
    /// federation port only when `federation`).
    async fn check(&self, proxy: &mut Proxy, federation: bool) -> Problems {
        proxy.wait_routing(self.rewrite.client()).await;
        self.client_hs.clear();
        check(
            self.rewrite.client(),
            federation.then(|| self.rewrite.federation()),
            &self.client_hs,
            &self.federation_hs,
        )
        .await
    }
}

impl Stand {
    /// Probes the running proxy from outside, as an operator would.
    async fn probe(&self, federation: bool) -> Report {
        probe_proxy(&self.rewrite, federation).await
    }
}

fn assert_probe_guarded(name: &str, report: &Report, proxy: &Proxy) {
    assert_eq!(
        report.exit_status(),
        probe::EXIT_GUARDED,
        "{name}: probe found spellings that are not guarded:\n{report}\nproxy log:\n{}",
        proxy.log()
    );
    assert!(report.summary().gate > 0, "{name}: {report}");
}

fn assert_probe_names(name: &str, report: &Report, labels: &[&str]) {
    assert_eq!(
        report.exit_status(),
        probe::EXIT_NOT_GUARDED,
        "{name}: the probe missed the bypass:\n{report}"
    );
    let named: Vec<String> = report.not_guarded().map(|p| p.label.clone()).collect();
    for label in labels {
        assert!(
            named.iter().any(|n| n == label),
            "{name}: the probe did not name {label:?}; it named {named:?}"
        );
    }
}

fn assert_holds(name: &str, problems: &Problems, proxy: &Proxy) {
    assert!(
        problems.is_empty(),
        "{name}: the deployment can be walked around:\n  {}\nproxy log:\n{}",
        problems.join("\n  "),
        proxy.log()
    );
}

fn assert_caught(name: &str, problems: &Problems, expected: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "{name}: the check missed the bypass (wanted a finding with {expected:?}), found:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_picker_spelling_the_check_sends_is_a_pick_to_the_gate() {
    for target in PICK_SPELLINGS {
        let path = target.split_once('?').map_or(*target, |(path, _)| path);
        assert_eq!(classify(path), Some(GuardedRoute::PickUsername), "{target}");
    }
}

// ---------------------------------------------------------------- nginx

/// A federation server proxying everything to a listener that serves both
/// `client` and `federation` (Synapse's generated default).
const FEDERATION_PROXYING_EVERYTHING: &str = "
server {
    listen 8448 ssl http2;
    location / {
        proxy_pass http://127.0.0.1:8008;
        proxy_set_header Host $host;
    }
}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_gate_in_front_holds_on_both_ports() {
    let stand = Stand::start().await;
    let mut proxy = Proxy::nginx(&stand.rewrite.nginx(&deploy("nginx/gate-in-front.conf")));
    let problems = stand.check(&mut proxy, true).await;
    assert_holds("nginx/gate-in-front.conf", &problems, &proxy);
    let report = stand.probe(true).await;
    assert_probe_guarded("nginx/gate-in-front.conf", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_registration_only_holds_on_both_ports() {
    let stand = Stand::start().await;
    let mut proxy = Proxy::nginx(&stand.rewrite.nginx(&deploy("nginx/registration-only.conf")));
    let problems = stand.check(&mut proxy, true).await;
    assert_holds("nginx/registration-only.conf", &problems, &proxy);
    let report = stand.probe(true).await;
    assert_probe_guarded("nginx/registration-only.conf", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_snippet_holds_after_synapses_documented_location() {
    let stand = Stand::start().await;
    let server = format!(
        "server {{\n    listen 443;\n{}\n{}\n}}\n",
        SYNAPSE_DOCUMENTED_LOCATION,
        deploy("nginx/matrix-gatekeeper.conf")
    );
    let mut proxy = Proxy::nginx(&stand.rewrite.nginx(&server));
    let problems = stand.check(&mut proxy, false).await;
    assert_holds("nginx snippet after a regex location", &problems, &proxy);
    let report = stand.probe(false).await;
    assert_probe_guarded("nginx snippet after a regex location", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_bypass_regex_location_before_the_old_snippet_is_caught() {
    let stand = Stand::start().await;
    let server = format!(
        "server {{\n    listen 443;\n{SYNAPSE_DOCUMENTED_LOCATION}\n{ORDER_DEPENDENT_SNIPPET}\n}}\n"
    );
    let mut proxy = Proxy::nginx(&stand.rewrite.nginx(&server));
    let problems = stand.check(&mut proxy, false).await;
    assert_caught(
        "regex location before the old snippet",
        &problems,
        "client port: POST /_matrix/client/v3/register reached the homeserver",
    );
    let report = stand.probe(false).await;
    assert_probe_names(
        "regex location before the old snippet",
        &report,
        &[
            "v3/register (canonical)",
            "r0/register/available (canonical)",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_bypass_federation_port_serving_the_client_api_is_caught() {
    let stand = Stand::start().await;
    // The shipped client server, with a federation server that proxies `/`.
    let shipped = deploy("nginx/gate-in-front.conf");
    let client_server = &shipped[..shipped.rfind("server {").unwrap()];
    let conf = format!("{client_server}{FEDERATION_PROXYING_EVERYTHING}");
    let mut proxy = Proxy::nginx(&stand.rewrite.nginx(&conf));
    let problems = stand.check(&mut proxy, true).await;
    assert_caught(
        "federation server proxying everything",
        &problems,
        "federation port: POST /_matrix/client/v3/register reached a homeserver",
    );
    let report = stand.probe(true).await;
    assert_probe_names(
        "federation server proxying everything",
        &report,
        &["v3/register (canonical)"],
    );
    assert!(
        report.not_guarded().all(|p| p
            .base_url
            .ends_with(&stand.rewrite.federation().port().to_string())),
        "only the federation port is walked around:\n{report}"
    );
}

// ---------------------------------------------------------------- Caddy

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_gate_in_front_holds_on_both_ports() {
    let stand = Stand::start().await;
    let mut proxy = Proxy::caddy(
        &stand
            .rewrite
            .caddy(&deploy("caddy/gate-in-front.Caddyfile")),
    );
    let problems = stand.check(&mut proxy, true).await;
    assert_holds("caddy/gate-in-front.Caddyfile", &problems, &proxy);
    let report = stand.probe(true).await;
    assert_probe_guarded("caddy/gate-in-front.Caddyfile", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caddy_registration_only_holds_on_both_ports() {
    let stand = Stand::start().await;
    let mut proxy = Proxy::caddy(
        &stand
            .rewrite
            .caddy(&deploy("caddy/registration-only.Caddyfile")),
    );
    let problems = stand.check(&mut proxy, true).await;
    assert_holds("caddy/registration-only.Caddyfile", &problems, &proxy);
    let report = stand.probe(true).await;
    assert_probe_guarded("caddy/registration-only.Caddyfile", &report, &proxy);
}

// -------------------------------------------------------------- Traefik

/// An existing Synapse router with no priority: Traefik gives it the length
/// of its rule, here over 100.
const LONG_SYNAPSE_ROUTER: &str = r#"
    existing-synapse:
      entryPoints: [websecure]
      rule: "Host(`matrix.example.org`) && (PathPrefix(`/_matrix`) || PathPrefix(`/_synapse/client`) || PathPrefix(`/_synapse/admin`))"
      service: synapse-client
"#;

fn with_router(dynamic: &str, router: &str) -> String {
    dynamic.replacen("  routers:\n", &format!("  routers:{router}"), 1)
}

/// The registration router as it was first shipped: priority 100, and a
/// rule that takes only `/` as a separator.
fn old_registration_router(dynamic: &str) -> String {
    let rule_start = dynamic.find("      rule: \"PathRegexp(").unwrap();
    let rule_end = rule_start + dynamic[rule_start..].find('\n').unwrap();
    let dynamic = format!(
        "{}      rule: \"PathRegexp(`(?i)^/+(_matrix/+client|_synapse/+admin)/.*register`)\"{}",
        &dynamic[..rule_start],
        &dynamic[rule_end..]
    );
    dynamic.replacen("priority: 2147482647", "priority: 100", 1)
}

async fn traefik_problems(dynamic: &str) -> (Problems, Report, Proxy) {
    let stand = Stand::start().await;
    let dynamic = stand.rewrite.upstreams(dynamic);
    let mut proxy = Proxy::traefik(&stand.rewrite, &deploy("traefik/traefik.yml"), &dynamic);
    let problems = stand.check(&mut proxy, true).await;
    let report = stand.probe(true).await;
    (problems, report, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_gate_in_front_holds_on_both_ports_beside_a_long_router() {
    let dynamic = with_router(&deploy("traefik/gate-in-front.yml"), LONG_SYNAPSE_ROUTER)
        .replace(
            "  services:\n",
            "  services:\n    synapse-client:\n      loadBalancer:\n        servers:\n          - url: \"http://127.0.0.1:8008\"\n",
        );
    let (problems, report, proxy) = traefik_problems(&dynamic).await;
    assert_holds("traefik/gate-in-front.yml", &problems, &proxy);
    assert_probe_guarded("traefik/gate-in-front.yml", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_registration_only_holds_on_both_ports_beside_a_long_router() {
    let dynamic = with_router(
        &deploy("traefik/registration-only.yml"),
        LONG_SYNAPSE_ROUTER,
    );
    let (problems, report, proxy) = traefik_problems(&dynamic).await;
    assert_holds("traefik/registration-only.yml", &problems, &proxy);
    assert_probe_guarded("traefik/registration-only.yml", &report, &proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_bypass_long_router_beats_priority_100_is_caught() {
    let dynamic = with_router(
        &old_registration_router(&deploy("traefik/registration-only.yml")),
        LONG_SYNAPSE_ROUTER,
    );
    let (problems, report, _proxy) = traefik_problems(&dynamic).await;
    assert_caught(
        "long Synapse router against priority 100",
        &problems,
        "client port: POST /_matrix/client/v3/register reached the homeserver",
    );
    assert_probe_names(
        "long Synapse router against priority 100",
        &report,
        &[
            "v3/register (canonical)",
            "v3/register/email/requestToken (canonical)",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traefik_bypass_escaped_slash_past_a_slash_only_rule_is_caught() {
    // The old rule at the highest priority, beside a Synapse router whose
    // prefix (`/_matrix`, no slash) takes the escaped spelling.
    let dynamic = with_router(
        &old_registration_router(&deploy("traefik/registration-only.yml")),
        LONG_SYNAPSE_ROUTER,
    )
    .replacen("priority: 100", "priority: 2147482647", 1);
    let (problems, report, _proxy) = traefik_problems(&dynamic).await;
    assert_caught(
        "slash-only rule",
        &problems,
        "client port: POST /_matrix%2Fclient%2Fv3%2Fregister reached the homeserver",
    );
    // The old rule knew only `register`: the SSO picker went to Synapse.
    assert_caught(
        "slash-only rule",
        &problems,
        "client port: POST /_synapse/client/pick_username/account_details reached the homeserver",
    );
    assert_probe_names(
        "slash-only rule",
        &report,
        &[
            "v3/register (every / as %2F)",
            "_synapse/client/pick_username/check (canonical)",
        ],
    );
}

// ------------------------------------------------------------ over TLS

/// `matrix-gatekeeper probe` with these arguments.
async fn probe_command(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_matrix-gatekeeper"))
        .arg("probe")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect("the binary runs")
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The Stand's two ports as `https://` URLs by address (the certificate is
/// for [`HOST`], given with `--host`).
fn https_urls(stand: &Stand) -> (String, String) {
    (
        format!("https://{}", stand.rewrite.client()),
        format!("https://{}", stand.rewrite.federation()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_over_tls_the_probe_checks_certificates_and_finds_both_ports_guarded() {
    let stand = Stand::start().await;
    let certificates = Certificates::make(&format!("probe-tls-{}", free_port()), HOST);
    let conf = stand.rewrite.nginx_tls(
        &deploy("nginx/gate-in-front.conf"),
        &certificates.certificate,
        &certificates.key,
    );
    let mut proxy = Proxy::nginx(&conf);
    proxy.wait_listening(stand.rewrite.client()).await;
    proxy.wait_listening(stand.rewrite.federation()).await;
    let (client, federation) = https_urls(&stand);
    let ca = certificates.ca.display().to_string();

    let guarded = probe_command(&[
        &client,
        &federation,
        "--host",
        HOST,
        "--ca-file",
        &ca,
        "--json",
    ])
    .await;
    let json: serde_json::Value = serde_json::from_slice(&guarded.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout_of(&guarded)));
    assert_eq!(
        guarded.status.code(),
        Some(i32::from(probe::EXIT_GUARDED)),
        "{json:#}\nproxy log:\n{}",
        proxy.log()
    );
    let probes_per_url = probe::ROUTES.len() * probe::VARIANTS.len();
    assert_eq!(json["summary"]["probes"], 2 * probes_per_url);
    assert_eq!(json["summary"]["nothing"], 0, "{json:#}");
    assert_eq!(json["summary"]["homeserver"], 0, "{json:#}");
    // The client port's answers are the gate's, through nginx over TLS; the
    // federation port refuses in front.
    assert!(json["summary"]["gate"].as_u64().unwrap() >= probes_per_url as u64);
    for row in json["probes"].as_array().unwrap() {
        let url = row["url"].as_str().unwrap();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");
        if row["base_url"] == client.as_str() {
            assert_eq!(row["answered_by"], "gate", "{row}");
        } else {
            assert_eq!(row["answered_by"], "front", "{row}");
        }
    }
    // Through the gate, the homeserver sees only the probe's reads of the
    // delegation metadata, which the gate passes through.
    let reached: Vec<String> = stand
        .client_hs
        .requests()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert!(
        reached
            .iter()
            .all(|t| probe::AUTH_METADATA_PATHS.contains(&t.as_str())),
        "{reached:?}"
    );
    assert!(stand.federation_hs.requests().is_empty());
    stand.client_hs.clear();

    // The test CA is not a public root: without it no handshake succeeds,
    // and the probe says why instead of counting a verdict.
    let untrusted = probe_command(&[&client, &federation, "--host", HOST]).await;
    let text = stdout_of(&untrusted);
    assert_eq!(
        untrusted.status.code(),
        Some(i32::from(probe::EXIT_CANNOT_RUN)),
        "{text}"
    );
    for url in [&client, &federation] {
        assert!(
            text.contains(&format!(
                "NOTHING ANSWERED at {url} (TLS handshake: invalid peer certificate: UnknownIssuer)"
            )),
            "{text}"
        );
    }

    // Trusted, but for another name than the one checked.
    let wrong_name =
        probe_command(&[&client, "--host", "elsewhere.example.org", "--ca-file", &ca]).await;
    let text = stdout_of(&wrong_name);
    assert_eq!(
        wrong_name.status.code(),
        Some(i32::from(probe::EXIT_CANNOT_RUN)),
        "{text}"
    );
    assert!(text.contains("certificate not valid for name"), "{text}");
    assert!(stand.client_hs.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_over_tls_a_bypass_is_named() {
    let stand = Stand::start().await;
    let certificates = Certificates::make(&format!("probe-tls-{}", free_port()), HOST);
    // The regex location before the old snippet, served over TLS.
    let server = format!(
        "server {{\n    listen 443 ssl;\n    ssl_certificate cert.pem;\n    \
         ssl_certificate_key key.pem;\n{SYNAPSE_DOCUMENTED_LOCATION}\n{ORDER_DEPENDENT_SNIPPET}\n}}\n"
    );
    let conf = stand
        .rewrite
        .nginx_tls(&server, &certificates.certificate, &certificates.key);
    let mut proxy = Proxy::nginx(&conf);
    proxy.wait_listening(stand.rewrite.client()).await;
    let (client, _) = https_urls(&stand);
    let ca = certificates.ca.display().to_string();

    let bypassed = probe_command(&[&client, "--host", HOST, "--ca-file", &ca]).await;
    let text = stdout_of(&bypassed);
    assert_eq!(
        bypassed.status.code(),
        Some(i32::from(probe::EXIT_NOT_GUARDED)),
        "{text}\nproxy log:\n{}",
        proxy.log()
    );
    assert!(text.contains("NOT GUARDED: "), "{text}");
    for label in [
        "v3/register (canonical)",
        "r0/register/available (canonical)",
    ] {
        assert!(
            text.contains(&format!("  {label} at {client}  ({client}/")),
            "{label}: {text}"
        );
    }
    assert!(!stand.client_hs.requests().is_empty());
}
