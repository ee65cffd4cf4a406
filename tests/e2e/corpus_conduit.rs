//! The username corpus through the gate in front of a real Conduit 0.10,
//! and Conduit's verdicts beside Synapse's, when `MGK_E2E_CONDUIT` names a
//! `conduit` binary (see `conduit.rs`); without it the test says it was
//! skipped and passes.
//!
//! The run is [`corpus_homeserver::run`], as for Dendrite: every corpus
//! name registered through the gate (default policy) with dummy auth; for
//! every name the gate refused, Conduit asked directly whether an account
//! exists under the mapped and the raw form (`/register/available`, which
//! lower-cases the name and reads a full `@localpart:server` user ID, then a
//! password login; a name its login cannot read as a user ID either, one
//! with a `:` say, stays unjudged there, and the table decides);
//! Conduit's own user list, the keys of its `userid_password` table, read
//! from its sqlite file before and after. No account may exist for a
//! refused name, every new account must be one a forwarded registration
//! reported creating, and each created localpart must be the gate's mapped
//! name. Afterwards Conduit is asked about the raw form of every forwarded
//! name the gate changed (`Alice`, `K\u{212a}elvin`): its own lower-casing
//! must reach the account made under the gate's mapped name.
//!
//! Conduit checks on the first registration step whether the name is taken
//! (Dendrite does not), so its first steps go to a second Conduit, started
//! alike, that holds only its own `@conduit` account (as Synapse's go to a
//! Synapse nobody registers on): its answers are what Conduit alone
//! accepts, whatever the registrations have made meanwhile. The report,
//! `target/e2e-report/username-corpus-conduit.md`, counts by gate rule the
//! raw names Conduit alone would accept that the gate refuses, lists them,
//! and lists every name Conduit and Synapse answer differently. About 30 s
//! on two cores (registrations about 20 s, with argon2id; Synapse's first
//! steps about 25 s alongside them).

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use matrix_gatekeeper::config::UsernameConfig;
use matrix_gatekeeper::gate::username::{map_case, UsernamePolicy};

use crate::conduit::{Conduit, BINARY_VARIABLE};
use crate::corpus::corpus;
use crate::corpus_homeserver::{self, show, sqlite_strings, Step, Target};
use crate::scenarios::Homeserver;
use crate::synapse::{self, Synapse, SERVER_NAME};

/// The report's file name in `target/e2e-report`.
const REPORT: &str = "username-corpus-conduit.md";

/// Why Conduit and Synapse answer a first step for `name` differently.
fn category(name: &str, conduit: &Step, synapse: &Step) -> &'static str {
    let conduit_alone = conduit.accepted() && !synapse.accepted();
    if name.chars().count() > 512 && !conduit.accepted() {
        "over 512 characters"
    } else if conduit_alone && name.starts_with('@') {
        "full user ID"
    } else if conduit_alone && name.bytes().all(|b| b.is_ascii_digit()) {
        "all digits"
    } else if conduit_alone && name.starts_with('_') {
        "leading underscore"
    } else {
        "UNEXPLAINED"
    }
}

/// What a category means.
fn explain(category: &str) -> &'static str {
    match category {
        "over 512 characters" => {
            "Synapse refuses a `username` over 512 characters before lower-casing it \
             (`M_UNKNOWN`), Conduit as an invalid user ID (`M_INVALID_USERNAME`)"
        }
        "full user ID" => {
            "Conduit reads a `username` that starts with `@` as a full user ID, so \
             `@alice:e2e.test` registers `@alice`; Synapse and the gate refuse `@` and `:`"
        }
        "all digits" => {
            "Conduit has no numeric rule; Synapse refuses all-digit names (its guest \
             namespace), as the gate does"
        }
        "leading underscore" => {
            "Conduit allows a leading `_`; Synapse refuses it (the application-service \
             namespace), as the gate does"
        }
        _ => "not explained by the known differences",
    }
}

/// The localparts of the users in Conduit's database: the keys of its
/// `userid_password` table, full user IDs (a user ID of another server is
/// kept whole, and shows as an account no registration made).
fn conduit_accounts(database: &Path) -> Vec<String> {
    let suffix = format!(":{SERVER_NAME}");
    sqlite_strings(database, "SELECT key FROM userid_password")
        .into_iter()
        .map(|user_id| {
            match user_id
                .strip_prefix('@')
                .and_then(|id| id.strip_suffix(&suffix))
            {
                Some(localpart) => localpart.to_owned(),
                None => user_id,
            }
        })
        .collect()
}

