//! The container image: built with podman from `deploy/docker/Dockerfile`,
//! unchanged, with the repository as context, and run hardened the way the
//! image and the README describe (read-only root filesystem, UID/GID 10001,
//! every capability dropped, `no-new-privileges`, the configuration and the
//! admin token mounted read-only) in front of a real Synapse.
//!
//! Nothing is pulled. The two images the Dockerfile names are made on this
//! machine when the engine does not have them: `debian:bookworm-slim` is a
//! `debootstrap --variant=minbase bookworm` tree imported into podman (the
//! tarball is kept in `target/container/`), and `rust:1-bookworm` is that
//! base with the C toolchain and headers the official image carries from
//! Debian and this machine's installed Rust toolchain laid out as in the
//! official image (`RUSTUP_HOME=/usr/local/rustup`, `cargo` in
//! `/usr/local/cargo/bin` on `PATH`). Each is labelled with a hash of its
//! inputs and made again only when they change. Cargo inside the image build
//! fetches crates from crates.io.
//!
//! Podman runs with its own `containers.conf` (in `target/container/`,
//! through `CONTAINERS_CONF`): runc as the runtime and file/process limits
//! root may set; and its own storage (`CONTAINERS_STORAGE_CONF`): images and
//! layers in `target/container/storage`, kept between runs. The first run installs podman, buildah, runc and
//! debootstrap with apt when they are missing (as root); when that is not
//! possible, or Debian's mirror or crates.io cannot be reached, the test
//! says what it skipped and why and passes. `MGK_CONTAINER_TEST=0` skips it;
//! `MGK_CONTAINER_NO_CACHE=1` builds the image without the layer cache (a
//! cold build). Times and sizes go to `target/container/report.md`.

#[path = "common/mod.rs"]
mod common;
#[allow(dead_code)]
#[path = "podman/mod.rs"]
mod engine;
#[allow(dead_code)]
#[path = "e2e/homeserver_process.rs"]
mod homeserver_process;
#[allow(dead_code)]
#[path = "e2e/synapse.rs"]
mod synapse;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{get, post_json, send};
use engine::{
    base_image, build_image, builder_image, podman, reachable, run, stdout, storage_conf, tools,
    work_dir, Report, BASE_IMAGE, BUILDER_IMAGE, CONTAINERS_CONF,
};
use http::Method;
use serde_json::json;
use synapse::{Synapse, SERVER_NAME};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const REGISTER: &str = "/_matrix/client/v3/register";
const PASSWORD: &str = "container-password-1";
/// The tag the image under test gets.
const IMAGE: &str = "matrix-gatekeeper:test";

/// A container removed when the test ends, however it ends.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "-f", "-t", "0", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Container {
    fn exec(&self, args: &[&str]) -> Output {
        podman()
            .args(["exec", &self.0])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn inspect(&self, format: &str) -> String {
        stdout(podman().args(["inspect", "--format", format, &self.0]))
    }

    /// `podman logs`: (stdout, stderr).
    fn logs(&self) -> (String, String) {
        let output = run(podman().args(["logs", &self.0]));
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }
}

/// Synapse's own answer on whether `localpart` is taken.
async fn account_exists(synapse: &Synapse, localpart: &str) -> bool {
    let answer = get(&format!(
        "{}/_matrix/client/v3/register/available?username={localpart}",
        synapse.url()
    ))
    .await;
    match (answer.status.as_u16(), answer.errcode().as_str()) {
        (200, _) => false,
        (400, "M_USER_IN_USE") => true,
        other => panic!("availability of {localpart}: {other:?} {:?}", answer.body),
    }
}

