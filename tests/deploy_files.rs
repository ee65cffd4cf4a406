//! Every file in `deploy/` parses, and the gate configuration inside each
//! deployment passes `matrix-gatekeeper check`. No container engine runs
//! in this test suite: images and manifests are checked as files.

use std::path::{Path, PathBuf};

use matrix_gatekeeper::config::Config;
use matrix_gatekeeper::ratelimit::RateLimiter;
use matrix_gatekeeper::telemetry::Metrics;
use regex::Regex;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn all_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    files(&deploy_dir(), &mut out);
    out.sort();
    out
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .collect()
}

use serde::Deserialize;

fn braces_balance(text: &str) -> bool {
    let mut depth = 0i32;
    for c in text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .flat_map(str::chars)
    {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth < 0 {
            return false;
        }
    }
    depth == 0
}

#[test]
fn every_deploy_file_is_well_formed() {
    let files = all_files();
    assert!(files.len() >= 10, "deploy/ looks incomplete: {files:?}");
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        let text = read(path);
        match path.extension().and_then(|e| e.to_str()) {
            Some("yml" | "yaml") => {
                assert!(!yaml_documents(path).is_empty(), "{name}");
            }
            Some("toml") => {
                if let Err(e) = Config::from_file(path) {
                    panic!("{}: {e}", path.display());
                }
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            Some("conf") => assert!(braces_balance(&text), "{name}: unbalanced braces"),
            Some("service") => {
                for key in ["ExecStart=", "ExecReload=", "[Install]"] {
                    assert!(text.contains(key), "{name}: no {key}");
                }
            }
            Some("Caddyfile") => assert!(braces_balance(&text), "{name}"),
            _ if name == "Dockerfile" => {}
            _ => panic!("{}: no check for this kind of file", path.display()),
        }
    }
}

#[test]
fn dockerfile_builds_in_stages_and_runs_as_non_root_with_a_health_check() {
    let text = read(&deploy_dir().join("docker/Dockerfile"));
    let froms = text.lines().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "multi-stage build");
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "{user}"
    );
    assert!(text.contains("HEALTHCHECK"));
    assert!(text.contains("healthcheck\", \"--url\", \"http://127.0.0.1:9009/healthz"));
    // Every COPY source exists in the repository.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for line in text
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            assert!(
                root.join(source).exists(),
                "COPY source {source} is missing"
            );
        }
    }
    // The image's own configuration serves the health check.
    let config = Config::from_file(&deploy_dir().join("docker/gatekeeper.toml")).unwrap();
    assert_eq!(config.server.admin_listen.unwrap().0.port(), 9009);
}

#[test]
fn compose_runs_two_gates_sharing_redis_in_front_of_an_unpublished_synapse() {
    let docs = yaml_documents(&deploy_dir().join("compose/docker-compose.yml"));
    let services = &docs[0]["services"];
    assert!(
        services["synapse"]["ports"].is_null(),
        "synapse must not publish ports"
    );
    let gate = &services["gatekeeper"];
    assert_eq!(gate["deploy"]["replicas"], 2);
    let mount = gate["volumes"][0].as_str().unwrap();
    let (source, target) = mount.split_once(':').unwrap();
    assert!(target.starts_with("/etc/matrix-gatekeeper/gatekeeper.toml"));
    let config = Config::from_file(&deploy_dir().join("compose").join(source)).unwrap();
    assert_eq!(config.rate_limit.store.as_str(), "redis");
    assert_eq!(
        config.rate_limit.redis_url.as_deref(),
        Some("redis://redis:6379")
    );
    assert_eq!(config.upstream.url.host(), Some("synapse"));
    assert!(!services["redis"].is_null());
}

