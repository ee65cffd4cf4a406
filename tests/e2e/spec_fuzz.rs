//! Spec fuzzing of the guarded routes: Schemathesis, driven by the Matrix
//! spec's own registration OpenAPI, against the gate in front of a real
//! Synapse.
//!
//! The spec files (vendored in `spec/matrix-spec`, with their licence and
//! origin) are bundled at test time by `py/bundle_spec.py` into one document whose paths carry
//! their own base paths (`/_matrix/client/v3/…`, and `/_matrix/client/v1/…`
//! for the token validity route). `st run` (pinned in `synapse.rs`) then runs
//! twice, bounded by example count, a per-request timeout and a whole-run
//! timeout:
//!
//! - through a gate with guests allowed and no rate limits, so requests
//!   reach Synapse;
//! - through a gate with tight limits, so the gate's own 429s are checked
//!   too.
//!
//! The checks and their configured exceptions are in `spec/schemathesis.toml`
//! and `py/st_hooks.py`: no 5xx, documented statuses (or a Matrix standard
//! error), responses matching the documented schemas and media types,
//! schema-valid requests accepted and schema-invalid ones refused,
//! undeclared methods answered properly, and every answer the gate makes
//! itself a Matrix error (`errcode` and `error` strings; 429s with
//! `retry_after_ms`). Counts, excused quirks and failures go to
//! `target/e2e-report/spec-fuzz.md`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::synapse::{self, Synapse};

/// The vendored excerpt of the Matrix spec (see its `README.md`).
const SPEC_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/spec/matrix-spec");
/// Schemathesis examples per operation (and phase); `MGK_FUZZ_EXAMPLES`
/// overrides.
const MAX_EXAMPLES: u32 = 300;
/// Examples per operation for the rate-limited run.
const LIMITED_EXAMPLES: u32 = 10;
/// The default seed, so a run can be replayed; `MGK_FUZZ_SEED` overrides.
const SEED: u64 = 1;
/// Per-request timeout: a request the gate does not answer in time fails.
const REQUEST_TIMEOUT_SECS: u32 = 10;
/// A whole `st run` that takes longer is killed and fails the test.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

const PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/py");
const ST_CONFIG: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/e2e/spec/schemathesis.toml"
);

/// The gate of the `open` run: guests allowed, no rate limits.
const OPEN_GATE: &str = "[guest]\naccess = \"allow\"\n";
/// The gate of the `rate-limited` run: limits tight enough that most
/// requests get the gate's own 429.
const LIMITED_GATE: &str = "[guest]\naccess = \"allow\"\n[rate_limit]\n\
    attempts_per_ip = { count = 3, period = \"1h\" }\n\
    guests_per_ip = { count = 1, period = \"1h\" }\n\
    registrations_per_ip = { count = 1, period = \"1h\" }\n\
    availability_checks_per_ip = { count = 3, period = \"1h\" }\n\
    token_requests_per_ip = { count = 3, period = \"1h\" }\n";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs a Python script from `py/` in the venv; panics with its output on
