//! The username corpus through the gate in front of a real homeserver, and
//! its verdicts beside Synapse's: what the Dendrite and the Conduit corpus
//! tests share.
//!
//! Every name of [`corpus`] (the deterministic corpus of the Synapse
//! differential, more than 10,000 names) is registered for real through the
//! gate (default policy) with dummy auth, one fresh request per name. Names
//! that map to the same localpart go one after the other in corpus order, so
//! the first creates the account and the later ones are duplicates, which
//! the homeserver answers `400 M_USER_IN_USE`. Then the homeserver is asked
//! directly, not through the gate, whether an account exists for every name
//! the gate refused, under the localpart the gate maps it to and under the
//! raw name (which the homeserver lower-cases itself):
//! `/register/available` first, and a password login for the names that
//! check cannot judge. Its account table (sqlite) is read before the first
//! registration (the homeserver's own accounts) and after the last. No
//! account may exist for a refused name (an account a refused name's lookup
//! reaches must be one an accepted name created, or the homeserver's own),
//! every new account must be one a forwarded registration reported
//! creating, and each created localpart must be the gate's mapped name.
//!
//! The same first registration step (`{"username", "password"}`, no auth)
//! is sent directly to the homeserver (or to a second one started alike,
//! see [`Target::steps_url`]) and to a real Synapse, for the mapped name of
//! every forwarded registration and for every raw corpus name. The report
//! counts, by gate rule, the raw names each server alone would accept that
//! the gate refuses, and lists every name the two servers answer
//! differently, grouped by kind; a difference outside the known kinds fails
//! the test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Instant;

use matrix_gatekeeper::config::UsernameConfig;
use matrix_gatekeeper::gate::username::{map_case, UsernamePolicy, UsernameRule};

use crate::corpus::corpus;
use crate::gate_for_upstream;
use crate::synapse::{self, Synapse, SERVER_NAME};
use probes::{existence, first_steps, looked_up, register_all};
pub(crate) use probes::{go_lower, sqlite_strings, Step};
pub(crate) use show::show;
use show::{timed, Sections};

mod probes;
mod show;

/// A homeserver the corpus runs against, and what differs between them.
pub(crate) struct Target {
    /// Its name in the report and in messages (`Dendrite`).
    pub(crate) name: &'static str,
    /// Its version, for the report's title.
    pub(crate) version: String,
    /// How it runs, for the report: `Dendrite (sqlite, bcrypt cost 4, open
    /// registration)`.
    pub(crate) setup: String,
    /// Its own base URL: the gate's upstream, asked about existence.
    pub(crate) url: String,
    /// Where the first steps go: the homeserver itself when its first step
    /// does not depend on the accounts it holds, else a second one started
    /// alike that holds only its own accounts.
    pub(crate) steps_url: String,
    /// How it lower-cases a name it is given.
    pub(crate) lower: fn(&str) -> String,
    /// Every localpart in its account table.
    pub(crate) accounts: Box<dyn Fn() -> Vec<String>>,
    /// Why it and Synapse answer a first step for a name differently (the
    /// name, its answer, Synapse's); `UNEXPLAINED` fails the test.
    pub(crate) category: fn(&str, &Step, &Step) -> &'static str,
    /// What a category means.
    pub(crate) explain: fn(&str) -> &'static str,
    /// Whether the report lists the raw names it alone would accept that
    /// the gate refuses.
    pub(crate) list_alone: bool,
    /// The report's file name in `target/e2e-report`.
    pub(crate) report: &'static str,
}

/// What became of one name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    /// The gate answered itself (marker `refused`) with this errcode.
    Refused(String),
    /// Forwarded; the homeserver created this user ID.
    Created(String),
    /// Forwarded; an earlier name with the same localpart created it, and
    /// the homeserver answered `M_USER_IN_USE`.
    Duplicate,
    /// Forwarded; the homeserver refused it with this answer.
    HomeserverRefused(String),
}

