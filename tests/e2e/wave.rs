//! A small registration wave (`bench/wave --check`): a few hundred bot
//! attempts from a handful of simulated hosting networks and forty real
//! people from residential ones, at the same time, against a real Synapse
//! behind this build of the gate (Redis as its store, the simulated
//! networks in a MaxMind database, a DNSBL and a Tor list), with the wave
//! settings the README recommends, with and without the list of hosting
//! networks.
//!
//! The script checks what must hold whatever the machine's speed: no
//! network gets more bot accounts (counted in Synapse's database) than the
//! configuration's per-network budget allows over the run (none for a
//! denied network), every real user the gate refused was refused by a
//! named rule (the audit log), and with the README's settings nobody is
//! refused but the people sharing an address with the wave. The full wave
//! and its numbers are `bench/wave`'s (docs/benchmarks.md).

use std::path::Path;
use std::process::Command;

#[test]
fn a_small_wave_gets_no_network_past_its_budget_and_every_refused_person_a_rule() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = crate::synapse::venv();
    let output = Command::new(venv.join("bin/python"))
        .arg(root.join("bench/wave"))
        .args([
            "--check",
            "--only",
            "gate-limits",
            "--only",
            "gate-recommended",
        ])
        .arg("--gate")
        .arg(env!("CARGO_BIN_EXE_matrix-gatekeeper"))
        .arg("--venv")
        .arg(venv)
        .current_dir(root)
        .output()
        .expect("bench/wave runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bench/wave --check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // Both configurations ran and reported.
    for name in ["gate-limits", "gate-recommended"] {
        assert!(
            stdout.contains(&format!("\"config\": \"{name}\"")),
            "{name} did not run:\n{stdout}"
        );
    }
}
