//! Placement with a real Synapse: the shipped nginx layout in front of the
//! gate and Synapse holds — `probe` finds every registration spelling
//! guarded, a refused name creates no account and a good one registers —
//! while the layout seen to fail in practice (Synapse's documented regex
//! location before an order-dependent registration location) lets Synapse
//! create an account the gate refuses, and `probe` reports it.

use std::net::SocketAddr;

use matrix_gatekeeper::probe;

use crate::proxy_harness::{
    deploy, probe_proxy, Backends, Proxy, Rewrite, ORDER_DEPENDENT_SNIPPET,
    SYNAPSE_DOCUMENTED_LOCATION,
};
use crate::synapse::Synapse;
use crate::{account_exists, gate_for, register_dummy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_layout_holds_and_the_known_bypass_registers_a_refused_name() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(
        &synapse,
        "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n",
    )
    .await;
    let synapse_addr: SocketAddr = synapse.url().trim_start_matches("http://").parse().unwrap();
    let backends = Backends {
        gate: gate.addr,
        client: synapse_addr,
        federation: synapse_addr,
    };

    // The shipped registration-only server: nginx serves the client API
    // from Synapse and sends registration to the gate.
    let rewrite = Rewrite::new(backends);
    let mut proxy = Proxy::nginx(&rewrite.nginx(&deploy("nginx/registration-only.conf")));
    proxy.wait_routing(rewrite.client()).await;
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
    let rewrite = Rewrite::new(backends);
    let server = format!(
        "server {{\n    listen 443;\n{SYNAPSE_DOCUMENTED_LOCATION}\n{ORDER_DEPENDENT_SNIPPET}\n}}\n"
    );
    let mut proxy = Proxy::nginx(&rewrite.nginx(&server));
    proxy.wait_routing(rewrite.client()).await;
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