/// Registers the corpus through a gate in front of `target`, asks `target`
/// and `synapse` directly, writes the report and fails on any finding.
/// `started` is when the test began (the homeservers are running).
pub(crate) async fn run(target: Target, synapse: Synapse, started: Instant) {
    let startup_time = started.elapsed();
    let hs = target.name;
    let names: Vec<String> = corpus().into_iter().map(|(name, _)| name).collect();
    let n = names.len();
    assert!(n >= 10_000, "corpus has {n} names");
    let policy = UsernamePolicy::new(&UsernameConfig::default(), SERVER_NAME);
    let verdicts: Vec<Result<String, UsernameRule>> =
        names.iter().map(|name| policy.check(name, false)).collect();

    // First steps for both servers: every raw name, then every mapped name
    // the gate forwards that is not a raw name too.
    let mut probes = names.clone();
    let mut probe_of: HashMap<String, usize> = (0..n).map(|i| (names[i].clone(), i)).collect();
    for mapped in verdicts.iter().flatten() {
        if !probe_of.contains_key(mapped) {
            probe_of.insert(mapped.clone(), probes.len());
            probes.push(mapped.clone());
        }
    }

    let own = (target.accounts)();
    let gate = gate_for_upstream(&target.url, "").await;
    // The registrations and both servers' first steps, side by side.
    let (registered, on_homeserver, on_synapse) = tokio::join!(
        timed(register_all(gate.url(""), &names)),
        timed(first_steps(target.steps_url.clone(), probes.clone())),
        timed(first_steps(synapse.url(), probes.clone())),
    );
    let ((replies, register_time), (hs_steps, hs_time)) = (registered, on_homeserver);
    let (synapse_steps, synapse_time) = on_synapse;
    drop(synapse);

    // What became of each name.
    let mut sections = Sections::default();
    let mut fates = Vec::with_capacity(n);
    let mut created: HashMap<String, usize> = HashMap::new();
    let (mut gate_mismatch, mut mapping_bugs, mut twice) = (Vec::new(), Vec::new(), Vec::new());
    let (mut orphan_in_use, mut unexplained_refusals) = (Vec::new(), Vec::new());
    for i in 0..n {
        let reply = &replies[i];
        let fate = match (reply.marker.as_deref(), reply.status, reply.errcode()) {
            (Some("refused"), _, errcode) => Fate::Refused(errcode.to_owned()),
            (Some("allowed"), 200, _) => Fate::Created(reply.field("user_id").to_owned()),
            (Some("allowed"), 400, "M_USER_IN_USE") => Fate::Duplicate,
            (Some("allowed"), ..) => Fate::HomeserverRefused(reply.label()),
            (marker, ..) => {
                Fate::HomeserverRefused(format!("marker {marker:?}: {}", reply.label()))
            }
        };
        let agrees = match (&verdicts[i], &fate) {
            (Err(rule), Fate::Refused(errcode)) => rule.error().errcode == errcode,
            (Ok(_), Fate::Refused(_)) | (Err(_), _) => false,
            (Ok(_), _) => reply.marker.as_deref() == Some("allowed"),
        };
        if !agrees {
            gate_mismatch.push(format!(
                "{} -> policy {:?}, gate {} {}",
                show(&names[i]),
                verdicts[i],
                reply.marker.as_deref().unwrap_or("(no marker)"),
                reply.label()
            ));
        }
        if let (Ok(mapped), Fate::Created(user_id)) = (&verdicts[i], &fate) {
            if *user_id != format!("@{mapped}:{SERVER_NAME}") {
                mapping_bugs.push(format!(
                    "{} -> gate {mapped:?}, {hs} {user_id}",
                    show(&names[i])
                ));
            }
            if let Some(first) = created.insert(crate::localpart_of(user_id).to_owned(), i) {
                twice.push(format!(
                    "{user_id}: {} and {}",
                    show(&names[first]),
                    show(&names[i])
                ));
            }
        }
        if let (Ok(mapped), Fate::Duplicate) = (&verdicts[i], &fate) {
            if created.get(mapped).is_none_or(|&first| first >= i) {
                orphan_in_use.push(format!("{} as {mapped:?}", show(&names[i])));
            }
        }
        if let (Ok(mapped), Fate::HomeserverRefused(answer)) = (&verdicts[i], &fate) {
            // The homeserver's own refusal: its first step refuses the name too.
            if hs_steps[probe_of[mapped]].accepted() {
                unexplained_refusals.push(format!("{} as {mapped:?}: {answer}", show(&names[i])));
            }
        }
        fates.push(fate);
    }

    // Existence, asked of the homeserver directly, for every refused name
    // under its mapped and its raw form.
    let refused: Vec<usize> = (0..n).filter(|&i| verdicts[i].is_err()).collect();
    let mut queries: Vec<String> = Vec::new();
    let mut query_of: HashMap<String, usize> = HashMap::new();
    for &i in &refused {
        for query in [map_case(&names[i]), names[i].clone()] {
            query_of.entry(query.clone()).or_insert_with(|| {
                queries.push(query);
                queries.len() - 1
            });
        }
    }
    let existence_started = Instant::now();
    let found = existence(target.url.clone(), queries.clone()).await;
    let existence_time = existence_started.elapsed();
    let mut lookups: BTreeMap<String, usize> = BTreeMap::new();
    for answer in &found {
        *lookups.entry(answer.kind()).or_default() += 1;
    }
    // The account table: the homeserver's own accounts (there before the
    // first registration) and the created ones, nothing else.
    let accounts = (target.accounts)();
    let table: HashSet<&String> = accounts.iter().collect();
    let mut table_diff: Vec<String> = accounts
        .iter()
        .filter(|a| !created.contains_key(*a) && !own.contains(*a))
        .map(|a| format!("@{a} is in the table, no registration reported creating it"))
        .collect();
    table_diff.extend(
        created
            .keys()
            .chain(&own)
            .filter(|c| !table.contains(c))
            .map(|c| format!("@{c} was created, the table lacks it")),
    );
    if table.len() != accounts.len() {
        table_diff.push(format!(
            "{} rows, {} localparts",
            accounts.len(),
            table.len()
        ));
    }
    // Each account a refused name's lookups reach must be one an accepted
    // name created, or the homeserver's own; and its answer must agree with
    // its table.
    let (mut refused_accounts, mut attributed) = (Vec::new(), Vec::new());
    let mut refused_with_account = HashSet::new();
    for &i in &refused {
        let mapped = map_case(&names[i]);
        let forms: &[(&str, &String)] = if mapped == names[i] {
            &[("mapped", &mapped)]
        } else {
            &[("mapped", &mapped), ("raw", &names[i])]
        };
        for (form, query) in forms {
            let answer = &found[query_of[*query]];
            let reached = looked_up(query, target.lower);
            let hits: Vec<&String> = reached.iter().filter(|l| table.contains(l)).collect();
            if hits.is_empty() && answer.exists() {
                refused_with_account.insert(i);
                refused_accounts.push(format!(
                    "{} ({form} {}): {hs} says it exists ({}), its table has none of {}",
                    show(&names[i]),
                    show(query),
                    answer.kind(),
                    reached
                        .iter()
                        .map(|l| show(l))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            for hit in hits {
                let by = match created.get(hit) {
                    Some(&creator) => format!("created by {}", show(&names[creator])),
                    None if own.contains(hit) => format!("{hs}'s own"),
                    None => {
                        refused_with_account.insert(i);
                        refused_accounts.push(format!(
                            "{} ({form} {}) -> @{hit} ({})",
                            show(&names[i]),
                            show(query),
                            answer.kind()
                        ));
                        continue;
                    }
                };
                attributed.push(format!(
                    "{} ({form} {}) -> @{hit} ({}), {by}",
                    show(&names[i]),
                    show(query),
                    answer.kind()
                ));
            }
        }
    }

    // The homeserver beside Synapse, name by name.
    let forwarded: HashSet<usize> = verdicts.iter().flatten().map(|m| probe_of[m]).collect();
    let mut differences: BTreeMap<(String, &str), Vec<usize>> = BTreeMap::new();
    let mut forwarded_synapse_refuses = Vec::new();
    let mut other_rule_only = 0usize;
    for p in 0..probes.len() {
        let (d, s) = (&hs_steps[p], &synapse_steps[p]);
        if forwarded.contains(&p) && !s.accepted() {
            forwarded_synapse_refuses.push(format!(
                "{} -> Synapse {}",
                show(&probes[p]),
                s.label()
            ));
        }
        if d.answer() == s.answer() {
            other_rule_only += usize::from(d != s);
            continue;
        }
        let kind = match (d.accepted(), s.accepted()) {
            (false, true) => format!("{hs} refuses, Synapse accepts"),
            (true, false) => format!("{hs} accepts, Synapse refuses"),
            _ => "both refuse with different answers".to_owned(),
        };
        differences
            .entry((kind, (target.category)(&probes[p], d, s)))
            .or_default()
            .push(p);
    }
    let role = |p: usize| -> String {
        let mut roles = Vec::new();
        if forwarded.contains(&p) {
            roles.push("the gate forwards it".to_owned());
        }
        match verdicts.get(p) {
            Some(Ok(mapped)) if *mapped != probes[p] => {
                roles.push(format!("the gate forwards it as {}", show(mapped)))
            }
            Some(Err(rule)) => roles.push(format!("the gate refuses it ({})", rule.name())),
            _ => {}
        }
        roles.join("; ")
    };
    // Raw names one server alone accepts and the gate refuses.
    let mut protects: BTreeMap<&str, [usize; 2]> = BTreeMap::new();
    let mut alone: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for i in 0..n {
        if let Err(rule) = &verdicts[i] {
            let row = protects.entry(rule.name()).or_default();
            row[0] += usize::from(hs_steps[i].accepted());
            row[1] += usize::from(synapse_steps[i].accepted());
            if hs_steps[i].accepted() {
                alone.entry(rule.name()).or_default().push(i);
            }
        }
    }

    // Forwarded names the homeserver would map otherwise if it got the raw
    // name.
    let remapped: Vec<usize> = (0..n)
        .filter(|&i| matches!(&verdicts[i], Ok(mapped) if (target.lower)(&names[i]) != *mapped))
        .collect();

    // The report.
    let count = |f: fn(&Fate) -> bool| fates.iter().filter(|fate| f(fate)).count();
    let gate_refused = count(|f| matches!(f, Fate::Refused(_)));
    let created_count = count(|f| matches!(f, Fate::Created(_)));
    let duplicates = count(|f| matches!(f, Fate::Duplicate));
    let hs_refused = count(|f| matches!(f, Fate::HomeserverRefused(_)));
    let mut r = String::new();
    let _ = writeln!(
        r,
        "# Username corpus through the gate: {hs} {}, and {hs} vs Synapse {}\n",
        target.version,
        synapse::PACKAGES[0].trim_start_matches("matrix-synapse[oidc]==")
    );
    let _ = writeln!(
        r,
        "Gate with its default configuration (`server_name = \"{SERVER_NAME}\"`), {} behind \
         it. Every name registered through the gate with dummy auth; existence asked of {hs} \
         directly.\n",
        target.setup
    );
    let _ = writeln!(r, "| | names |\n|---|---|");
    for (what, value) in [
        ("corpus".to_owned(), n),
        ("refused by the gate".to_owned(), gate_refused),
        (format!("forwarded to {hs}"), n - gate_refused),
        (format!("created by {hs}"), created_count),
        (
            "duplicates (`M_USER_IN_USE`: an earlier name created the localpart)".to_owned(),
            duplicates,
        ),
        (format!("refused by {hs} itself"), hs_refused),
        (
            format!("forwarded names whose raw form {hs} alone lower-cases otherwise"),
            remapped.len(),
        ),
        (
            "accounts for names the gate refused (must be 0)".to_owned(),
            refused_with_account.len(),
        ),
        (format!("accounts in {hs}'s table"), accounts.len()),
    ] {
        let _ = writeln!(r, "| {what} | {value} |");
    }
    for &i in &remapped {
        let _ = writeln!(
            r,
            "- {}: the gate {}, {hs}'s own lower-casing {}",
            show(&names[i]),
            show(verdicts[i].as_ref().unwrap()),
            show(&(target.lower)(&names[i]))
        );
    }
    let _ = writeln!(
        r,
        "\n{hs}'s own accounts, there before the first registration: {}.",
        own.iter()
            .map(|a| format!("`@{a}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut by_rule: BTreeMap<String, usize> = BTreeMap::new();
    for (i, verdict) in verdicts.iter().enumerate() {
        let key = match (verdict, &fates[i]) {
            (Err(rule), _) => format!("gate: {} ({})", rule.error().errcode, rule.name()),
            (Ok(_), Fate::HomeserverRefused(answer)) => format!("{hs}: {answer}"),
            _ => continue,
        };
        *by_rule.entry(key).or_default() += 1;
    }
    let _ = writeln!(r, "\nRefusals:\n\n| by | names |\n|---|---|");
    for (key, value) in &by_rule {
        let _ = writeln!(r, "| {} | {value} |", key.replace('|', "\\|"));
    }
    let _ = writeln!(
        r,
        "\nExistence of the refused names ({} refused names; {} distinct lookups, mapped and \
         raw form):\n\n| answer | lookups |\n|---|---|",
        refused.len(),
        queries.len()
    );
    for (kind, value) in &lookups {
        let _ = writeln!(r, "| {} | {value} |", kind.replace('|', "\\|"));
    }
    let _ = writeln!(
        r,
        "\nAccounts that a refused name's lookups reach ({hs} lower-cases the raw name \
         itself, and reads `@localpart:server`), each an accepted name's or {hs}'s own: \
         {}\n",
        attributed.len()
    );
    for line in attributed.iter().take(50) {
        let _ = writeln!(r, "- {line}");
    }
    let _ = writeln!(
        r,
        "\n## What each server alone accepts that the gate refuses\n\n\
         Raw corpus names, first step sent directly:\n\n\
         | gate rule | {hs} accepts | Synapse accepts |\n|---|---|---|"
    );
    for (rule, [d, s]) in &protects {
        let _ = writeln!(r, "| {rule} | {d} | {s} |");
    }
    if target.list_alone {
        for (rule, list) in &alone {
            let _ = writeln!(
                r,
                "\n### {hs} alone accepts, the gate refuses ({rule}): {}\n",
                list.len()
            );
            for &i in list.iter().take(40) {
                let _ = writeln!(
                    r,
                    "- {}: Synapse {}",
                    show(&names[i]),
                    synapse_steps[i].label()
                );
            }
            if list.len() > 40 {
                let _ = writeln!(r, "- … and {} more", list.len() - 40);
            }
        }
    }
    let _ = writeln!(
        r,
        "\n## {hs} vs Synapse, first step\n\n{} usernames ({n} raw corpus names and {} \
         mapped names the gate forwards that are no raw name), each sent to both. Answers \
         differ (status or errcode) for {}; {other_rule_only} more get the same status and \
         errcode from a different check.\n\n\
         | kind | category | usernames | meaning |\n|---|---|---|---|",
        probes.len(),
        probes.len() - n,
        differences.values().map(Vec::len).sum::<usize>()
    );
    for ((kind, category), list) in &differences {
        let _ = writeln!(
            r,
            "| {kind} | {category} | {} | {} |",
            list.len(),
            (target.explain)(category)
        );
    }
    for ((kind, category), list) in &differences {
        let _ = writeln!(r, "\n### {kind}: {category} ({})\n", list.len());
        for &p in list {
            let _ = writeln!(
                r,
                "- {}: {hs} {}, Synapse {}; {}",
                show(&probes[p]),
                hs_steps[p].label(),
                synapse_steps[p].label(),
                role(p)
            );
        }
    }
    let _ = writeln!(r, "\n## Failures\n");
    sections.report = r;
    sections.add("ACCOUNT FOR A NAME THE GATE REFUSED", refused_accounts);
    sections.add(
        "the gate's verdict differs from its UsernamePolicy",
        gate_mismatch,
    );
    sections.add(
        "a created user ID is not the gate's mapped name",
        mapping_bugs,
    );
    sections.add("a localpart created twice", twice);
    sections.add(
        &format!("{hs}'s account table differs from the created accounts"),
        table_diff,
    );
    sections.add(
        "M_USER_IN_USE without an earlier name creating it",
        orphan_in_use,
    );
    sections.add(
        &format!("refused by {hs} on registration, accepted by its first step"),
        unexplained_refusals,
    );
    sections.add(
        "the gate forwards a name Synapse refuses",
        forwarded_synapse_refuses,
    );
    sections.add(
        &format!("{hs} and Synapse differ for a reason not in the known categories"),
        differences
            .iter()
            .filter(|((_, category), _)| *category == "UNEXPLAINED")
            .flat_map(|(_, list)| list.iter().map(|&p| show(&probes[p])))
            .collect(),
    );
    let dir = synapse::target_dir().join("e2e-report");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(target.report);
    std::fs::write(&path, &sections.report).unwrap();

    eprintln!(
        "{} username corpus: {n} names; gate refused {gate_refused}, forwarded {}, \
         created {created_count}, duplicates {duplicates}, refused by {hs} {hs_refused}; \
         accounts for refused names {}; {hs} and Synapse differ on {} of {} usernames ({}); \
         start {startup_time:.1?}, registrations {register_time:.1?}, {hs} steps \
         {hs_time:.1?}, Synapse steps {synapse_time:.1?}, existence {existence_time:.1?} ({} \
         lookups), total {:.1?}; report {}",
        hs.to_lowercase(),
        n - gate_refused,
        refused_with_account.len(),
        differences.values().map(Vec::len).sum::<usize>(),
        probes.len(),
        differences
            .iter()
            .map(|((kind, category), list)| format!("{kind} / {category}: {}", list.len()))
            .collect::<Vec<_>>()
            .join(", "),
        queries.len(),
        started.elapsed(),
        path.display()
    );
    assert!(
        sections.failures.is_empty(),
        "the gate in front of {hs} (see {}):\n{}",
        path.display(),
        sections.failures.join("\n")
    );
}
