//! Placement with a real Synapse: the shipped nginx layout in front of the
//! gate and Synapse holds — `probe` finds every registration spelling
//! guarded, a refused name creates no account and a good one registers —
//! while the layout seen to fail in practice (Synapse's documented regex
//! location before an order-dependent registration location) lets Synapse
//! create an account the gate refuses, and `probe` reports it. A bridge
//! (application service) registers its puppets through each shipped nginx
//! and Caddy layout, registration-only and gate-in-front, through the gate.

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

/// The gate trusts the front proxy on loopback, as the shipped layouts ask.
const TRUST_PROXY: &str = "[client_ip]\ntrusted_proxies = [\"127.0.0.1/32\"]\n";

/// A front proxy and the configuration it runs.
#[derive(Clone, Debug)]
enum Front {
    /// nginx with these `server` blocks.
    Nginx(String),
    /// Caddy with this Caddyfile.
    Caddy(String),
}

impl Front {
    /// The shipped file at `path` under `deploy/`, run by the proxy its
    /// folder names.
    fn shipped(path: &str) -> Front {
        match path.split_once('/') {
            Some(("nginx", _)) => Front::Nginx(deploy(path)),
            Some(("caddy", _)) => Front::Caddy(deploy(path)),
            _ => panic!("no front proxy runs {path}"),
        }
    }
}

/// The proxy `front` (its file rewritten onto free ports) in front of
/// `gate` and `synapse` (which serves both the client and the federation
/// upstream), routing once it returns.
async fn proxy_in_front(synapse: &Synapse, gate: &Gate, front: Front) -> (Rewrite, Proxy) {
    let synapse_addr: SocketAddr = synapse.url().trim_start_matches("http://").parse().unwrap();
    let rewrite = Rewrite::new(Backends {
        gate: gate.addr,
        client: synapse_addr,
        federation: synapse_addr,
    });
    let mut proxy = match front {
        Front::Nginx(http_body) => Proxy::nginx(&rewrite.nginx(&http_body)),
        Front::Caddy(caddyfile) => Proxy::caddy(&rewrite.caddy(&caddyfile)),
    };
    proxy.wait_routing(rewrite.client()).await;
    (rewrite, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nginx_layout_holds_and_the_known_bypass_registers_a_refused_name() {
    let synapse = Synapse::start("").await;
    let gate = gate_for(&synapse, TRUST_PROXY).await;

    // The shipped registration-only server: nginx serves the client API
    // from Synapse and sends registration to the gate.
    let (rewrite, proxy) = proxy_in_front(
        &synapse,
        &gate,
        Front::shipped("nginx/registration-only.conf"),
    )
    .await;
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
    let (rewrite, _proxy) = proxy_in_front(&synapse, &gate, Front::Nginx(server)).await;
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
async fn a_bridge_registers_its_puppets_through_every_shipped_nginx_and_caddy_layout() {
    let (synapse, file) = synapse_with_bridge("placement").await;
    let layouts = [
        "nginx/registration-only.conf",
        "nginx/gate-in-front.conf",
        "caddy/registration-only.Caddyfile",
        "caddy/gate-in-front.Caddyfile",
    ];
    for (n, layout) in layouts.into_iter().enumerate() {
        // A fresh gate per layout: its limits and counter start at zero.
        let gate = gate_with(&synapse.url(), &toml_item(&file), TRUST_PROXY).await;
        let (rewrite, proxy) = proxy_in_front(&synapse, &gate, Front::shipped(layout)).await;
        let through = format!("http://{}", rewrite.client());

        // Both token forms, more puppets than the per-client limits allow:
        // the gate lets the bridge through, and Synapse makes the accounts.
        for m in 0..4 {
            let name = format!("_testbridge_placed{n}_{m}");
            let answer = register_puppet(&through, &name, AS_TOKEN, m % 2 == 1).await;
            assert_eq!(
                answer.status,
                200,
                "{layout}, {name}: {:?}\nproxy log:\n{}",
                answer.body,
                proxy.log()
            );
            assert_eq!(answer.json()["user_id"], format!("@{name}:{SERVER_NAME}"));
            assert_eq!(answer.gate_decision(), Some("allowed"), "{layout}");
            assert!(user_exists(&synapse.url(), &name).await, "{layout}, {name}");
        }
        // A wrong token stops at the gate, in front of Synapse.
        let name = format!("_testbridge_placed{n}_x");
        let answer = register_puppet(&through, &name, "e2e-as-token-wrong", false).await;
        assert_eq!(answer.gate_decision(), Some("refused"), "{layout}");
        answer.assert_error(401, "M_UNKNOWN_TOKEN");
        assert!(!user_exists(&synapse.url(), &name).await, "{layout}");
        let metrics = gate.metrics().await;
        assert!(
            metrics.contains(
                "gatekeeper_appservice_registrations_total{appservice=\"testbridge\"} 4\n"
            ),
            "{layout}: {metrics}"
        );
    }
    let _ = std::fs::remove_file(file);
}