#[test]
fn kubernetes_manifests_carry_a_valid_config_and_probe_the_admin_port() {
    let docs = yaml_documents(&deploy_dir().join("kubernetes/matrix-gatekeeper.yaml"));
    let kind = |k: &'static str| docs.iter().filter(move |d| d["kind"] == k);
    let map = kind("ConfigMap").next().expect("a ConfigMap");
    let config = Config::from_toml(map["data"]["gatekeeper.toml"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("ConfigMap config: {e}"));
    let admin_port = config.server.admin_listen.expect("admin listener").0.port();
    let deployment = kind("Deployment")
        .find(|d| d["metadata"]["name"] == "matrix-gatekeeper")
        .unwrap();
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let admin = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap();
    assert_eq!(admin["containerPort"].as_u64(), Some(u64::from(admin_port)));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(kind("Service").count() >= 1);
    let redis_url = config.rate_limit.redis_url.unwrap();
    let redis_service = redis_url
        .trim_start_matches("redis://")
        .split(':')
        .next()
        .unwrap();
    assert!(
        kind("Service").any(|s| s["metadata"]["name"] == redis_service),
        "a Service for {redis_service}"
    );
}

/// Paths the routing snippets must send to the gate, and paths they must not.
const REGISTRATION_SPELLINGS: &[&str] = &[
    "/_matrix/client/v3/register",
    "/_matrix/client/r0/register/available",
    "/_matrix/client/unstable/register/email/requestToken",
    "/_matrix/client/v1/register/m.login.registration_token/validity",
    "//_matrix//client/V3/REGISTER/",
    "/_synapse/admin/v1/register",
];
const OTHER_PATHS: &[&str] = &[
    "/_matrix/client/v3/sync",
    "/_matrix/media/v3/upload",
    "/_matrix/client/versions",
];

fn routing_regexes() -> Vec<(String, Regex)> {
    let mut out = Vec::new();
    let nginx = read(&deploy_dir().join("nginx/matrix-gatekeeper.conf"));
    let line = nginx
        .lines()
        .find(|l| l.starts_with("location ~* "))
        .unwrap();
    let pattern = line
        .trim_start_matches("location ~* ")
        .trim_end_matches(" {");
    out.push((
        "nginx".to_owned(),
        Regex::new(&format!("(?i){pattern}")).unwrap(),
    ));
    let caddy = read(&deploy_dir().join("caddy/registration-only.Caddyfile"));
    let line = caddy
        .lines()
        .find(|l| l.trim_start().starts_with("@registration path_regexp"))
        .unwrap();
    let pattern = line.split_whitespace().last().unwrap();
    out.push(("caddy".to_owned(), Regex::new(pattern).unwrap()));
    let traefik = yaml_documents(&deploy_dir().join("traefik/registration-only.yml"));
    let rule = traefik[0]["http"]["routers"]["matrix-registration"]["rule"]
        .as_str()
        .unwrap();
    let pattern = rule
        .split("PathRegexp(`")
        .nth(1)
        .unwrap()
        .split("`)")
        .next()
        .unwrap();
    out.push(("traefik".to_owned(), Regex::new(pattern).unwrap()));
    out
}

#[test]
fn routing_snippets_send_every_registration_spelling_to_the_gate() {
    for (name, regex) in routing_regexes() {
        for path in REGISTRATION_SPELLINGS {
            assert!(regex.is_match(path), "{name} misses {path}");
        }
        for path in OTHER_PATHS {
            assert!(!regex.is_match(path), "{name} routes {path} to the gate");
        }
    }
}

#[test]
fn nginx_accepts_the_snippet() {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .find(|p| Path::new(p).exists())
    else {
        panic!("nginx is not installed (scripts/test installs it)");
    };
    let dir = std::env::temp_dir().join(format!("mgk-nginx-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let snippet = deploy_dir().join("nginx/matrix-gatekeeper.conf");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\nevents {{}}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
             server {{\n    listen 127.0.0.1:1;\n    include {snippet};\n  }}\n}}\n",
            dir = dir.display(),
            snippet = snippet.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(nginx)
        .arg("-t")
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(&conf)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_dashboard_uses_only_metrics_the_gate_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy_dir().join("grafana/matrix-gatekeeper.json"))).unwrap();
    let exported = Metrics::default().render(&RateLimiter::new(&Default::default()));
    let names = Regex::new(r"gatekeeper_[a-z_]+").unwrap();
    let mut used = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for name in names.find_iter(expr) {
                used += 1;
                assert!(
                    exported.contains(&format!("# TYPE {} ", name.as_str()))
                        || exported.contains(&format!("{} ", name.as_str()))
                        || exported.contains(&format!("{}{{", name.as_str())),
                    "panel {:?} uses {} which the gate does not export",
                    panel["title"],
                    name.as_str()
                );
            }
        }
    }
    assert!(
        used >= 8,
        "the dashboard uses only {used} metric references"
    );
}
