//! Placement with a real Synapse: the shipped nginx layout in front of the
//! gate and Synapse holds — `probe` finds every registration spelling
//! guarded, a refused name creates no account and a good one registers —
//! while the layout seen to fail in practice (Synapse's documented regex
//! location before an order-dependent registration location) lets Synapse
//! create an account the gate refuses, and `probe` reports it. A bridge
//! (application service) registers its puppets through the shipped layout,
//! through the gate.

use std::net::SocketAddr;

use matrix_gatekeeper::probe;

use crate::appservice::{
    gate_with, register_puppet, synapse_with_bridge, toml_item, user_exists, AS_TOKEN,
};
use crate::common::{Gate, Listeners};
use crate::proxy_harness::{
    deploy, probe_proxy, Backends, Proxy, Rewrite, ORDER_DEPENDENT_SNIPPET,
    SYNAPSE_DOCUMENTED_LOCATION,
};
use crate::synapse::{Synapse, SERVER_NAME};
use crate::{account_exists, gate_for, register_dummy};

/// The gate trusts nginx on loopback, as the shipped layouts ask.
const TRUST_NGINX: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

/// nginx with `http_body` (rewritten onto free ports) in front of `gate`
/// and `synapse` (which serves both the client and the federation
/// upstream), routing once it returns.
async fn nginx_in_front(synapse: &Synapse, gate: &Gate, http_body: &str) -> (Rewrite, Proxy) {
    let synapse_addr: SocketAddr = synapse.url().trim_start_matches("http://").parse().unwrap();
    let rewrite = Rewrite::new(Backends {
        gate: gate.addr,
        client: synapse_addr,
        federation: synapse_addr,
    });
    let mut proxy = Proxy::nginx(&rewrite.nginx(http_body));
    proxy.wait_routing(rewrite.client()).await;
    (rewrite, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_layout_holds_and_the_known_bypass_registers_a_refused_name() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, TRUST_NGINX).await;

    // The shipped registration-only server: nginx serves the client API
    // from Synapse and sends registration to the gate.
    let (rewrite, proxy) =
        nginx_in_front(&synapse, &gate, &deploy("nginx/registration-only.conf")).await;
    let report = probe_proxy(&rewrite, true).await;
    assert_eq!(
        report.exit_status(),
        probe::EXIT_GUARDED,
        "{report}\nproxy log:\n{}",
        proxy.log()
    );
    let through = format!("http://{}", rewrite.client());
    register_dummy(&through, "Administrator", &[])
        .await
        .assert_error(400, "M_USER_IN_USE");
    assert!(!account_exists(&synapse, "administrator").await);
    let answer = register_dummy(&through, "placed-well", &[]).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(account_exists(&synapse, "placed-well").await);
    drop(proxy);

    // The layout seen in the field: Synapse's documented location first.
    let server = format!(
        "server {{\n    listen 443;\n{SYNAPSE_DOCUMENTED_LOCATION}\n{ORDER_DEPENDENT_SNIPPET}\n}}\n"
    );
    let (rewrite, _proxy) = nginx_in_front(&synapse, &gate, &server).await;
    let report = probe_proxy(&rewrite, false).await;
    assert_eq!(report.exit_status(), probe::EXIT_NOT_GUARDED, "{report}");
    let named: Vec<&str> = report.not_guarded().map(|p| p.label.as_str()).collect();
    assert!(named.contains(&"v3/register (canonical)"), "{named:?}");
    // What the probe reports is real: Synapse creates the refused name.
    let through = format!("http://{}", rewrite.client());
    let answer = register_dummy(&through, "Administrator", &[]).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert!(account_exists(&synapse, "administrator").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_registers_its_puppets_through_the_shipped_nginx_layout() {
    let (synapse, file) = synapse_with_bridge("placement").await;
    let gate = gate_with(&synapse.url(), &toml_item(&file), TRUST_NGINX).await;
    let (rewrite, proxy) =
        nginx_in_front(&synapse, &gate, &deploy("nginx/registration-only.conf")).await;
    let through = format!("http://{}", rewrite.client());

    // Both token forms, more puppets than the per-client limits allow: the
    // gate lets the bridge through, and Synapse makes the accounts.
    for n in 0..4 {
        let name = format!("_testbridge_placed{n}");
        let answer = register_puppet(&through, &name, AS_TOKEN, n % 2 == 1).await;
        assert_eq!(
            answer.status,
            200,
            "{name}: {:?}\nproxy log:\n{}",
            answer.body,
            proxy.log()
        );
        assert_eq!(answer.json()["user_id"], format!("@{name}:{SERVER_NAME}"));
        assert_eq!(answer.headers["x-matrix-gatekeeper"], "allowed");
        assert!(user_exists(&synapse.url(), &name).await, "{name}");
    }
    // A wrong token stops at the gate, in front of Synapse.
    let answer =
        register_puppet(&through, "_testbridge_placedx", "e2e-as-token-wrong", false).await;
    answer.assert_error(401, "M_UNKNOWN_TOKEN");
    assert_eq!(answer.headers["x-matrix-gatekeeper"], "refused");
    assert!(!user_exists(&synapse.url(), "_testbridge_placedx").await);
    let metrics = gate.metrics().await;
    assert!(
        metrics
            .contains("gatekeeper_appservice_registrations_total{appservice=\"testbridge\"} 4\n"),
        "{metrics}"
    );
    let _ = std::fs::remove_file(file);
}
