//! Tests of `explain`: its decision, in the gate's order, and its text.

use super::*;

fn ask(toml: &str, q: Question) -> Explanation {
    explain(&Config::from_toml(toml).unwrap(), &q)
}

#[test]
fn a_configured_lockdown_is_mentioned() {
    let text = ask(
        "[registration]\nlockdown = { count = 50, period = \"10m\", close_for = \"1h\" }\n",
        Question::default(),
    )
    .to_string();
    assert!(
        text.contains(
            "lockdown: configured: 50 registrations within 10m close registration for 1h"
        ),
        "{text}"
    );
    assert!(!ask("", Question::default())
        .to_string()
        .contains("lockdown"));
}

#[test]
fn configured_dnsbl_zones_are_named_with_the_query_names() {
    let toml = "[reputation]\ndnsbl = [\"a.test\", \"b.test\"]\n";
    let q = Question {
        ip: Some("::ffff:192.0.2.7".parse().unwrap()),
        ..Default::default()
    };
    let text = ask(toml, q).to_string();
    assert!(
        text.contains("dnsbl: would ask 7.2.0.192.a.test, 7.2.0.192.b.test"),
        "{text}"
    );
    let text = ask(toml, Question::default()).to_string();
    assert!(text.contains("dnsbl: would ask a.test, b.test"), "{text}");
    assert!(!ask("", Question::default()).to_string().contains("dnsbl"));
}

#[test]
fn explains_refusals_by_rule() {
    let q = |name: &str| Question {
        username: Some(name.to_owned()),
        ..Default::default()
    };
    match ask("", q("adm1n")).decision {
        Explained::Refused {
            rule,
            errcode,
            status,
            ..
        } => {
            assert_eq!((rule, errcode, status), ("lookalike", "M_USER_IN_USE", 400))
        }
        other => panic!("{other:?}"),
    }
    let kevin = ask("", q("Kevin"));
    match &kevin.decision {
        Explained::Allowed { target, .. } => {
            assert_eq!(target, "POST /_matrix/client/v3/register");
        }
        other => panic!("{other:?}"),
    }
    let name = kevin.username.clone().unwrap();
    assert_eq!(
        (name.sent.as_str(), name.mapped.as_deref()),
        ("Kevin", Some("kevin"))
    );
    let text = kevin.to_string();
    assert!(
        text.contains("username: kevin (sent as \"Kevin\")"),
        "{text}"
    );
    let guest = Question {
        guest: true,
        ..Default::default()
    };
    assert!(matches!(
        ask("", guest.clone()).decision,
        Explained::Refused {
            rule: "guest_denied",
            ..
        }
    ));
    assert!(ask("[guest]\naccess = \"allow\"\n", guest).allowed());
    let banned = Question {
        ip: Some("192.0.2.7".parse().unwrap()),
        ..q("alice")
    };
    let text = ask(
        "[client_ip]\ndeny = [\"192.0.2.0/24\"]\n[registration]\nmode = \"shadow\"\n",
        banned,
    )
    .to_string();
    assert!(text.contains("rule: denied_client"), "{text}");
    assert!(text.contains("mode: shadow"), "{text}");
}

#[test]
fn names_the_mapped_name_of_a_refusal_and_the_limits_in_gate_order() {
    let limits = "[rate_limit]\nattempts_per_ip = { count = 30, period = \"1h\" }\n\
                  registrations_per_ip = { count = 3, period = \"1h\" }\n\
                  guests_per_ip = { count = 5, period = \"1h\" }\n";
    let question = |name: &str, ip: &str| Question {
        username: Some(name.to_owned()),
        ip: Some(ip.parse().unwrap()),
        ..Default::default()
    };
    let refused = ask(limits, question("Admin", "2001:db8:1:2:3:4:5:6"));
    let name = refused.username.clone().unwrap();
    assert_eq!(
        (name.sent.as_str(), name.mapped.as_deref()),
        ("Admin", Some("admin"))
    );
    let names: Vec<_> = refused.limits.iter().map(|l| l.name).collect();
    assert_eq!(
        names,
        ["attempts_per_ip"],
        "a refused name is only an attempt"
    );
    assert_eq!(refused.limits[0].key, "2001:db8:1:2::/64");
    let allowed = ask(limits, question("alice", "192.0.2.7"));
    let shown: Vec<_> = allowed
        .limits
        .iter()
        .map(|l| (l.name, l.spec.map(|s| s.count), l.key.as_str()))
        .collect();
    assert_eq!(
        shown,
        [
            ("attempts_per_ip", Some(30), "192.0.2.7"),
            ("registrations_per_ip", Some(3), "192.0.2.7"),
            ("registrations_global", None, "*"),
        ]
    );
    let text = allowed.to_string();
    assert!(
        text.contains("  registrations_per_ip: 3 per 1h, key 192.0.2.7, refunded when"),
        "{text}"
    );
    assert!(text.contains("  registrations_global: not set"), "{text}");
    let guest = Question {
        guest: true,
        ..Default::default()
    };
    let guest = ask(&format!("[guest]\naccess = \"allow\"\n{limits}"), guest);
    let names: Vec<_> = guest.limits.iter().map(|l| l.name).collect();
    assert_eq!(
        names,
        [
            "attempts_per_ip",
            "guests_per_ip",
            "registrations_per_ip",
            "registrations_global"
        ]
    );
    let banned = ask(
        "[client_ip]\ndeny = [\"192.0.2.0/24\"]\n",
        question("alice", "192.0.2.7"),
    );
    assert!(banned.limits.is_empty());
    assert!(banned.to_string().contains("limits: none"), "{banned}");
}

