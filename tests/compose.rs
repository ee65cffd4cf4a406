//! The shipped compose stack (deploy/compose/docker-compose.yml, unchanged)
//! brought up with podman-compose: Caddy with TLS on 443 and 8448, two gate
//! replicas sharing their limits through Redis, Synapse; then, from the
//! host, through Caddy's published ports: a registration goes through, a
//! reserved name is refused and never reaches Synapse, the two replicas
//! stop at one shared limit, and `matrix-gatekeeper probe` finds every
//! registration route answered by the gates.
//!
//! Nothing is pulled. The gate's image is built by `podman-compose build`
//! from the file's own `build:` section (in Docker's image format, as
//! docker compose builds; podman's OCI default drops the HEALTHCHECK), on
//! the base images tests/container.rs makes (tests/podman/mod.rs); Synapse,
//! Redis and Caddy are stand-ins made here under the names the file gives
//! (tests/compose/images.rs). podman-compose 1.6.0 comes from PyPI into a
//! venv under the target dir (Debian's 1.0.3 does not read the file).
//!
//! The override file (written per run) changes only test-only values: the
//! Caddyfile mounted is the shipped one with `local_certs` in front, so
//! Caddy's internal CA signs `matrix.example.org`; the client (curl and the
//! probe) trusts that CA, read from Caddy's data volume, and reaches the
//! published ports on 127.0.0.1 with the name resolved there. Synapse's
//! generated homeserver.yaml gets the settings the compose file's comments
//! ask for, with registration open without verification (knowingly, for
//! the test) and Synapse's own registration limit out of the way.
//!
//! Podman 4.3 ignores `depends_on: condition: service_healthy` (and runs no
//! health checks on its own without systemd): the test runs each service's
//! health check itself until it passes. The stack is torn down (`down -v`)
//! at the end, however the test ends. It needs ports 80, 443 and 8448 on
//! the host free, as the compose file publishes them.
//!
//! Skips (passing, with the reason printed) only when the tools cannot be
//! installed or Debian's mirror, crates.io or PyPI cannot be reached;
//! `MGK_CONTAINER_TEST=0` skips it too. Times go to
//! `target/container/compose-report.md`.

#[path = "common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "podman/mod.rs"]
mod engine;
#[path = "compose/images.rs"]
mod images;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use engine::{
    base_image, builder_image, podman, reachable, repo, run, run_visible, stdout, storage_conf,
    tools, work_dir, Report, BASE_IMAGE, BUILDER_IMAGE, CONTAINERS_CONF,
};
use serde_json::{json, Value};

const COMPOSE_FILE: &str = "deploy/compose/docker-compose.yml";
const PODMAN_COMPOSE: &str = "podman-compose==1.6.0";
/// The name Caddy serves (deploy/compose/Caddyfile).
const HOST: &str = "matrix.example.org";
const REGISTER: &str = "/_matrix/client/v3/register";
const PASSWORD: &str = "compose-password-1";

/// Each service's `image:` in the compose file.
fn service_images(text: &str) -> BTreeMap<String, String> {
    let mut images = BTreeMap::new();
    let mut in_services = false;
    let mut service = None;
    for line in text.lines() {
        if !line.starts_with([' ', '#']) && !line.is_empty() {
            in_services = line == "services:";
            continue;
        }
        if !in_services {
            continue;
        }
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                service = Some(name.to_owned());
            }
        } else if let Some(image) = line.strip_prefix("    image: ") {
            images.insert(service.clone().unwrap(), image.trim().to_owned());
        }
    }
    images
}

/// The stack: podman-compose with the shipped file, the override and a
/// project name of its own; `down -v` when dropped.
struct Stack {
    podman_compose: PathBuf,
    project: String,
    override_file: PathBuf,
    scratch: PathBuf,
}

