//! Names the gate refuses never become accounts, and what the homeserver
//! alone does with each of them.

use super::{assert_answer, assert_refused_by_gate, marker, register_on, Flavour, Homeserver};
use crate::synapse::SERVER_NAME;
use crate::REGISTER;

/// What a homeserver does with a registration sent to it directly.
#[derive(Debug, Clone, Copy)]
enum Alone {
    /// Registers the account with this localpart.
    Registers(&'static str),
    /// Refuses with this status and errcode.
    Refuses(u16, &'static str),
}

/// Every name the username policy refuses (a deny pattern `^spam` added,
/// and `Alice` under `case = "reject"`) is refused by the gate with the
/// policy's errcode, and no account exists afterwards, neither under the
/// name as sent nor under its lower-cased form. The homeserver is asked
/// directly: `/register/available`, or a password login where that check
/// cannot judge the name.
///
/// Then the same names go to the homeserver directly, which shows where
/// the gate is the only thing in the way, and that the existence checks
/// above do see an account once there is one. Measured:
///
/// | name           | Dendrite v0.13.8                 | Conduit 0.10              |
/// |----------------|----------------------------------|---------------------------|
/// | `admin`, `adm1n`, `adrnin`, `a.d.m.i.n`, `spammer` | registers | registers |
/// | `Alice`        | registers `alice`                | registers `alice`         |
/// | `_bridge`      | `400 M_INVALID_USERNAME`         | registers                 |
/// | `12345`, `-123` | `400 M_INVALID_USERNAME` ("Numeric user IDs are reserved") | registers |
/// | 250 × `a`      | `400 M_BAD_JSON` (not Synapse's `M_INVALID_USERNAME`) | `400 M_INVALID_USERNAME` |
/// | `al ice`, `é`  | `400 M_INVALID_USERNAME`         | `400 M_INVALID_USERNAME`  |
/// | `İvan`         | registers `ivan` (Go's simple case mapping: `İ` → `i`) | `400 M_INVALID_USERNAME` |
///
/// Dendrite counts 254 bytes for a whole user ID where the spec (and the
/// gate) allow 255: the longest localpart the gate lets through here (245
/// bytes) is refused by Dendrite with `400 M_BAD_JSON`, and registered by
/// Conduit.
pub async fn refused_names_never_become_accounts(hs: &Homeserver) {
    let gate = hs.gate("[username]\ndeny_patterns = [\"^spam\"]\n").await;
    let long = "a".repeat(250);
    let refused: &[(&str, &str)] = &[
        ("admin", "M_USER_IN_USE"),
        ("ADMIN", "M_USER_IN_USE"),
        ("adm1n", "M_USER_IN_USE"),
        ("adrnin", "M_USER_IN_USE"),
        ("a.d.m.i.n", "M_USER_IN_USE"),
        ("spammer", "M_INVALID_USERNAME"),
        ("_bridge", "M_INVALID_USERNAME"),
        ("12345", "M_INVALID_USERNAME"),
        (&long, "M_INVALID_USERNAME"),
        ("al ice", "M_INVALID_USERNAME"),
        ("é", "M_INVALID_USERNAME"),
        ("\u{130}van", "M_INVALID_USERNAME"),
    ];
    for (requested, errcode) in refused {
        let answer = register_on(&gate.url(""), REGISTER, requested).await;
        assert_refused_by_gate(&answer, 400, errcode, requested);
        assert_no_account(hs, requested).await;
    }
    // `ivan` is what Dendrite would make of `İvan`.
    assert!(!hs.exists("ivan").await);

    let strict = hs.gate("[username]\ncase = \"reject\"\n").await;
    let answer = register_on(&strict.url(""), REGISTER, "Alice").await;
    assert_refused_by_gate(&answer, 400, "M_INVALID_USERNAME", "Alice");
    assert_no_account(hs, "Alice").await;

    // The longest user ID the spec allows: 1 + 245 + 1 + 8 = 255 bytes.
    let longest = "b".repeat(255 - 2 - SERVER_NAME.len());
    let answer = register_on(&gate.url(""), REGISTER, &longest).await;
    assert_eq!(marker(&answer), "allowed", "{:?}", answer.headers);
    match hs.flavour {
        Flavour::Dendrite => {
            assert_answer(&answer, 400, "M_BAD_JSON", "the longest name");
            assert!(!hs.exists(&longest).await);
        }
        Flavour::Conduit => {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert!(hs.exists(&longest).await);
        }
    }

    // The homeserver alone.
    use Alone::{Refuses, Registers};
    let direct: &[(&str, Alone, Alone)] = &[
        ("admin", Registers("admin"), Registers("admin")),
        ("adm1n", Registers("adm1n"), Registers("adm1n")),
        ("adrnin", Registers("adrnin"), Registers("adrnin")),
        ("a.d.m.i.n", Registers("a.d.m.i.n"), Registers("a.d.m.i.n")),
        ("spammer", Registers("spammer"), Registers("spammer")),
        ("Alice", Registers("alice"), Registers("alice")),
        (
            "_bridge",
            Refuses(400, "M_INVALID_USERNAME"),
            Registers("_bridge"),
        ),
        (
            "12345",
            Refuses(400, "M_INVALID_USERNAME"),
            Registers("12345"),
        ),
        // Not all digits for the gate, but a number for Dendrite.
        (
            "-123",
            Refuses(400, "M_INVALID_USERNAME"),
            Registers("-123"),
        ),
        (
            &long,
            Refuses(400, "M_BAD_JSON"),
            Refuses(400, "M_INVALID_USERNAME"),
        ),
        (
            "al ice",
            Refuses(400, "M_INVALID_USERNAME"),
            Refuses(400, "M_INVALID_USERNAME"),
        ),
        (
            "é",
            Refuses(400, "M_INVALID_USERNAME"),
            Refuses(400, "M_INVALID_USERNAME"),
        ),
        (
            "\u{130}van",
            Registers("ivan"),
            Refuses(400, "M_INVALID_USERNAME"),
        ),
    ];
    for (requested, dendrite, conduit) in direct {
        let expected = match hs.flavour {
            Flavour::Dendrite => dendrite,
            Flavour::Conduit => conduit,
        };
        let answer = hs.register_directly(requested).await;
        match *expected {
            Registers(localpart) => {
                assert_eq!(answer.status, 200, "{requested:?}: {:?}", answer.body);
                assert_eq!(
                    answer.json()["user_id"],
                    format!("@{localpart}:{SERVER_NAME}"),
                    "{requested:?}"
                );
                assert!(hs.exists(localpart).await, "{requested:?}");
                assert!(hs.can_log_in(localpart).await, "{requested:?}");
            }
            Refuses(status, errcode) => {
                assert_answer(&answer, status, errcode, requested);
                assert_no_account(hs, requested).await;
            }
        }
    }
}

/// Asserts that neither `requested` nor its lower-cased form is an
/// account on the homeserver.
async fn assert_no_account(hs: &Homeserver, requested: &str) {
    let lower = requested.to_lowercase();
    for name in [requested, lower.as_str()] {
        assert!(
            !hs.exists(name).await,
            "{}: {requested:?} became the account {name:?}",
            hs.name()
        );
        assert!(!hs.can_log_in(name).await, "{}: {name:?}", hs.name());
    }
}