#[test]
fn names_the_deny_list_that_refuses_an_address() {
    let path = std::env::temp_dir().join(format!("mgk-explain-{}.txt", std::process::id()));
    std::fs::write(&path, "# exits\n198.51.100.0/24\n").unwrap();
    let toml = format!(
        "[client_ip]\ndeny_lists = [{:?}]\n",
        path.display().to_string()
    );
    let question = |ip: &str| Question {
        username: Some("alice".to_owned()),
        ip: Some(ip.parse().unwrap()),
        ..Default::default()
    };
    let listed = ask(&toml, question("198.51.100.20"));
    let unlisted = ask(&toml, question("198.51.101.20"));
    let _ = std::fs::remove_file(&path);
    match &listed.decision {
        Explained::Refused {
            rule,
            errcode,
            list,
            ..
        } => {
            assert_eq!((*rule, *errcode), ("deny_list", "M_FORBIDDEN"));
            assert_eq!(list.as_deref(), Some(path.display().to_string().as_str()));
        }
        other => panic!("{other:?}"),
    }
    let text = listed.to_string();
    assert!(text.contains("rule: deny_list\n"), "{text}");
    assert!(
        text.contains(&format!("list: {}\n", path.display())),
        "{text}"
    );
    assert!(unlisted.allowed(), "{unlisted}");
}

#[test]
fn explains_an_email_token_request_and_names_the_domain_list() {
    let path = std::env::temp_dir().join(format!("mgk-explain-email-{}.txt", std::process::id()));
    std::fs::write(&path, "mailinator.com\n").unwrap();
    let toml = format!(
        "[email]\ndenied_domain_lists = [{:?}]\n\
         [rate_limit]\ntoken_requests_per_ip = {{ count = 5, period = \"1h\" }}\n",
        path.display().to_string()
    );
    let question = |email: &str| Question {
        email: Some(email.to_owned()),
        ip: Some("192.0.2.7".parse().unwrap()),
        ..Default::default()
    };
    let listed = ask(&toml, question("bot@x.mailinator.com"));
    let free = ask(&toml, question("alice@notmailinator.com"));
    let _ = std::fs::remove_file(&path);
    match &listed.decision {
        Explained::Refused {
            rule,
            errcode,
            list,
            ..
        } => {
            assert_eq!(
                (*rule, *errcode),
                ("email_domain_list", "M_THREEPID_DENIED")
            );
            assert_eq!(list.as_deref(), Some(path.display().to_string().as_str()));
        }
        other => panic!("{other:?}"),
    }
    let names: Vec<_> = listed.limits.iter().map(|l| l.name).collect();
    assert_eq!(names, ["token_requests_per_ip"]);
    match &free.decision {
        Explained::Allowed { target, body } => {
            assert_eq!(
                target,
                "POST /_matrix/client/v3/register/email/requestToken"
            );
            assert!(body.contains("alice@notmailinator.com"), "{body}");
        }
        other => panic!("{other:?}"),
    }
    let text = free.to_string();
    assert!(
        text.contains("  token_requests_per_ip: 5 per 1h, key 192.0.2.7"),
        "{text}"
    );
}
fn gate_state(bans: &[&str], closed: bool, limits: &[(&str, u32)]) -> GateRead {
    GateRead::Read(GateState {
        url: "http://127.0.0.1:9009".into(),
        bans: bans
            .iter()
            .map(|cidr| LiveBan {
                cidr: (*cidr).to_owned(),
                remaining_ms: 3_600_000,
                reason: "wave".into(),
            })
            .collect(),
        lockdown: LockdownState {
            closed,
            remaining_ms: closed.then_some(1_800_000),
        },
        client: Some(ClientState {
            key: "192.0.2.7".into(),
            store: "memory".into(),
            limits: limits
                .iter()
                .map(|(name, remaining)| {
                    let budget = LiveBudget {
                        burst: 3,
                        remaining: *remaining,
                        next_unit_in_ms: 1_200_000,
                        counted_as: Some("192.0.2.7".into()),
                    };
                    ((*name).to_owned(), budget)
                })
                .collect(),
        }),
    })
}