/// failure and returns its stdout.
fn run_py(script: &str, args: &[&Path]) -> String {
    let output = std::process::Command::new(synapse::python())
        .arg(Path::new(PY).join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// One `st run` and its summary.
struct Run {
    name: &'static str,
    gate_config: &'static str,
    examples: u32,
    elapsed: Duration,
    exit: Option<i32>,
    /// The "Test cases: …" lines of Schemathesis' own summary.
    st_counts: String,
    summary: Value,
}

async fn st_run(
    name: &'static str,
    gate_config: &'static str,
    base_url: &str,
    spec: &Path,
    dir: &Path,
    examples: u32,
    seed: u64,
) -> Run {
    let ndjson = dir.join(format!("{name}.ndjson"));
    let quirks = dir.join(format!("{name}-quirks.jsonl"));
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&quirks);
    let st = synapse::venv().join("bin/st");
    let started = Instant::now();
    let child = tokio::process::Command::new(&st)
        .current_dir(dir)
        .env("SCHEMATHESIS_HOOKS", Path::new(PY).join("st_hooks.py"))
        .env("MGK_ST_QUIRKS", &quirks)
        .env("NO_COLOR", "1")
        .arg("--config-file")
        .arg(ST_CONFIG)
        .arg("run")
        .arg(spec)
        .args(["--url", base_url])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", &seed.to_string()])
        .args(["--request-timeout", &REQUEST_TIMEOUT_SECS.to_string()])
        .args(["--workers", "1"])
        .args(["--generation-database", "none"])
        .args(["--output-sanitize", "false"])
        .args(["--no-color", "--report", "ndjson", "--report-ndjson-path"])
        .arg(&ndjson)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", st.display()));
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("st run ({name}) did not finish within {RUN_TIMEOUT:?}"))
        .expect("st run");
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    std::fs::write(
        &log,
        format!("{stdout}\n{}", String::from_utf8_lossy(&output.stderr)),
    )
    .unwrap();
    assert!(
        ndjson.exists(),
        "st run ({name}) wrote no report; output in {}:\n{}",
        log.display(),
        stdout.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    let summary_path = dir.join(format!("{name}-summary.json"));
    run_py(
        "spec_fuzz_summary.py",
        &[ndjson.as_path(), quirks.as_path(), summary_path.as_path()],
    );
    let summary: Value = serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    let st_counts = stdout
        .lines()
        .skip_while(|l| !l.starts_with("Test cases:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ");
    Run {
        name,
        gate_config,
        examples,
        elapsed,
        exit: output.status.code(),
        st_counts,
        summary,
    }
}

fn counts(value: &Value) -> String {
    value
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guarded_routes_conform_to_the_spec_under_schemathesis() {
    let started = Instant::now();
    let spec_root = PathBuf::from(SPEC_DIR);
    let api_dir = spec_root.join("data/api/client-server");
    assert!(
        api_dir.join("registration.yaml").is_file()
            && api_dir.join("registration_tokens.yaml").is_file(),
        "the vendored Matrix spec is missing: expected {}",
        api_dir.display()
    );
    let seed = env_or("MGK_FUZZ_SEED", SEED);
    let examples = env_or("MGK_FUZZ_EXAMPLES", MAX_EXAMPLES);
    let dir = synapse::target_dir().join("e2e-report/spec-fuzz");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();

    // Synapse's own limits on requestToken (0.003/s, burst 5) and on token
    // validity checks (0.1/s, burst 5) would answer most of those cases
    // with 429 before looking at them.
    let synapse = Synapse::start(
        "rc_3pid_validation: {per_second: 1000, burst_count: 1000}\n\
         rc_registration_token_validity: {per_second: 1000, burst_count: 1000}\n",
    )
    .await;
    let open = crate::gate_for(&synapse, OPEN_GATE).await;
    let limited = crate::gate_for(&synapse, LIMITED_GATE).await;

    let spec = dir.join("openapi.json");
    let base = open.url("");
    let bundled = run_py(
        "bundle_spec.py",
        &[api_dir.as_path(), Path::new(&base), spec.as_path()],
    );
    eprintln!("spec fuzz: bundled {}", bundled.trim());

    let runs = vec![
        st_run("open", OPEN_GATE, &base, &spec, &dir, examples, seed).await,
        st_run(
            "rate-limited",
            LIMITED_GATE,
            &limited.url(""),
            &spec,
            &dir,
            LIMITED_EXAMPLES,
            seed,
        )
        .await,
    ];
    drop(synapse);

    // The report.
    let source = std::fs::read_to_string(spec_root.join("SOURCE")).unwrap_or_default();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# Spec fuzzing: the guarded routes under Schemathesis\n"
    );
    let _ = writeln!(
        report,
        "- spec: {} (bundled at test time by `tests/e2e/py/bundle_spec.py`: {})\n\
         - tools: {}, Synapse behind the gate\n\
         - seed {seed} (`MGK_FUZZ_SEED`), request timeout {REQUEST_TIMEOUT_SECS} s, run timeout {:?}\n\
         - checks and configured exceptions: `tests/e2e/spec/schemathesis.toml`, `tests/e2e/py/st_hooks.py`\n\
         - total time {:.1?}\n",
        source.lines().next().unwrap_or("?"),
        bundled.trim(),
        synapse::PACKAGES.join(", "),
        RUN_TIMEOUT,
        started.elapsed()
    );
    let mut failures = Vec::new();
    let mut summary_line = Vec::new();
    for run in &runs {
        let s = &run.summary;
        let _ = writeln!(report, "## Run `{}`\n", run.name);
        let _ = writeln!(
            report,
            "Gate configuration:\n\n```toml\n{}```\n",
            run.gate_config
        );
        let _ = writeln!(
            report,
            "- `--max-examples {}`; `st` exit status {:?}; {:.1?} (engine {:.1} s, stop reason {})\n\
             - Schemathesis: {}\n\
             - test cases {}, requests {} (no response: {})\n\
             - by phase: {}\n\
             - responses made by the gate itself: {}\n\
             - responses from Synapse (through the gate): {}\n\
             - the gate's errcodes: {}",
            run.examples,
            run.exit,
            run.elapsed,
            s["engine"]["running_time"].as_f64().unwrap_or(0.0),
            s["engine"]["stop_reason"].as_str().unwrap_or("?"),
            run.st_counts,
            s["test_cases"],
            s["requests"],
            s["no_response"],
            counts(&s["by_phase"]),
            counts(&s["statuses"]["gate"]),
            counts(&s["statuses"]["synapse"]),
            counts(&s["gate_errcodes"]),
        );
        let _ = writeln!(
            report,
            "\n| operation | test cases | requests |\n|---|---|---|"
        );
        if let Some(ops) = s["by_operation"].as_object() {
            for (op, c) in ops {
                let _ = writeln!(report, "| {op} | {} | {} |", c["cases"], c["requests"]);
            }
        }
        let _ = writeln!(
            report,
            "\nExcused (known Synapse or spec behaviour, `KNOWN_QUIRKS`):\n"
        );
        match s["quirks"].as_object() {
            Some(quirks) if !quirks.is_empty() => {
                for (name, q) in quirks {
                    let _ = writeln!(
                        report,
                        "- **{name}** — {} responses, checks {}: {} Example: `{}`",
                        q["count"],
                        q["checks"],
                        q["why"].as_str().unwrap_or(""),
                        q["example"].as_str().unwrap_or("")
                    );
                }
            }
            _ => {
                let _ = writeln!(report, "- none");
            }
        }
        let _ = writeln!(report, "\nFailures:\n");
        let groups = s["failure_groups"].as_array().cloned().unwrap_or_default();
        if groups.is_empty() {
            let _ = writeln!(report, "- none");
        }
        for g in &groups {
            let example = &g["example"];
            let line = format!(
                "[{}] {} ({}): {} {} response(s) from the {} on {}; e.g. `{}` -> {} `{}` — {}",
                run.name,
                g["check"].as_str().unwrap_or("?"),
                g["code"].as_str().unwrap_or("?"),
                g["count"],
                g["status"],
                g["origin"].as_str().unwrap_or("?"),
                g["operations"]
                    .as_array()
                    .map(|a| a
                        .iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default(),
                example["request"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect::<String>(),
                example["status"],
                example["response_body"].as_str().unwrap_or(""),
                example["message"].as_str().unwrap_or("").replace('\n', " ")
            );
            let _ = writeln!(report, "- {line}");
            failures.push(line);
        }
        for e in s["errors"].as_array().cloned().unwrap_or_default() {
            let line = format!("[{}] engine error {}: {}", run.name, e["kind"], e["detail"]);
            let _ = writeln!(report, "- {line}");
            failures.push(line);
        }
        if s["engine"]["stop_reason"].as_str() != Some("completed") {
            failures.push(format!(
                "[{}] the run did not complete: {}",
                run.name, s["engine"]
            ));
        }
        if s["requests"].as_u64().unwrap_or(0) == 0 || s["no_response"].as_u64().unwrap_or(0) > 0 {
            failures.push(format!(
                "[{}] {} requests answered, {} unanswered",
                run.name, s["requests"], s["no_response"]
            ));
        }
        if groups.is_empty()
            && s["errors"].as_array().is_none_or(Vec::is_empty)
            && run.exit != Some(0)
        {
            failures.push(format!(
                "[{}] st exited with {:?} without a recorded failure; see {}",
                run.name,
                run.exit,
                dir.join(format!("{}.log", run.name)).display()
            ));
        }
        let _ = writeln!(
            report,
            "\nNot enforced: {} of the gate's own refusals carry no CORS header \
             (`Access-Control-Allow-Origin`), while every Synapse answer does (e.g. `{}`). \
             The spec recommends these headers on all requests; without them a browser client \
             on another origin cannot read the gate's refusal.\n",
            s["gate_refusals_without_cors"],
            s["gate_refusal_without_cors_example"]
                .as_str()
                .unwrap_or("-")
        );
        summary_line.push(format!(
            "{}: {} test cases / {} requests in {:.1?} ({}; gate answered {}, Synapse {}; {} failure groups, {} excused quirk kinds)",
            run.name,
            s["test_cases"],
            s["requests"],
            run.elapsed,
            run.st_counts,
            s["statuses"]["gate"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_u64).sum::<u64>())
                .unwrap_or(0),
            s["statuses"]["synapse"]
                .as_object()
                .map(|o| o.values().filter_map(Value::as_u64).sum::<u64>())
                .unwrap_or(0),
            groups.len(),
            s["quirks"].as_object().map(|o| o.len()).unwrap_or(0),
        ));
    }
    let path = synapse::target_dir().join("e2e-report/spec-fuzz.md");
    std::fs::write(&path, &report).unwrap();
    eprintln!(
        "spec fuzz: {}; total {:.1?}; report {}",
        summary_line.join(" | "),
        started.elapsed(),
        path.display()
    );
    assert!(
        failures.is_empty(),
        "spec fuzzing found {} problem(s) (see {}):\n{}",
        failures.len(),
        path.display(),
        failures.join("\n")
    );
}
