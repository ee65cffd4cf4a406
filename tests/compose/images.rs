//! Stand-ins for the three images deploy/compose/docker-compose.yml pulls
//! (Synapse, Redis, Caddy), made on this machine under the exact names the
//! file gives, on the debootstrapped `debian:bookworm-slim`, from Debian's
//! packages and PyPI. They reproduce what the compose file relies on and
//! nothing more; each is labelled with a hash of its inputs and made again
//! only when they change.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::engine::{image_id, image_inputs, podman, run_visible, sha256, work_dir};
use crate::engine::{BASE_IMAGE, INPUT_LABEL};

/// The Synapse release the compose file names (`matrixdotorg/synapse:v…`).
pub const SYNAPSE_VERSION: &str = "1.163.2";

/// What the packages' maintainer scripts must not do during a build: start
/// their service.
const NO_SERVICES: &str = "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d \
 && chmod 755 /usr/sbin/policy-rc.d";

/// `redis:7.4.2-alpine` stood in for by Debian's `redis-server` (7.0):
/// `redis-server` and `redis-cli` on `PATH`, run as the redis user in
/// /data. The official image builds Redis with protected mode off, so that
/// other containers reach it without a password; Debian's build needs that
/// said on the command line, which the entrypoint does for `redis-server`.
fn redis_containerfile() -> String {
    format!(
        r#"# Stands in for the official redis image in tests/compose.rs.
FROM {BASE_IMAGE}
RUN {NO_SERVICES} \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = redis-server ]; then shift; exec redis-server --protected-mode no \"$@\"; fi; exec \"$@\"", "docker-entrypoint"]
CMD ["redis-server"]
EXPOSE 6379
"#
    )
}

/// `caddy:2.6.4-alpine` stood in for by Debian's `caddy` (2.6.2): the
/// official image's command, its XDG directories (/config, /data: the
/// internal CA lands in /data/caddy/pki) and ports, as root.
fn caddy_containerfile() -> String {
    format!(
        r#"# Stands in for the official caddy image in tests/compose.rs.
FROM {BASE_IMAGE}
RUN {NO_SERVICES} \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends caddy ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /config/caddy /data/caddy /etc/caddy /srv
ENV XDG_CONFIG_HOME=/config XDG_DATA_HOME=/data
VOLUME /config /data
WORKDIR /srv
EXPOSE 80 443 443/udp 2019
CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
"#
    )
}

/// `matrixdotorg/synapse:v1.163.2` stood in for by Synapse from PyPI in a
/// venv, with `curl` for the compose file's health check and a `/start.py`
/// doing the two things the compose file uses. pip reaches PyPI with this
/// machine's CA bundle (mounted for the build only: behind a
/// TLS-inspecting proxy it is the only one that works).
fn synapse_containerfile() -> String {
    format!(
        r#"# Stands in for the official matrixdotorg/synapse image in tests/compose.rs.
FROM {BASE_IMAGE}
RUN {NO_SERVICES} \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv \
 && /venv/bin/pip install --no-cache-dir --disable-pip-version-check --cert /host-ca.crt \
      "matrix-synapse=={SYNAPSE_VERSION}" \
 && mkdir -p /data /conf && chown 991:991 /data
COPY start.py /start.py
COPY log.config /conf/log.config
ENV PATH=/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
VOLUME /data
EXPOSE 8008/tcp 8009/tcp 8448/tcp
ENTRYPOINT ["/start.py"]
"#
    )
}

/// The official image's `/start.py`, as far as the compose file uses it.
const START_PY: &str = r#"#!/venv/bin/python3
"""Stands in for the official matrixdotorg/synapse image's /start.py (tests/compose.rs).

`generate`: writes the configuration for SYNAPSE_SERVER_NAME (homeserver.yaml,
the log configuration and the signing key in /data) as Synapse's
--generate-config --open-private-ports makes it, like the official image.
No argument (or `run`): runs Synapse from /data/homeserver.yaml. Synapse runs
as UID/GID 991 (UID and GID in the environment), like the official image.
"""
import os
import shutil
import sys

