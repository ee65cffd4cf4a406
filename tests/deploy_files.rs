//! Every file in `deploy/` parses, and the gate configuration inside each
//! deployment passes `matrix-gatekeeper check`. Here images and manifests
//! are checked as files; `tests/container.rs` builds and runs the image.

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
            _ if name == "Caddyfile" => assert!(braces_balance(&text), "{name}"),
            // fail2ban's jail (its filter is a .conf; both run through
            // fail2ban-regex below).
            Some("local") => assert!(text.contains("[matrix-gatekeeper]"), "{name}"),
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

    // The front proxy is in the file, and the gates trust exactly it.
    let caddy = &services["caddy"];
    let caddy_ip: std::net::IpAddr = caddy["networks"]["matrix"]["ipv4_address"]
        .as_str()
        .expect("caddy has a fixed address")
        .parse()
        .unwrap();
    let trusted: Vec<String> = config
        .client_ip
        .trusted_proxies
        .iter()
        .map(|n| n.0.to_string())
        .collect();
    assert_eq!(trusted, [format!("{caddy_ip}/32")], "trusted_proxies");
    let published: Vec<&str> = caddy["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(published.contains(&"443:443") && published.contains(&"8448:8448"));
    for (name, service) in services.as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        let image = service["image"].as_str().unwrap();
        let (_, tag) = image.rsplit_once(':').expect("an image tag");
        assert!(
            tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()),
            "{name}: image {image} is not pinned to a version"
        );
        if name != "caddy" {
            assert!(service["ports"].is_null(), "{name} publishes ports");
        }
    }
    for (service, needs) in [
        ("gatekeeper", ["synapse", "redis"]),
        ("caddy", ["gatekeeper", "synapse"]),
    ] {
        for need in needs {
            assert_eq!(
                services[service]["depends_on"][need]["condition"], "service_healthy",
                "{service} waits for {need}"
            );
        }
    }
    for name in ["synapse", "redis"] {
        assert!(
            services[name]["healthcheck"]["test"].is_sequence(),
            "{name}"
        );
    }
    let text = read(&deploy_dir().join("compose/docker-compose.yml"));
    for key in [
        "enable_registration:",
        "x_forwarded: true",
        "registration_requires_token",
    ] {
        assert!(text.contains(key), "compose documents Synapse's {key}");
    }
}

/// The build context keeps out everything the Dockerfile does not copy.
#[test]
fn dockerignore_admits_exactly_what_the_dockerfile_copies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ignore = read(&root.join(".dockerignore"));
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(rules.first(), Some(&"*"), "starts by excluding everything");
    let admitted: Vec<&str> = rules
        .iter()
        .filter_map(|r| r.strip_prefix('!'))
        .map(|r| r.trim_end_matches('/'))
        .collect();
    let dockerfile = read(&deploy_dir().join("docker/Dockerfile"));
    for line in dockerfile
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for source in &parts[1..parts.len() - 1] {
            let source = source.trim_end_matches('/');
            assert!(
                admitted.contains(&source),
                ".dockerignore keeps out {source}, which the Dockerfile copies"
            );
        }
    }
    assert!(!admitted.iter().any(|a| *a == "target" || *a == ".git"));
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

    // Images an operator builds and pushes, pulled only when missing.
    let image = container["image"].as_str().unwrap();
    assert!(
        !image.ends_with(":latest") && image.contains('/'),
        "{image}"
    );
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    // Endpoints drain before SIGTERM, and the grace period covers the wait
    // and the gate's own drain.
    let pre_stop = &container["lifecycle"]["preStop"]["exec"]["command"];
    let wait: u64 = pre_stop[1].as_str().unwrap().parse().unwrap();
    assert_eq!(pre_stop[0], "/bin/sleep");
    let grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let drain = config.server.shutdown_timeout.0.as_secs();
    assert!(grace > wait + drain, "grace {grace} <= {wait} + {drain}");
    let pdb = kind("PodDisruptionBudget")
        .next()
        .expect("a PodDisruptionBudget");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    let redis = kind("Deployment")
        .find(|d| d["metadata"]["name"] == redis_service)
        .unwrap();
    for d in [deployment, redis] {
        let pod = &d["spec"]["template"]["spec"];
        let name = d["metadata"]["name"].as_str().unwrap();
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        let c = &pod["containers"][0];
        assert!(!c["image"].as_str().unwrap().ends_with(":latest"), "{name}");
        assert!(c["resources"]["limits"]["memory"].is_string(), "{name}");
        assert!(c["resources"]["requests"]["cpu"].is_string(), "{name}");
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["capabilities"]["drop"][0], "ALL",
            "{name}"
        );
        assert!(c["livenessProbe"].is_mapping(), "{name}");
        assert!(c["readinessProbe"].is_mapping(), "{name}");
    }
}

fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The unit's hardening, its secret handling, and systemd's own exposure
/// score for it.
#[test]
fn systemd_unit_is_hardened_and_keeps_its_configuration_private() {
    let path = deploy_dir().join("systemd/matrix-gatekeeper.service");
    let settings = unit_settings(&read(&path));
    let get = |key: &str| -> Vec<&str> {
        settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    for (key, value) in [
        ("DynamicUser", "yes"),
        ("ProtectClock", "yes"),
        ("ProtectKernelLogs", "yes"),
        ("ProtectHostname", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("SystemCallArchitectures", "native"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("UMask", "0077"),
        ("SystemCallFilter", "@system-service"),
        ("ProtectSystem", "strict"),
        ("CapabilityBoundingSet", ""),
    ] {
        assert!(get(key).contains(&value), "{key}={value} missing");
    }
    // The configuration (it may hold the Redis password) is handed over as
    // a credential, and the gate reads that copy.
    let credential = get("LoadCredential");
    assert_eq!(
        credential,
        ["gatekeeper.toml:/etc/matrix-gatekeeper/gatekeeper.toml"]
    );
    for key in ["ExecStart", "ExecStartPre"] {
        assert!(
            get(key)[0].ends_with("--config %d/gatekeeper.toml"),
            "{key}"
        );
    }
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-analyze is not installed (scripts/test installs systemd)");
    let (ok, out) = run(std::process::Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path));
    assert!(ok, "systemd-analyze security: {out}");
    let score: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for matrix-gatekeeper.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {out}"));
    assert!(
        score <= 1.5,
        "exposure {score} (was 1.1 when last measured)"
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
    // As nginx and Caddy leave `r%2565gister` after decoding it once, and
    // as Traefik sees it.
    "/_matrix/client/v3/r%65gister",
    "/_matrix/client/v3/r%2565gister",
    // Synapse's SSO username picker, which makes accounts too.
    "/_synapse/client/pick_username/account_details",
    "/_synapse/client/pick_username/check",
    "//_SYNAPSE//Client/Pick_Username/CHECK/",
    "/_synapse/client/pick_us%65rname/check",
    "/_synapse/client/pick%255Fusername/account_details",
];
const OTHER_PATHS: &[&str] = &[
    "/_matrix/client/v3/sync",
    "/_matrix/media/v3/upload",
    "/_matrix/client/versions",
    "/_synapse/client/oidc/callback",
    "/_synapse/client/pick_idp",
    "/_synapse/client/new_user_consent",
];

/// Every regex each registration-only layout sends to the gate (a path goes
/// to the gate when any of its proxy's regexes matches).
fn routing_regexes() -> Vec<(String, Vec<Regex>)> {
    let mut out = Vec::new();
    let nginx = read(&deploy_dir().join("nginx/matrix-gatekeeper.conf"));
    let nginx_regexes = nginx
        .lines()
        .filter(|l| l.starts_with("location ~* "))
        .map(|line| {
            let pattern = line
                .trim_start_matches("location ~* ")
                .trim_end_matches(" {");
            Regex::new(&format!("(?i){pattern}")).unwrap()
        })
        .collect();
    out.push(("nginx".to_owned(), nginx_regexes));
    let caddy = read(&deploy_dir().join("caddy/registration-only.Caddyfile"));
    let caddy_regexes = caddy
        .lines()
        .filter(|l| l.trim_start().starts_with('@') && l.contains(" path_regexp "))
        .map(|line| Regex::new(line.split_whitespace().last().unwrap()).unwrap())
        .collect();
    out.push(("caddy".to_owned(), caddy_regexes));
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
    out.push(("traefik".to_owned(), vec![Regex::new(pattern).unwrap()]));
    out
}

#[test]
fn routing_snippets_send_every_registration_spelling_to_the_gate() {
    for (name, regexes) in routing_regexes() {
        let to_gate = |path: &str| regexes.iter().any(|r| r.is_match(path));
        for path in REGISTRATION_SPELLINGS {
            assert!(to_gate(path), "{name} misses {path}");
        }
        for path in OTHER_PATHS {
            assert!(!to_gate(path), "{name} routes {path} to the gate");
        }
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mgk-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    dir
}

fn run(command: &mut std::process::Command) -> (bool, String) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e} (scripts/test installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn nginx_binary() -> &'static str {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("nginx is not installed (scripts/test installs it)")
}

fn files_in(dir: &str, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_str().unwrap().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// `nginx -t` on every shipped nginx file, as shipped: complete server
/// configurations inside `http` (their certificate paths pointed at a
/// throw-away certificate), the snippet inside a `server` block.
#[test]
fn nginx_accepts_every_shipped_configuration() {
    let dir = scratch("nginx");
    let (ok, out) = run(std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=matrix.example.org", "-keyout"])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem")));
    assert!(ok, "openssl: {out}");
    let files = files_in("nginx", ".conf");
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let text = read(&file)
            .replace(
                "/etc/letsencrypt/live/matrix.example.org/fullchain.pem",
                &dir.join("cert.pem").display().to_string(),
            )
            .replace(
                "/etc/letsencrypt/live/matrix.example.org/privkey.pem",
                &dir.join("key.pem").display().to_string(),
            );
        let complete = text.lines().any(|l| l.starts_with("server {"));
        let body = if complete {
            text
        } else {
            format!("server {{\n    listen 127.0.0.1:1;\n{text}\n}}\n")
        };
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "pid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\nevents {{}}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n\
                 fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n{body}\n}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let (ok, out) = run(std::process::Command::new(nginx_binary())
            .arg("-t")
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf));
        assert!(ok, "nginx -t {}: {out}", file.display());
        if complete {
            // The federation server exists and answers 404 for the rest.
            assert!(body.contains("listen 8448 ssl"), "{}", file.display());
            assert!(body.contains("location ^~ /_matrix/federation/"));
            assert!(body.contains("location ^~ /_matrix/key/"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn caddy_validates_every_shipped_caddyfile() {
    let mut files = files_in("caddy", ".Caddyfile");
    files.push(deploy_dir().join("compose/Caddyfile"));
    assert!(files.len() >= 3, "{files:?}");
    let dir = scratch("caddy");
    for file in files {
        let (ok, out) = run(std::process::Command::new("caddy")
            .args(["validate", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config")));
        assert!(ok, "caddy validate {}: {out}", file.display());
        let text = read(&file);
        assert!(
            text.contains(":8448 {"),
            "{}: no federation site",
            file.display()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn traefik_routers_name_their_entry_points_and_outrank_any_default() {
    let stat = &yaml_documents(&deploy_dir().join("traefik/traefik.yml"))[0];
    assert_eq!(stat["entryPoints"]["websecure"]["asDefault"], true);
    assert!(stat["entryPoints"]["federation"]["asDefault"].is_null());
    for file in ["traefik/gate-in-front.yml", "traefik/registration-only.yml"] {
        let doc = &yaml_documents(&deploy_dir().join(file))[0];
        let routers = doc["http"]["routers"].as_mapping().unwrap();
        for (name, router) in routers {
            assert!(
                router["entryPoints"].is_sequence(),
                "{file}: router {name:?} names no entry point"
            );
            let service = router["service"].as_str().unwrap();
            assert!(
                !doc["http"]["services"][service].is_null(),
                "{file}: {service}"
            );
        }
        let gate = routers
            .values()
            .find(|r| r["service"] == "matrix-gatekeeper")
            .unwrap();
        // The largest priority every Traefik build accepts (MaxInt32 - 1000).
        assert_eq!(gate["priority"].as_i64(), Some(2_147_482_647), "{file}");
        let federation = routers
            .values()
            .find(|r| r["entryPoints"][0] == "federation")
            .unwrap();
        assert_eq!(
            federation["rule"],
            "PathPrefix(`/_matrix/federation/`) || PathPrefix(`/_matrix/key/`)"
        );
    }
}

const AUDIT_SAMPLE: &str = r#"2026-12-01T00:43:19.707584Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="203.0.113.9" key=203.0.113.9 user_agent="curl/8.5.0" kind="user" username="admin" username_sent="Admin" decision="refused" rule="reserved" upstream_status=0
2026-12-01T00:43:19.739630Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="2001:db8::7" key=2001:db8::/64 user_agent="curl/8.5.0" kind="user" username="-" decision="rate_limited" rule="attempts_per_ip" upstream_status=0
2026-12-01T00:43:20.000001Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="198.51.100.4" key=198.51.100.4 user_agent="Element" kind="user" username="alice" decision="allowed" rule="-" upstream_status=200
2026-12-01T00:43:20.100001Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="198.51.100.5" key=198.51.100.5 user_agent="x\" client=\"192.0.2.66\" decision=\"refused\" rule=\"reserved\" upstream_status=0" kind="user" username="bob" decision="allowed" rule="-" upstream_status=200
2026-12-01T00:43:20.200001Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="198.51.100.6" key=198.51.100.6 user_agent="curl/8.5.0" kind="user" username="admin" decision="would_refuse" rule="reserved" upstream_status=200
2026-12-01T00:43:20.300001Z  INFO matrix_gatekeeper::audit: registration decision route="available" client="192.0.2.8" key=192.0.2.8 user_agent="curl/8.5.0" username="root" decision="refused" rule="reserved" upstream_status=0
2026-12-01T00:43:20.400001Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="198.51.100.77" key=198.51.100.77 user_agent="curl/8.5.0" kind="user" username="-" decision="refused" rule="deny_list" upstream_status=0 list="/etc/matrix-gatekeeper/tor-exits.txt"
2026-12-01T00:43:20.400001Z  INFO matrix_gatekeeper::audit: registration decision route="register" client="192.0.2.77" key=192.0.2.77 user_agent="curl/8.5.0" kind="user" username="-" decision="refused" rule="dnsbl" upstream_status=0 dnsbl_zone="dnsbl.example.net"
"#;

/// The filter bans exactly the clients of refused and rate-limited
/// decisions; allowed and shadow-mode lines, and a forged field inside a
/// client's user agent, match nothing.
#[test]
fn fail2ban_filter_matches_refusals_and_limits_by_client_address() {
    let dir = scratch("fail2ban");
    let log = dir.join("gatekeeper.log");
    std::fs::write(&log, AUDIT_SAMPLE).unwrap();
    let filter = deploy_dir().join("fail2ban/matrix-gatekeeper.filter.conf");
    let (ok, out) = run(std::process::Command::new("fail2ban-regex")
        .args(["-o", "ip"])
        .arg(&log)
        .arg(&filter));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "fail2ban-regex: {out}");
    let banned: Vec<&str> = out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        banned,
        [
            "203.0.113.9",
            "2001:db8::7",
            "192.0.2.8",
            "198.51.100.77",
            "192.0.2.77"
        ],
        "{out}"
    );
    let jail = read(&deploy_dir().join("fail2ban/matrix-gatekeeper.jail.local"));
    assert!(jail.contains("[matrix-gatekeeper]") && jail.contains("filter    = matrix-gatekeeper"));
}

#[tokio::test]
async fn prometheus_alert_rules_check_pass_their_tests_and_use_exported_metrics() {
    let dir = deploy_dir().join("prometheus");
    let (ok, out) = run(std::process::Command::new("promtool")
        .args(["check", "rules", "matrix-gatekeeper-alerts.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = run(std::process::Command::new("promtool")
        .args(["test", "rules", "matrix-gatekeeper-alerts.test.yml"])
        .current_dir(&dir));
    assert!(ok, "promtool test rules: {out}");
    let exported = exported_metrics();
    let rules = yaml_documents(&dir.join("matrix-gatekeeper-alerts.yml"));
    let names = Regex::new(r"gatekeeper_[a-z_]+").unwrap();
    let mut alerts = Vec::new();
    for rule in rules[0]["groups"][0]["rules"].as_sequence().unwrap() {
        alerts.push(rule["alert"].as_str().unwrap().to_owned());
        for name in names.find_iter(rule["expr"].as_str().unwrap()) {
            assert!(
                exported.contains(&format!("# TYPE {} ", name.as_str())),
                "{} uses {}, which the gate does not export",
                alerts.last().unwrap(),
                name.as_str()
            );
        }
    }
    for wanted in [
        "Down",
        "RefusalSurge",
        "LimiterStoreErrors",
        "HomeserverErrors",
        "HomeserverFailing",
        "RegistrationLockdown",
        "DnsblZoneUnhealthy",
    ] {
        assert!(
            alerts.iter().any(|a| a.ends_with(wanted)),
            "no {wanted} alert in {alerts:?}"
        );
    }
}

/// Every metric the admin listener renders, the lockdown's and the DNSBL
/// zones' included.
fn exported_metrics() -> String {
    let limiter = RateLimiter::new(&Default::default());
    let mut out = Metrics::default().render(&limiter);
    let lockdown = matrix_gatekeeper::defences::lockdown::Lockdown::new(
        None,
        &limiter,
        matrix_gatekeeper::notify::Notifier::disabled(),
    );
    matrix_gatekeeper::telemetry::render_lockdown(&mut out, &lockdown);
    matrix_gatekeeper::telemetry::render_dnsbl_health(&mut out, &Default::default());
    out
}

#[tokio::test]
async fn the_dashboard_uses_only_metrics_the_gate_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&deploy_dir().join("grafana/matrix-gatekeeper.json"))).unwrap();
    let exported = exported_metrics();
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