impl Stack {
    fn compose(&self) -> Command {
        let mut command = Command::new(&self.podman_compose);
        command
            .current_dir(repo())
            .env("CONTAINERS_CONF", work_dir().join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", work_dir().join("storage.conf"))
            // Docker's image format, as docker compose builds: podman's
            // default (OCI) drops the Dockerfile's HEALTHCHECK.
            .env("BUILDAH_FORMAT", "docker")
            .args(["-p", &self.project, "-f", COMPOSE_FILE, "-f"])
            .arg(&self.override_file);
        command
    }

    /// The container of `service`'s replica `n` (podman-compose's naming).
    fn container(&self, service: &str, n: u32) -> String {
        format!("{}_{service}_{n}", self.project)
    }

    fn exec(&self, container: &str, args: &[&str]) -> Output {
        podman()
            .args(["exec", container])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn logs(&self, container: &str) -> String {
        let output = podman().args(["logs", container]).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// Runs the container's own health check until it passes.
    fn wait_healthy(&self, container: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let check = podman()
                .args(["healthcheck", "run", container])
                .stdin(Stdio::null())
                .output()
                .unwrap();
            if check.status.success() {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within
                    && !String::from_utf8_lossy(&check.stderr).contains("no defined healthcheck"),
                "{container} not healthy within {within:?}: {}{}\n{}",
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr),
                self.logs(container)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for container in [
                self.container("synapse", 1),
                self.container("gatekeeper", 1),
                self.container("gatekeeper", 2),
                self.container("caddy", 1),
            ] {
                eprintln!("compose: logs of {container}:\n{}", self.logs(&container));
            }
        }
        // The anonymous volumes (Caddy's /config) that `down -v` leaves.
        let anonymous = podman()
            .args(["inspect", "--format"])
            .arg("{{range .Mounts}}{{if eq .Type \"volume\"}}{{.Name}} {{end}}{{end}}")
            .arg(self.container("caddy", 1))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let down = self
            .compose()
            .args(["down", "-v", "-t", "5"])
            .stdin(Stdio::null())
            .output();
        match down {
            Ok(o) if o.status.success() => eprintln!("compose: stack {} down", self.project),
            Ok(o) => eprintln!(
                "compose: down -v failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => eprintln!("compose: down -v: {e}"),
        }
        for volume in anonymous
            .split_whitespace()
            .filter(|v| !v.starts_with(&self.project))
        {
            let _ = podman()
                .args(["volume", "rm", "-f", volume])
                .stdout(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// An answer through Caddy: status, headers (lower-case names), JSON body.
struct Answer {
    status: u16,
    headers: String,
    body: Value,
}

impl Answer {
    fn answered_by_gate(&self) -> bool {
        self.headers.contains("\nx-matrix-gatekeeper:")
    }

    fn errcode(&self) -> &str {
        self.body["errcode"].as_str().unwrap_or("")
    }
}

/// curl to `https://matrix.example.org{path}` on 127.0.0.1:443, trusting
/// Caddy's internal CA (`ca`) only.
fn https(ca: &Path, method: &str, path: &str, body: Option<&Value>) -> Answer {
    let mut curl = Command::new("curl");
    curl.args(["-sS", "-m", "30", "-D", "-", "-X", method])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("{HOST}:443:127.0.0.1")]);
    if let Some(body) = body {
        curl.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(body.to_string());
    }
    let output = run(curl.arg(format!("https://{HOST}{path}")));
    let text = String::from_utf8(output.stdout).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer {
        status,
        headers: head.to_ascii_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

/// The two steps of a dummy-auth registration; the first answer that is
/// not the expected 401 of step one, or step two's.
fn register(ca: &Path, username: &str) -> Answer {
    let step1 = https(
        ca,
        "POST",
        REGISTER,
        Some(&json!({"username": username, "password": PASSWORD})),
    );
    if step1.status != 401 {
        return step1;
    }
    let session = step1.body["session"].as_str().unwrap().to_owned();
    https(
        ca,
        "POST",
        REGISTER,
        Some(&json!({"username": username, "password": PASSWORD,
                     "auth": {"type": "m.login.dummy", "session": session}})),
    )
}

/// A replica's decision counters by outcome, from its admin port (reached
/// on its address on the compose network).
fn decisions(container: &str) -> BTreeMap<String, u64> {
    let address = stdout(podman().args([
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        container,
    ]));
    let metrics = stdout(
        Command::new("curl")
            .args(["-sS", "-m", "10"])
            .arg(format!("http://{address}:9009/metrics")),
    );
    let mut counts = BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("gatekeeper_decisions_total{"))
    {
        let outcome = line
            .split("outcome=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap()
            .to_owned();
        let n: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        *counts.entry(outcome).or_default() += n;
    }
    counts
}

/// Synapse's own answer on whether `localpart` is taken, asked inside its
/// container (past the gates).
fn taken_in_synapse(stack: &Stack, localpart: &str) -> bool {
    let output = stack.exec(
        &stack.container("synapse", 1),
        &[
            "curl",
            "-sS",
            &format!(
                "http://localhost:8008/_matrix/client/v3/register/available?username={localpart}"
            ),
        ],
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    match (answer["available"].as_bool(), answer["errcode"].as_str()) {
        (Some(true), _) => false,
        (_, Some("M_USER_IN_USE")) => true,
        _ => panic!("availability of {localpart}: {answer}"),
    }
}

/// What the test does to the generated homeserver.yaml (inside the Synapse
/// image, which has PyYAML): the settings the compose file's comments list,
/// registration open without verification for the test, and Synapse's
/// registration limit out of the way of the gates'.
const HOMESERVER_EDIT: &str = r#"import yaml
path = "/data/homeserver.yaml"
config = yaml.safe_load(open(path))
config.update(
    enable_registration=True,
    enable_registration_without_verification=True,
    allow_guest_access=False,
    rc_registration={"per_second": 100, "burst_count": 100},
    listeners=[{"port": 8008, "type": "http", "tls": False,
                "bind_addresses": ["0.0.0.0"], "x_forwarded": True,
                "resources": [{"names": ["client", "federation"], "compress": False}]}],
)
yaml.safe_dump(config, open(path, "w"))
"#;

#[test]
fn the_shipped_compose_stack_comes_up_with_podman_compose() {
    if std::env::var("MGK_CONTAINER_TEST").as_deref() == Ok("0") {
        eprintln!("compose: skipped (MGK_CONTAINER_TEST=0)");
        return;
    }
    let whole = Instant::now();
    if let Err(why) = tools() {
        eprintln!("compose: SKIPPED, {why}");
        return;
    }
    for (url, what) in [
        (
            "http://deb.debian.org/debian/dists/bookworm/Release",
            "Debian's mirror",
        ),
        ("https://index.crates.io/config.json", "crates.io"),
        ("https://pypi.org/simple/podman-compose/", "PyPI"),
    ] {
        if !reachable(url) {
            eprintln!("compose: SKIPPED, {what} is not reachable ({url})");
            return;
        }
    }
    if !images::pypi_reachable() {
        eprintln!("compose: SKIPPED, PyPI does not answer for matrix-synapse");
        return;
    }
    std::fs::write(work_dir().join("containers.conf"), CONTAINERS_CONF).unwrap();
    std::fs::write(work_dir().join("storage.conf"), storage_conf()).unwrap();
    let mut report = Report::new("compose", "Compose stack check", "compose-report.md");
    report.note(format!("podman: {}", stdout(podman().arg("--version"))));
    let venv = common::python_venv("compose-venv", &[PODMAN_COMPOSE]);
    let podman_compose = venv.join("bin/podman-compose");
    let version = stdout(Command::new(&podman_compose).arg("--version"));
    report.note(version.replace('\n', "; "));

    // The images, under the compose file's names.
    let shipped = std::fs::read_to_string(repo().join(COMPOSE_FILE)).unwrap();
    let images = service_images(&shipped);
    report.note(format!("{BASE_IMAGE}: {}", base_image()));
    report.note(format!("{BUILDER_IMAGE}: {}", builder_image()));
    for service in ["redis", "caddy", "synapse"] {
        let image = &images[service];
        let what = images::stand_in(service, image);
        report.note(format!("{service} ({image}, stand-in): {what}"));
    }

    let project = format!("mgk-compose-{}", std::process::id());
    let scratch = std::env::temp_dir().join(&project);
    std::fs::create_dir_all(&scratch).unwrap();
    // The shipped Caddyfile with Caddy's internal CA for every site.
    let caddyfile = scratch.join("Caddyfile");
    let shipped_caddyfile =
        std::fs::read_to_string(repo().join("deploy/compose/Caddyfile")).unwrap();
    std::fs::write(
        &caddyfile,
        format!("# Test only: certificates from Caddy's internal CA.\n{{\n\tlocal_certs\n}}\n\n{shipped_caddyfile}"),
    )
    .unwrap();
    let override_file = scratch.join("override.yml");
    std::fs::write(
        &override_file,
        format!(
            "# tests/compose.rs: test-only values.\nservices:\n  caddy:\n    volumes:\n      - {}:/etc/caddy/Caddyfile:ro\n",
            caddyfile.display()
        ),
    )
    .unwrap();
    let stack = Stack {
        podman_compose,
        project,
        override_file,
        scratch,
    };

    // The gate's image from the file's own build section.
    let started = Instant::now();
    run_visible(stack.compose().args(["build", "gatekeeper"]));
    report.note(format!(
        "gatekeeper ({}): podman-compose build {:.1} s",
        images["gatekeeper"],
        started.elapsed().as_secs_f64()
    ));
    let healthcheck = stdout(podman().args([
        "image",
        "inspect",
        "--format",
        "{{json .HealthCheck}}",
        &images["gatekeeper"],
    ]));
    assert!(
        healthcheck.contains("healthcheck"),
        "the image's HEALTHCHECK is kept: {healthcheck}"
    );

    // As the compose file says: generate, edit, up.
    let started = Instant::now();
    run(stack.compose().args(["run", "--rm", "synapse", "generate"]));
    run(stack
        .compose()
        .args([
            "run",
            "--rm",
            "--entrypoint",
            "/venv/bin/python3",
            "synapse",
            "-c",
        ])
        .arg(HOMESERVER_EDIT));
    report.note(format!(
        "synapse generate and homeserver.yaml edited: {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let started = Instant::now();
    run(stack.compose().args(["up", "-d", "--no-build"]));
    let up = started.elapsed();
    let mut waited = Vec::new();
    for (service, n) in [
        ("redis", 1),
        ("synapse", 1),
        ("gatekeeper", 1),
        ("gatekeeper", 2),
    ] {
        let container = stack.container(service, n);
        let took = stack.wait_healthy(&container, Duration::from_secs(180));
        waited.push(format!("{container} {:.1} s", took.as_secs_f64()));
    }
    // Caddy has no health check: its internal CA's root, then an answer.
    let ca = stack.scratch.join("caddy-root.crt");
    let caddy = stack.container("caddy", 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let root = stack.exec(
            &caddy,
            &["cat", "/data/caddy/pki/authorities/local/root.crt"],
        );
        if root.status.success() && !root.stdout.is_empty() {
            std::fs::write(&ca, &root.stdout).unwrap();
            let versions = Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "-m", "5", "--cacert"])
                .arg(&ca)
                .args(["--resolve", &format!("{HOST}:443:127.0.0.1")])
                .arg(format!("https://{HOST}/_matrix/client/versions"))
                .status()
                .unwrap();
            if versions.success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "caddy: {}", stack.logs(&caddy));
        std::thread::sleep(Duration::from_secs(1));
    }
    report.note(format!(
        "up -d {:.1} s; healthy (own checks: {}); all answering through Caddy {:.1} s after up",
        up.as_secs_f64(),
        waited.join(", "),
        started.elapsed().as_secs_f64()
    ));
    report.note(
        "TLS: Caddy's internal CA (local_certs); curl and the probe trust its root only".into(),
    );

    // A registration goes through Caddy and a gate to Synapse.
    let first = register(&ca, "composed1");
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["user_id"], "@composed1:example.org");
    assert!(taken_in_synapse(&stack, "composed1"));

    // A reserved name: refused by the gate, unknown to Synapse.
    let refused = https(
        &ca,
        "POST",
        REGISTER,
        Some(&json!({"username": "admin", "password": PASSWORD})),
    );
    assert_eq!(
        (refused.status, refused.errcode()),
        (400, "M_USER_IN_USE"),
        "{:?}",
        refused.body
    );
    assert!(refused.answered_by_gate(), "{}", refused.headers);
    assert!(!taken_in_synapse(&stack, "admin"));
    report.note("registration through Caddy 200; `admin` refused by the gate (400 M_USER_IN_USE), not in Synapse".into());

    // One limit for both replicas: the shipped 3 registrations per address
    // per hour, reached with requests spread over both (Caddy's round
    // robin), and both refusing afterwards.
    for name in ["composed2", "composed3"] {
        let answer = register(&ca, name);
        assert_eq!(answer.status, 200, "{name}: {:?}", answer.body);
    }
    let mut limited = 0;
    for n in 4..8 {
        let answer = register(&ca, &format!("composed{n}"));
        assert_eq!(
            (answer.status, answer.errcode()),
            (429, "M_LIMIT_EXCEEDED"),
            "registration {n}: {:?}",
            answer.body
        );
        assert!(answer.answered_by_gate(), "{}", answer.headers);
        assert!(!taken_in_synapse(&stack, &format!("composed{n}")));
        limited += 1;
    }
    let per_replica: Vec<BTreeMap<String, u64>> = (1..=2)
        .map(|n| decisions(&stack.container("gatekeeper", n)))
        .collect();
    for (n, counts) in per_replica.iter().enumerate() {
        assert!(
            counts.get("allowed").copied().unwrap_or(0) > 0,
            "replica {} allowed some: {counts:?}",
            n + 1
        );
        assert!(
            counts.get("rate_limited").copied().unwrap_or(0) > 0,
            "replica {} refused some at the shared limit: {counts:?}",
            n + 1
        );
    }
    report.note(format!(
        "shared limit: 3 registrations, then {limited} refused 429 by the gates; decisions per replica (from their /metrics): {per_replica:?}"
    ));

    // The probe, from outside, through both of Caddy's ports.
    let probe = Command::new(env!("CARGO_BIN_EXE_matrix-gatekeeper"))
        .args([
            "probe",
            "https://127.0.0.1:443",
            "https://127.0.0.1:8448",
            "--host",
            HOST,
            "--ca-file",
        ])
        .arg(&ca)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&probe.stdout);
    assert!(
        probe.status.success(),
        "probe ({}):\n{table}\n{}",
        probe.status,
        String::from_utf8_lossy(&probe.stderr)
    );
    report.note(format!(
        "matrix-gatekeeper probe https://127.0.0.1:443 https://127.0.0.1:8448 --host {HOST}: exit 0, {} lines",
        table.lines().count()
    ));
    drop(stack);
    report.note(format!(
        "whole check: {:.0} s",
        whole.elapsed().as_secs_f64()
    ));
    report.write();
}