/// Asks Conduit, after the run, about the raw form of every forwarded name
/// that differs from the name the gate forwarded (upper case, KELVIN SIGN):
/// Conduit lower-cases a name itself, so `/register/available` must answer
/// it taken, by the account made under the gate's mapped name. Appends the
/// count and any other answer to the report, and fails on one.
async fn raw_forms_reach_the_mapped_accounts(conduit: &Conduit, report: &Path) {
    let policy = UsernamePolicy::new(&UsernameConfig::default(), SERVER_NAME);
    let accounts = conduit_accounts(conduit.database());
    let hs = Homeserver::conduit(conduit.url(), conduit.database().to_path_buf());
    let (mut asked, mut elsewhere) = (0, Vec::new());
    for (name, _) in corpus() {
        let Ok(mapped) = policy.check(&name, false) else {
            continue;
        };
        if mapped == name || !accounts.contains(&mapped) {
            continue;
        }
        asked += 1;
        let answer = hs.availability(&name).await;
        if (answer.status.as_u16(), answer.errcode().as_str()) != (400, "M_USER_IN_USE") {
            elsewhere.push(format!(
                "{} (the gate forwards {}): {} {}",
                show(&name),
                show(&mapped),
                answer.status,
                String::from_utf8_lossy(&answer.body)
            ));
        }
    }
    let mut text = std::fs::read_to_string(report).unwrap();
    let _ = writeln!(
        text,
        "## Raw forms of the forwarded names, asked of Conduit\n\n\
         {asked} forwarded names differ from the name the gate forwards. Asked directly after \
         the registrations, Conduit's `/register/available` answers the raw form taken for {}: \
         its own lower-casing reaches the account made under the gate's mapped name. Any \
         other answer: {}\n",
        asked - elsewhere.len(),
        elsewhere.len()
    );
    for line in &elsewhere {
        let _ = writeln!(text, "- {line}");
    }
    std::fs::write(report, text).unwrap();
    eprintln!(
        "conduit username corpus: {asked} raw forms of forwarded names asked, {} not taken",
        elsewhere.len()
    );
    assert!(
        elsewhere.is_empty(),
        "Conduit lower-cases a forwarded name otherwise than the gate (see {}):\n{}",
        report.display(),
        elsewhere.join("\n")
    );
}

/// The version a `conduit` binary reports (`conduit 0.10.12`).
fn version(binary: &Path) -> String {
    let output = std::process::Command::new(binary)
        .arg("--version")
        .output()
        .expect("run conduit --version");
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.trim().trim_start_matches("conduit").trim();
    assert!(
        output.status.success() && !version.is_empty(),
        "{} --version: {output:?}",
        binary.display()
    );
    version.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_in_front_of_conduit_creates_only_accepted_names_as_mapped() {
    let Some(binary) = Conduit::binary() else {
        eprintln!(
            "the_gate_in_front_of_conduit_creates_only_accepted_names_as_mapped: skipped, no \
             Conduit: set {BINARY_VARIABLE} to a Conduit 0.10 binary to run it"
        );
        return;
    };
    let started = Instant::now();
    let (conduit, alone, synapse) = tokio::join!(
        Conduit::start(&binary),
        Conduit::start(&binary),
        Synapse::start("")
    );
    // Before the first registration each holds only its server user, so
    // the run counts nothing else as Conduit's own.
    for server in [&conduit, &alone] {
        assert_eq!(
            conduit_accounts(server.database()),
            ["conduit"],
            "Conduit at {}: accounts before the first registration",
            server.url()
        );
    }
    let database = conduit.database().to_path_buf();
    let target = Target {
        name: "Conduit",
        version: version(&binary),
        setup: "Conduit (sqlite, argon2id, open registration; first steps sent to a second \
                Conduit started alike, holding only its own account)"
            .to_owned(),
        url: conduit.url(),
        steps_url: alone.url(),
        // Rust's `str::to_lowercase`, as the gate maps case.
        lower: map_case,
        accounts: Box::new(move || conduit_accounts(&database)),
        category,
        explain,
        list_alone: true,
        report: REPORT,
    };
    corpus_homeserver::run(target, synapse, started).await;
    let report = synapse::target_dir().join("e2e-report").join(REPORT);
    raw_forms_reach_the_mapped_accounts(&conduit, &report).await;
}