fn live_ask(toml: &str, q: Question, live: Live) -> Explanation {
    explain_with(&Config::from_toml(toml).unwrap(), &q, &live)
}

fn rule(explanation: &Explanation) -> &'static str {
    match &explanation.decision {
        Explained::Refused { rule, .. } => rule,
        Explained::RateLimited { limit, .. } => limit,
        Explained::Allowed { .. } => "allowed",
    }
}

const LIMITS: &str = "[rate_limit]\nattempts_per_ip = { count = 3, period = \"1h\" }\n\
                      registrations_per_ip = { count = 3, period = \"1h\" }\n";

fn alice_from(ip: &str) -> Question {
    Question {
        username: Some("alice".into()),
        ip: Some(ip.parse().unwrap()),
        ..Default::default()
    }
}

#[test]
fn live_state_decides_in_the_gates_order() {
    let listed = Some(DnsblAnswer::Listed {
        zone: "a.test".into(),
    });
    let dnsbl = "[reputation]\ndnsbl = [\"a.test\"]\n";
    let everything = Live {
        dnsbl: listed.clone(),
        gate: gate_state(&["192.0.2.0/24"], true, &[("attempts_per_ip", 0)]),
    };
    // The configured deny list comes first, then the ban, the lockdown,
    // the limits, the name, the reservation, and last the DNSBL.
    let deny = format!("{dnsbl}[client_ip]\ndeny = [\"192.0.2.7\"]\n");
    let q = alice_from("192.0.2.7");
    assert_eq!(
        rule(&live_ask(&deny, q.clone(), everything.clone())),
        "denied_client"
    );
    let banned = live_ask(dnsbl, q.clone(), everything.clone());
    assert_eq!(rule(&banned), "temporary_ban");
    let text = banned.to_string();
    assert!(text.contains("answer: 403 M_FORBIDDEN"), "{text}");
    assert!(
        text.contains("temporary ban: 192.0.2.0/24 covers the address, 1h more"),
        "{text}"
    );
    let unbanned = Live {
        gate: gate_state(&["198.51.100.0/24"], true, &[("attempts_per_ip", 0)]),
        ..everything.clone()
    };
    let closed = live_ask(dnsbl, q.clone(), unbanned.clone());
    assert_eq!(rule(&closed), "lockdown");
    assert!(
        closed
            .to_string()
            .contains("lockdown: registration is closed now, 30m more"),
        "{closed}"
    );
    let open = Live {
        gate: gate_state(&[], false, &[("attempts_per_ip", 0)]),
        ..unbanned
    };
    let limited = live_ask(&format!("{dnsbl}{LIMITS}"), q.clone(), open.clone());
    assert_eq!(
        limited.decision,
        Explained::RateLimited {
            limit: "attempts_per_ip",
            retry_after_ms: 1_200_000
        }
    );
    let text = limited.to_string();
    assert!(
        text.contains("decision: rate limited\nrule: attempts_per_ip\n"),
        "{text}"
    );
    assert!(text.contains("retry after 20m"), "{text}");
    assert!(
        text.contains(
            "  attempts_per_ip: 3 per 1h, key 192.0.2.7, refunded never; 0 of 3 left, next in 20m"
        ),
        "{text}"
    );
    // A client over its limit is not looked up.
    assert!(limited.dnsbl.is_empty(), "{limited:?}");
    assert!(!text.contains("dnsbl"), "{text}");
    // Every attempt counts before the name is judged.
    let name = Question {
        username: Some("adm1n".into()),
        ..q.clone()
    };
    assert_eq!(
        rule(&live_ask(LIMITS, name.clone(), open)),
        "attempts_per_ip"
    );
    // The reservation comes after the name: a refused name is refused
    // by its rule, an accepted one by the spent registrations, before
    // the DNSBL is asked.
    let spent = Live {
        dnsbl: listed.clone(),
        gate: gate_state(
            &[],
            false,
            &[("attempts_per_ip", 2), ("registrations_per_ip", 0)],
        ),
    };
    let with_limits = format!("{dnsbl}{LIMITS}");
    let name_refused = live_ask(&with_limits, name, spent.clone());
    assert_eq!(rule(&name_refused), "lookalike");
    assert!(name_refused.dnsbl.is_empty(), "{name_refused:?}");
    let reserved = live_ask(&with_limits, q.clone(), spent);
    assert_eq!(rule(&reserved), "registrations_per_ip");
    assert!(!reserved.allowed());
    assert!(
        reserved
            .to_string()
            .contains("attempts_per_ip: 3 per 1h, key 192.0.2.7, refunded never; 2 of 3 left\n"),
        "{reserved}"
    );
    // With a registration left, the DNSBL decides.
    let left = Live {
        dnsbl: listed,
        gate: gate_state(
            &[],
            false,
            &[("attempts_per_ip", 2), ("registrations_per_ip", 1)],
        ),
    };
    let looked_up = live_ask(&with_limits, q, left);
    assert_eq!(rule(&looked_up), "dnsbl");
    assert!(
        looked_up
            .to_string()
            .contains("dnsbl: listed in a.test (asked 7.2.0.192.a.test): refused with rule dnsbl"),
        "{looked_up}"
    );
}