env = os.environ
config_dir = env.get("SYNAPSE_CONFIG_DIR", "/data")
config_path = env.get("SYNAPSE_CONFIG_PATH", config_dir + "/homeserver.yaml")
data_dir = env.get("SYNAPSE_DATA_DIR", "/data")
uid, gid = int(env.get("UID", "991")), int(env.get("GID", "991"))


def fail(message):
    sys.exit("start.py: " + message)


def become_synapse():
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)


mode = sys.argv[1] if len(sys.argv) > 1 else "run"
if mode == "generate":
    for name in ("SYNAPSE_SERVER_NAME", "SYNAPSE_REPORT_STATS"):
        if name not in env:
            fail(f"environment variable {name} is mandatory in generate mode")
    server = env["SYNAPSE_SERVER_NAME"]
    if os.getuid() == 0:
        os.chown(data_dir, uid, gid)
    log_config = f"{config_dir}/{server}.log.config"
    if not os.path.exists(log_config):
        shutil.copy("/conf/log.config", log_config)
        if os.getuid() == 0:
            os.chown(log_config, uid, gid)
    become_synapse()
    os.execv(sys.executable, [sys.executable, "-m", "synapse.app.homeserver",
        "--server-name", server, "--report-stats", env["SYNAPSE_REPORT_STATS"],
        "--config-path", config_path, "--config-directory", config_dir,
        "--data-directory", data_dir, "--generate-config", "--open-private-ports"])
elif mode == "run":
    if not os.path.exists(config_path):
        fail(f"config file {config_path} does not exist: run `generate` first")
    become_synapse()
    os.execv(sys.executable, [sys.executable, "-m", "synapse.app.homeserver",
        "--config-path", config_path])
else:
    fail(f"{mode}: only `generate` and `run` are stood in for")
"#;

/// Synapse's logs on the console, as the official image's template has it.
const LOG_CONFIG: &str = "version: 1\n\
formatters:\n  precise:\n    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'\n\
handlers:\n  console:\n    class: logging.StreamHandler\n    formatter: precise\n\
root:\n  level: INFO\n  handlers: [console]\n\
disable_existing_loggers: false\n";

/// Makes `image` for `service` unless it is there with the same inputs;
/// returns what it did.
pub fn stand_in(service: &str, image: &str) -> String {
    let (containerfile, files): (String, Vec<(&str, &str)>) = match service {
        "redis" => (redis_containerfile(), vec![]),
        "caddy" => (caddy_containerfile(), vec![]),
        "synapse" => (
            synapse_containerfile(),
            vec![("start.py", START_PY), ("log.config", LOG_CONFIG)],
        ),
        other => panic!("no stand-in for {other}"),
    };
    let mut inputs = format!("{containerfile}\n{}\n", image_id(BASE_IMAGE));
    for (name, text) in &files {
        inputs.push_str(&format!("{name}\n{text}\n"));
    }
    let inputs = sha256(inputs.as_bytes());
    match image_inputs(image) {
        Some(label) if label.is_empty() => return "present in the engine, used as it is".into(),
        Some(label) if label == inputs => return "made earlier, unchanged".into(),
        _ => {}
    }
    let context = work_dir().join(format!("{service}-image"));
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("Containerfile"), &containerfile).unwrap();
    for (name, text) in &files {
        let path = context.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let started = Instant::now();
    let mut build = podman();
    build
        .args(["build", "--format", "docker", "--layers=false"])
        .args(["--label", &format!("{INPUT_LABEL}={inputs}")]);
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if service == "synapse" {
        assert!(bundle.exists(), "{} for pip", bundle.display());
        build
            .arg("--volume")
            .arg(format!("{}:/host-ca.crt:ro", bundle.display()));
    }
    run_visible(build.args(["-t", image]).arg(&context));
    format!("made in {:.0} s", started.elapsed().as_secs_f64())
}

/// Whether PyPI answers (for skipping when offline).
pub fn pypi_reachable() -> bool {
    Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-m", "15"])
        .arg(format!(
            "https://pypi.org/simple/matrix-synapse/?v={SYNAPSE_VERSION}"
        ))
        .status()
        .is_ok_and(|s| s.success())
}