/// A private directory for the mounted files, removed at the end.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_image_builds_and_runs_hardened_in_front_of_synapse() {
    if std::env::var("MGK_CONTAINER_TEST").as_deref() == Ok("0") {
        eprintln!("container: skipped (MGK_CONTAINER_TEST=0)");
        return;
    }
    let whole = Instant::now();
    if let Err(why) = tools() {
        eprintln!("container: SKIPPED, {why}");
        return;
    }
    for (url, what) in [
        (
            "http://deb.debian.org/debian/dists/bookworm/Release",
            "Debian's mirror",
        ),
        ("https://index.crates.io/config.json", "crates.io"),
    ] {
        if !reachable(url) {
            eprintln!("container: SKIPPED, {what} is not reachable ({url})");
            return;
        }
    }
    std::fs::write(work_dir().join("containers.conf"), CONTAINERS_CONF).unwrap();
    std::fs::write(work_dir().join("storage.conf"), storage_conf()).unwrap();
    let mut report = Report::new("container", "Container image check", "report.md");
    report.note(format!("podman: {}", stdout(podman().arg("--version"))));

    // The builds' RUN steps reach Debian and crates.io through podman's
    // default (bridge) network.
    report.note(format!("{BASE_IMAGE}: {}", base_image()));
    report.note(format!("{BUILDER_IMAGE}: {}", builder_image()));

    let no_cache = std::env::var("MGK_CONTAINER_NO_CACHE").as_deref() == Ok("1");
    let first = build_image(IMAGE, no_cache);
    report.note(format!(
        "image build{}: {:.1} s",
        if no_cache { " (no cache)" } else { "" },
        first.as_secs_f64()
    ));
    let cached = build_image(IMAGE, false);
    report.note(format!(
        "image build again (layer cache): {:.1} s",
        cached.as_secs_f64()
    ));
    let size: u64 = stdout(podman().args(["image", "inspect", "--format", "{{.Size}}", IMAGE]))
        .parse()
        .unwrap();
    report.note(format!(
        "image size: {:.1} MB ({size} bytes)",
        size as f64 / 1e6
    ));
    let user = stdout(podman().args(["image", "inspect", "--format", "{{.User}}", IMAGE]));
    assert_eq!(user, "10001:10001");
    let healthcheck: serde_json::Value = serde_json::from_str(&stdout(podman().args([
        "image",
        "inspect",
        "--format",
        "{{json .HealthCheck}}",
        IMAGE,
    ])))
    .unwrap();
    assert!(
        healthcheck["Test"].to_string().contains("healthcheck"),
        "the HEALTHCHECK is kept (docker format): {healthcheck}"
    );
    report.note(format!(
        "image config: User {user}, Healthcheck {}",
        healthcheck["Test"]
    ));

    // The container on podman's default bridge network, its two ports
    // published on the host's loopback; Synapse on the host, listening on
    // loopback and on the bridge's gateway (host.containers.internal in the
    // container), which exists once a container is on the bridge.
    let synapse_port = synapse::free_port();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("mgk-container-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).unwrap();
    let token = "container-admin-token-0123456789";
    let token_path = scratch.0.join("admin.token");
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
    let config_path = scratch.0.join("gatekeeper.toml");
    std::fs::write(
        &config_path,
        format!(
            "[server]\nlisten = \"0.0.0.0:8009\"\nadmin_listen = \"0.0.0.0:9009\"\n\n\
             [upstream]\nurl = \"http://host.containers.internal:{synapse_port}\"\n\n\
             [homeserver]\nserver_name = \"{SERVER_NAME}\"\n\n\
             [admin]\ntoken_file = \"/run/secrets/admin.token\"\n\n[log]\nformat = \"json\"\n"
        ),
    )
    .unwrap();
    // The process's own user reads both; the token no one else.
    for (path, mode) in [(&token_path, 0o400), (&config_path, 0o444)] {
        std::os::unix::fs::chown(path, Some(10001), Some(10001)).unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }

    let name = format!("mgk-container-test-{}", std::process::id());
    let started = Instant::now();
    run(podman()
        .args(["run", "-d", "--name", &name])
        .args([
            "--publish",
            "127.0.0.1::8009",
            "--publish",
            "127.0.0.1::9009",
        ])
        .args(["--read-only", "--user", "10001:10001", "--cap-drop=all"])
        .args(["--security-opt", "no-new-privileges"])
        .arg("--volume")
        .arg(format!(
            "{}:/etc/matrix-gatekeeper/gatekeeper.toml:ro",
            config_path.display()
        ))
        .arg("--volume")
        .arg(format!(
            "{}:/run/secrets/admin.token:ro",
            token_path.display()
        ))
        .arg(IMAGE));
    let container = Container(name);
    let published = |port: &str| -> u16 {
        let mapping = stdout(podman().args(["port", &container.0, port]));
        mapping.rsplit(':').next().unwrap().parse().unwrap()
    };
    let (port, admin_port) = (published("8009/tcp"), published("9009/tcp"));
    let admin = |path: &str| format!("http://127.0.0.1:{admin_port}{path}");
    common::eventually(
        Duration::from_secs(30),
        "the gate in the container answers /healthz",
        || async { matches!(synapse::try_get(&admin("/healthz")).await, Ok(200)) },
    )
    .await;
    report.note(format!(
        "container on the bridge network, up (healthz 200 through the published port) {:.1} s after podman run",
        started.elapsed().as_secs_f64()
    ));
    let gateway = stdout(podman().args([
        "network",
        "inspect",
        "podman",
        "--format",
        "{{range .Subnets}}{{.Gateway}}{{end}}",
    ]));
    let synapse = Synapse::start_on(
        synapse_port,
        &format!(
            "listeners: [{{port: {synapse_port}, bind_addresses: ['127.0.0.1', '{gateway}'], type: http, tls: false, x_forwarded: true, resources: [{{names: [client], compress: false}}]}}]"
        ),
    )
    .await;

    // Health and readiness on the admin port, and the image's own check.
    assert_eq!(get(&admin("/healthz")).await.status, 200);
    let ready = get(&admin("/readyz")).await;
    assert_eq!(ready.status, 200, "{:?}", ready.body);
    let health = podman()
        .args(["healthcheck", "run", &container.0])
        .output()
        .unwrap();
    assert!(
        health.status.success(),
        "podman healthcheck run: {}{}",
        String::from_utf8_lossy(&health.stdout),
        String::from_utf8_lossy(&health.stderr)
    );
    // The admin token came from the mounted file.
    let bearer = format!("Bearer {token}");
    let lockdown = send(
        Method::GET,
        &admin("/v1/lockdown"),
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(lockdown.status, 200, "{:?}", lockdown.body);
    let anonymous = get(&admin("/v1/lockdown")).await;
    assert_eq!(anonymous.status, 401, "{:?}", anonymous.body);

    // The process: UID and GID 10001 (no other group), no
    // capabilities, no new privileges.
    let pid = container.inspect("{{.State.Pid}}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(field("Uid:"), "10001 10001 10001 10001", "{status}");
    assert_eq!(field("Gid:"), "10001 10001 10001 10001", "{status}");
    assert!(
        field("Groups:")
            .split(' ')
            .all(|g| g.is_empty() || g == "10001"),
        "{status}"
    );
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    let id = container.exec(&["id"]);
    report.note(format!(
        "process: Uid {}, Gid {}, CapEff {}, NoNewPrivs {}; `id` in the container: {}",
        field("Uid:"),
        field("Gid:"),
        field("CapEff:"),
        field("NoNewPrivs:"),
        String::from_utf8_lossy(&id.stdout).trim()
    ));

    // The root filesystem is read-only.
    for path in [
        "/probe",
        "/etc/matrix-gatekeeper/probe",
        "/usr/local/bin/probe",
    ] {
        let write = container.exec(&["sh", "-c", &format!("echo x > {path}")]);
        let message = String::from_utf8_lossy(&write.stderr);
        assert!(!write.status.success(), "writing {path} succeeded");
        assert!(
            message.contains("Read-only file system"),
            "{path}: {message}"
        );
    }
    assert!(
        container.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true",
        "read-only root filesystem"
    );

    // A good registration goes through to Synapse.
    let gate = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let step1 = post_json(
        &gate(REGISTER),
        &json!({"username": "boxed", "password": PASSWORD}).to_string(),
    )
    .await;
    assert_eq!(step1.status, 401, "{:?}", step1.body);
    let session = step1.json()["session"].as_str().unwrap().to_owned();
    let step2 = post_json(
        &gate(REGISTER),
        &json!({"username": "boxed", "password": PASSWORD,
                "auth": {"type": "m.login.dummy", "session": session}})
        .to_string(),
    )
    .await;
    assert_eq!(step2.status, 200, "{:?}", step2.body);
    assert_eq!(step2.json()["user_id"], format!("@boxed:{SERVER_NAME}"));
    assert!(account_exists(&synapse, "boxed").await);

    // A reserved name is refused by the gate and never reaches Synapse.
    let refused = post_json(
        &gate(REGISTER),
        &json!({"username": "admin", "password": PASSWORD}).to_string(),
    )
    .await;
    refused.assert_error(400, "M_USER_IN_USE");
    assert!(!account_exists(&synapse, "admin").await);

    // SIGTERM while a request is in flight: the request completes, the
    // process exits 0 well within the grace period.
    let mut pending = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let body = json!({"username": "drained", "password": PASSWORD}).to_string();
    let (head, tail) = body.split_at(10);
    pending
        .write_all(
            format!(
                "POST {REGISTER} HTTP/1.1\r\nhost: gate\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{head}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = Instant::now();
    let mut stop = podman()
        .args(["stop", "-t", "30", &container.0])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    common::eventually(
        Duration::from_secs(10),
        "the gate logs its drain",
        || async { container.logs().1.contains("draining in-flight requests") },
    )
    .await;
    pending.write_all(tail.as_bytes()).await.unwrap();
    let mut answer = String::new();
    pending.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "the in-flight request completes (Synapse's first step): {answer}"
    );
    assert!(stop.wait().unwrap().success());
    let stopped = stopping.elapsed();
    assert_eq!(container.inspect("{{.State.ExitCode}}"), "0");
    assert!(
        stopped < Duration::from_secs(10),
        "stopped in {stopped:?} (grace 30 s)"
    );
    assert!(!account_exists(&synapse, "drained").await);
    report.note(format!(
        "podman stop -t 30 with a request in flight: exit code 0 after {:.1} s",
        stopped.as_secs_f64()
    ));

    // The logs: JSON lines on the container's stderr, nothing on stdout.
    let (out, err) = container.logs();
    assert!(out.trim().is_empty(), "nothing on stdout: {out}");
    let lines: Vec<serde_json::Value> = err
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(
        err.contains("shutting down: draining in-flight requests"),
        "{err}"
    );
    assert!(err.contains("admin"), "the refusal is logged: {err}");
    report.note(format!(
        "logs: {} JSON lines on the container's stderr, none on stdout",
        lines.len()
    ));
    report.note(format!(
        "whole check: {:.0} s",
        whole.elapsed().as_secs_f64()
    ));
    report.write();
}