#[test]
fn a_budget_counted_under_a_shared_key_says_so() {
    let mut gate = gate_state(&[], false, &[("attempts_per_ip", 1)]);
    if let GateRead::Read(GateState {
        client: Some(client),
        ..
    }) = &mut gate
    {
        for budget in client.limits.values_mut() {
            budget.counted_as = Some("192.0.0.0/16".into());
        }
    }
    let live = Live { dnsbl: None, gate };
    let text = live_ask(LIMITS, alice_from("192.0.2.7"), live).to_string();
    assert!(
        text.contains(
            "attempts_per_ip: 3 per 1h, key 192.0.2.7, refunded never, \
             counted under the shared key 192.0.0.0/16; 1 of 3 left\n"
        ),
        "{text}"
    );
}

#[test]
fn a_lockdown_refuses_registrations_not_token_requests() {
    let closed = Live {
        dnsbl: None,
        gate: gate_state(&[], true, &[]),
    };
    let token = Question {
        email: Some("alice@example.org".into()),
        ..alice_from("192.0.2.7")
    };
    let explained = live_ask("", token, closed);
    assert!(explained.allowed(), "{explained}");
    assert!(
        explained
            .to_string()
            .contains("it refuses registrations, not token requests"),
        "{explained}"
    );
}

#[test]
fn a_failed_dnsbl_lookup_decides_per_on_dnsbl_error() {
    let failed = Live {
        dnsbl: Some(DnsblAnswer::Failed {
            zone: "a.test".into(),
            error: "no answer within the timeout".into(),
        }),
        gate: GateRead::NotAsked,
    };
    let zones = "[reputation]\ndnsbl = [\"a.test\"]\n";
    let allowed = live_ask(zones, alice_from("192.0.2.7"), failed.clone());
    assert!(allowed.allowed(), "{allowed}");
    let text = allowed.to_string();
    assert!(
        text.contains("dnsbl: the lookup in a.test failed: no answer within the timeout"),
        "{text}"
    );
    assert!(
        text.contains("on_dnsbl_error = \"allow\" lets the request on"),
        "{text}"
    );
    let deny = format!("{zones}on_dnsbl_error = \"deny\"\n");
    let refused = live_ask(&deny, alice_from("192.0.2.7"), failed);
    assert_eq!(rule(&refused), "dnsbl_error");
}

#[test]
fn says_when_live_state_was_not_read_or_could_not_be() {
    let text = ask("", Question::default()).to_string();
    assert!(
        text.contains("live state: not read (temporary bans, whether registration is closed now"),
        "{text}"
    );
    let failed = Live {
        dnsbl: None,
        gate: GateRead::Failed {
            url: "http://127.0.0.1:9".into(),
            error: "connection refused".into(),
        },
    };
    let explained = live_ask("", alice_from("192.0.2.7"), failed);
    assert!(explained.gate_unreadable());
    assert!(
        explained
            .to_string()
            .starts_with("decision: allowed, as far as known without the running gate's state\n"),
        "{explained}"
    );
    assert!(
        explained
            .to_string()
            .contains("live state: could not be read from http://127.0.0.1:9: connection refused"),
        "{explained}"
    );
}
