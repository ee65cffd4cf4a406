//! What tests/container.rs and tests/compose.rs share: podman with its own
//! configuration and storage under `target/container`, the tools installed
//! when missing, and the images made locally (`debian:bookworm-slim` from
//! debootstrap, `rust:1-bookworm` from it and this machine's toolchain),
//! each labelled with a hash of its inputs and made again only when they
//! change.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The label holding the hash of a locally made image's inputs.
pub const INPUT_LABEL: &str = "org.matrix-gatekeeper.test.inputs";
pub const BASE_IMAGE: &str = "debian:bookworm-slim";
pub const BUILDER_IMAGE: &str = "rust:1-bookworm";
/// Podman's configuration for these tests.
pub const CONTAINERS_CONF: &str = r#"# podman's configuration for tests/container.rs and tests/compose.rs (through CONTAINERS_CONF).
[containers]
# The engine's default limits are above what root may set here.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun refuses hybrid cgroup hierarchies.
runtime = "runc"
"#;
/// What debuerreotype's slimming tells dpkg in the official slim images.
pub const DPKG_SLIM: &str =
    "path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\n\
path-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n\
path-include /usr/share/locale/locale.alias\n";
/// `rust:1-bookworm` as made here: the base, what the official image (on
/// buildpack-deps) has that a build needs, and the toolchain mounted at
/// /toolchain (rustup's binary at /rustup when there is one). The
/// certificate authorities this machine adds to Debian's
/// (`/usr/local/share/ca-certificates`, mounted at /local-ca) are added
/// too: behind a TLS-inspecting proxy cargo reaches crates.io only so.
pub const BUILDER_CONTAINERFILE: &str = r#"FROM debian:bookworm-slim
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ARG TOOLCHAIN
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl git gcc g++ libc6-dev make pkg-config libssl-dev xz-utils file \
 && rm -rf /var/lib/apt/lists/*
RUN if [ -d /local-ca ]; then \
      find /local-ca -maxdepth 1 -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; \
      && update-ca-certificates; \
    fi \
 && mkdir -p "$RUSTUP_HOME/toolchains/$TOOLCHAIN" "$CARGO_HOME/bin" \
 && tar -C /toolchain --exclude=./share/doc -cf - . | tar -C "$RUSTUP_HOME/toolchains/$TOOLCHAIN" -xf - \
 && if [ -f /rustup ]; then \
      cp /rustup "$CARGO_HOME/bin/rustup" \
      && for tool in cargo rustc rustdoc rust-gdb rust-lldb; do ln "$CARGO_HOME/bin/rustup" "$CARGO_HOME/bin/$tool"; done \
      && printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\n' "$TOOLCHAIN" > "$RUSTUP_HOME/settings.toml"; \
    else \
      for tool in cargo rustc rustdoc; do ln -s "$RUSTUP_HOME/toolchains/$TOOLCHAIN/bin/$tool" "$CARGO_HOME/bin/$tool"; done; \
    fi \
 && chmod -R a+w "$RUSTUP_HOME" "$CARGO_HOME" \
 && cargo --version && rustc --version
"#;

/// What this run measured, for the report.
pub struct Report {
    prefix: &'static str,
    title: &'static str,
    file: &'static str,
    lines: Vec<String>,
}

impl Report {
    /// A report printed with `prefix`, written to `target/container/<file>`.
    pub fn new(prefix: &'static str, title: &'static str, file: &'static str) -> Self {
        Report {
            prefix,
            title,
            file,
            lines: Vec::new(),
        }
    }

    pub fn note(&mut self, line: String) {
        eprintln!("{}: {line}", self.prefix);
        self.lines.push(line);
    }

    pub fn write(&self) {
        let mut text = format!("# {}\n\n", self.title);
        for line in &self.lines {
            let _ = writeln!(text, "- {line}");
        }
        let path = work_dir().join(self.file);
        std::fs::write(&path, text).unwrap();
        eprintln!("{}: report in {}", self.prefix, path.display());
    }
}

/// `target/container`: the kept debootstrap tarball, podman's configuration,
/// the builder image's Containerfile and the report.
pub fn work_dir() -> PathBuf {
    let dir = crate::common::target_dir().join("container");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `podman` command with this test's configuration and storage.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command
        .env("CONTAINERS_CONF", work_dir().join("containers.conf"))
        .env("CONTAINERS_STORAGE_CONF", work_dir().join("storage.conf"));
    command
}

/// Podman's storage for these tests: images and layers under
/// `target/container/storage` (kept between runs, like every other build
/// cache of the suite), its run-time state in the system's temporary
/// directory; nothing in the machine's own container storage.
pub fn storage_conf() -> String {
    let graphroot = work_dir().join("storage");
    // Its own run-time state for each storage (two checkouts side by side).
    let runroot = std::env::temp_dir().join(format!(
        "mgk-container-runroot-{}",
        &sha256(graphroot.display().to_string().as_bytes())[..12]
    ));
    format!(
        "# podman's storage for the container tests (through CONTAINERS_STORAGE_CONF).\n\
         [storage]\ndriver = \"overlay\"\ngraphroot = {:?}\nrunroot = {:?}\n",
        graphroot.display().to_string(),
        runroot.display().to_string()
    )
}

/// Runs `command`, panicking with its output when it fails.
pub fn run(command: &mut Command) -> Output {
    let output = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs `command` with its output on the test's stderr (long builds).
pub fn run_visible(command: &mut Command) {
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(status.success(), "{command:?} failed ({status})");
}

pub fn stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout)
        .unwrap()
        .trim()
        .to_owned()
}

pub fn have(tool: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|dir| Path::new(dir).join(tool).exists())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// Installs what is missing; `Err` says why the test cannot run.
pub fn tools() -> Result<(), String> {
    let wanted = [
        ("podman", "podman"),
        ("buildah", "buildah"),
        ("runc", "runc"),
        ("debootstrap", "debootstrap"),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        return Err(format!(
            "{} missing and cannot be installed here (needs root and apt-get)",
            missing.join(", ")
        ));
    }
    eprintln!("container: installing {}", missing.join(" "));
    let ok = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!("apt-get install {} failed", missing.join(" ")))
    }
}

/// Whether `url` answers at all (for skipping when offline).
pub fn reachable(url: &str) -> bool {
    Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-m", "15", url])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &data));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    String::from_utf8(output.stdout).unwrap()[..64].to_owned()
}

pub fn sha256_file(path: &Path) -> String {
    stdout(Command::new("sha256sum").arg(path))[..64].to_owned()
}

/// The image's input label: `None` when there is no such image, `Some("")`
/// for an image not made by this test (a pulled one, used as it is).
pub fn image_inputs(image: &str) -> Option<String> {
    let output = podman()
        .args(["image", "inspect", "--format"])
        .arg(format!("{{{{index .Labels \"{INPUT_LABEL}\"}}}}"))
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    output.status.success().then(|| {
        let label = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if label == "<no value>" {
            String::new()
        } else {
            label
        }
    })
}

pub fn image_id(image: &str) -> String {
    stdout(podman().args(["image", "inspect", "--format", "{{.Id}}", image]))
}

/// `debian:bookworm-slim`: the engine's own when it has one not made here,
/// else a minbase debootstrap of bookworm (tarball kept under the target
/// dir). Returns what it did.
pub fn base_image() -> String {
    let tarball = work_dir().join("debian-bookworm-minbase.tar");
    match image_inputs(BASE_IMAGE) {
        Some(label) if label.is_empty() => return "present in the engine, used as it is".into(),
        Some(label) if tarball.exists() && label == sha256_file(&tarball) => {
            return "made earlier, unchanged".into()
        }
        _ => {}
    }
    let started = Instant::now();
    let mut fresh = false;
    if !tarball.exists() {
        let root = std::env::temp_dir().join(format!("mgk-debootstrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg("http://deb.debian.org/debian"));
        // Slim as the official image: no downloaded packages or lists, no
        // documentation, and dpkg told to leave it out of later installs.
        std::fs::write(root.join("etc/dpkg/dpkg.cfg.d/slim"), DPKG_SLIM).unwrap();
        let partial = tarball.with_extension("tar.partial");
        run(Command::new("tar")
            .arg("-C")
            .arg(&root)
            .args([
                "--numeric-owner",
                "--exclude=./var/cache/apt/archives/*.deb",
                "--exclude=./var/lib/apt/lists/*_*",
                "--exclude=./usr/share/doc/*",
                "--exclude=./usr/share/man/*",
                "--exclude=./usr/share/info/*",
                "--exclude=./usr/share/locale/*",
                "-cf",
            ])
            .arg(&partial)
            .arg("."));
        std::fs::rename(&partial, &tarball).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        fresh = true;
    }
    let bootstrapped = started.elapsed();
    run(podman()
        .arg("import")
        .args(["--change", "CMD [\"bash\"]"])
        .args([
            "--change",
            &format!("LABEL {INPUT_LABEL}={}", sha256_file(&tarball)),
        ])
        .arg(&tarball)
        .arg(BASE_IMAGE));
    if fresh {
        format!(
            "debootstrap {:.0} s, import {:.0} s",
            bootstrapped.as_secs_f64(),
            (started.elapsed() - bootstrapped).as_secs_f64()
        )
    } else {
        format!(
            "imported from the kept tarball in {:.0} s",
            started.elapsed().as_secs_f64()
        )
    }
}

/// The installed Rust toolchain: its sysroot and its rustup name
/// (`1.95.0-x86_64-unknown-linux-gnu`).
pub fn toolchain() -> (PathBuf, String) {
    let rustc = || {
        let mut command = Command::new("rustc");
        command.env_remove("RUSTC_WRAPPER");
        command
    };
    let sysroot = PathBuf::from(stdout(rustc().args(["--print", "sysroot"])));
    let verbose = stdout(rustc().arg("-vV"));
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    (
        sysroot.canonicalize().unwrap(),
        format!("{}-{}", field("release:"), field("host:")),
    )
}

pub fn rustup_binary() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))?;
    let rustup = home.join("bin/rustup");
    rustup.is_file().then(|| rustup.canonicalize().unwrap())
}

/// `rust:1-bookworm`: the engine's own when it has one not made here, else
/// made from the base and this machine's toolchain.
pub fn builder_image() -> String {
    let (sysroot, name) = toolchain();
    let rustup = rustup_binary();
    let local_ca = Path::new("/usr/local/share/ca-certificates");
    let mut certificates = String::new();
    if let Ok(entries) = std::fs::read_dir(local_ca) {
        let mut paths: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "crt"))
        {
            certificates.push_str(&sha256_file(path));
        }
    }
    let inputs = sha256(
        format!(
            "{BUILDER_CONTAINERFILE}\n{}\n{name}\n{}\n{}\n{certificates}",
            image_id(BASE_IMAGE),
            sysroot.display(),
            rustup.as_ref().map(|r| sha256_file(r)).unwrap_or_default()
        )
        .as_bytes(),
    );
    match image_inputs(BUILDER_IMAGE) {
        Some(label) if label.is_empty() => return "present in the engine, used as it is".into(),
        Some(label) if label == inputs => return format!("made earlier with {name}, unchanged"),
        _ => {}
    }
    let context = work_dir().join("rust-image");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("Containerfile"), BUILDER_CONTAINERFILE).unwrap();
    let started = Instant::now();
    let mut build = podman();
    build
        .args(["build", "--format", "docker", "--layers=false"])
        .args(["--build-arg", &format!("TOOLCHAIN={name}")])
        .args(["--label", &format!("{INPUT_LABEL}={inputs}")])
        .arg("--volume")
        .arg(format!("{}:/toolchain:ro", sysroot.display()));
    if !certificates.is_empty() {
        build
            .arg("--volume")
            .arg(format!("{}:/local-ca:ro", local_ca.display()));
    }
    if let Some(rustup) = &rustup {
        build
            .arg("--volume")
            .arg(format!("{}:/rustup:ro", rustup.display()));
    }
    run_visible(build.args(["-t", BUILDER_IMAGE]).arg(&context));
    format!(
        "made with {name} in {:.0} s",
        started.elapsed().as_secs_f64()
    )
}

/// Builds the image from the shipped Dockerfile as `tag`; returns the time it took.
pub fn build_image(tag: &str, no_cache: bool) -> Duration {
    let started = Instant::now();
    let mut build = podman();
    build
        .current_dir(repo())
        .args(["build", "--format", "docker"]);
    if no_cache {
        build.arg("--no-cache");
    }
    run_visible(build.args(["-f", "deploy/docker/Dockerfile", "-t", tag, "."]));
    started.elapsed()
}
