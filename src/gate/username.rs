//! The username policy: Synapse's case mapping, the spec grammar, and the
//! operator's rules (reserved names and their look-alikes, deny patterns).

use std::collections::HashSet;

use regex::Regex;

use crate::config::{CaseMode, UsernameConfig};
use crate::error::MatrixError;

/// The longest user ID the spec allows, in bytes.
pub const MAX_USER_ID_BYTES: usize = 255;

/// The compiled username policy.
#[derive(Debug, Clone)]
pub struct UsernamePolicy {
    case: CaseMode,
    reserved: HashSet<String>,
    reserved_skeletons: HashSet<String>,
    deny_patterns: Vec<Regex>,
    allow_leading_underscore: bool,
    allow_numeric: bool,
    server_name: String,
}

/// Why a name was refused: the rule that refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernameRule {
    /// Not a string.
    NotAString,
    /// Upper case with `case = "reject"`.
    UpperCase,
    /// Empty.
    Empty,
    /// A character outside `a-z 0-9 . _ = - / +`.
    Grammar,
    /// Starts with `_`.
    LeadingUnderscore,
    /// All digits.
    Numeric,
    /// The user ID would exceed 255 bytes.
    TooLong,
    /// A reserved name.
    Reserved,
    /// A look-alike of a reserved name.
    Lookalike,
    /// Matched a deny pattern.
    DenyPattern,
}

impl UsernameRule {
    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            UsernameRule::NotAString => "not_a_string",
            UsernameRule::UpperCase => "upper_case",
            UsernameRule::Empty => "empty",
            UsernameRule::Grammar => "grammar",
            UsernameRule::LeadingUnderscore => "leading_underscore",
            UsernameRule::Numeric => "numeric",
            UsernameRule::TooLong => "too_long",
            UsernameRule::Reserved => "reserved",
            UsernameRule::Lookalike => "lookalike",
            UsernameRule::DenyPattern => "deny_pattern",
        }
    }

    /// The Matrix error a client receives for this rule.
    pub fn error(self) -> MatrixError {
        match self {
            UsernameRule::NotAString => {
                MatrixError::invalid_username("The username must be a string.")
            }
            UsernameRule::UpperCase => {
                MatrixError::invalid_username("User ID may not contain upper-case characters.")
            }
            UsernameRule::Empty => MatrixError::invalid_username("User ID cannot be empty."),
            UsernameRule::Grammar => MatrixError::invalid_username(
                "User ID can only contain characters a-z, 0-9, or '=_-./+'.",
            ),
            UsernameRule::LeadingUnderscore => {
                MatrixError::invalid_username("User ID may not begin with _.")
            }
            UsernameRule::Numeric => {
                MatrixError::invalid_username("Numeric user IDs are reserved for guest users.")
            }
            UsernameRule::TooLong => MatrixError::invalid_username(format!(
                "User ID may not be longer than {MAX_USER_ID_BYTES} characters."
            )),
            UsernameRule::Reserved | UsernameRule::Lookalike => MatrixError::user_in_use(),
            UsernameRule::DenyPattern => {
                MatrixError::invalid_username("This username is not allowed on this server.")
            }
        }
    }
}

/// The homeserver's case mapping: Unicode full lower-casing, as Python's
/// `str.lower()` does (`"\u{212A}elvin"` becomes `"kelvin"`).
pub fn map_case(name: &str) -> String {
    name.to_lowercase()
}

/// Whether every character is in the spec's localpart grammar.
pub fn is_grammar_char(c: char) -> bool {
    matches!(c, 'a'..='z' | '0'..='9' | '.' | '_' | '=' | '-' | '/' | '+')
}

impl UsernamePolicy {
    /// Compiles the policy from its configuration.
    pub fn new(config: &UsernameConfig, server_name: &str) -> Self {
        UsernamePolicy {
            case: config.case,
            reserved: config.reserved.iter().cloned().collect(),
            reserved_skeletons: if config.reserved_lookalikes {
                config.reserved.iter().map(|r| skeleton(r)).collect()
            } else {
                HashSet::new()
            },
            deny_patterns: config.deny_patterns.iter().map(|p| p.0.clone()).collect(),
            allow_leading_underscore: config.allow_leading_underscore,
            allow_numeric: config.allow_numeric,
            server_name: server_name.to_owned(),
        }
    }

    /// Checks a requested username. On success returns the mapped localpart
    /// the homeserver must receive. `guest_upgrade` is true for a guest
    /// upgrade the policy grants (a non-empty `guest_access_token` while
    /// guests are allowed): such a request may name its own all-digit
    /// localpart (the homeserver checks the token).
    pub fn check(&self, requested: &str, guest_upgrade: bool) -> Result<String, UsernameRule> {
        let (mapped, verdict) = self.judge(requested, guest_upgrade);
        verdict?;
        mapped.ok_or(UsernameRule::UpperCase)
    }

    /// Like [`check`](Self::check), but hands back the mapped localpart
    /// whatever the verdict, for the audit log: `None` only when case
    /// mapping itself refused the name (`case = "reject"`).
    pub fn judge(
        &self,
        requested: &str,
        guest_upgrade: bool,
    ) -> (Option<String>, Result<(), UsernameRule>) {
        let mapped = match self.case {
            CaseMode::Lowercase => map_case(requested),
            CaseMode::Reject => {
                if map_case(requested) != requested {
                    return (None, Err(UsernameRule::UpperCase));
                }
                requested.to_owned()
            }
        };
        let verdict = self.check_mapped(&mapped, guest_upgrade);
        (Some(mapped), verdict)
    }

    /// Checks an already-mapped localpart (no case mapping applied).
    pub fn check_mapped(&self, mapped: &str, guest_upgrade: bool) -> Result<(), UsernameRule> {
        if mapped.is_empty() {
            return Err(UsernameRule::Empty);
        }
        if !mapped.chars().all(is_grammar_char) {
            return Err(UsernameRule::Grammar);
        }
        if mapped.starts_with('_') && !self.allow_leading_underscore {
            return Err(UsernameRule::LeadingUnderscore);
        }
        if mapped.bytes().all(|b| b.is_ascii_digit()) && !self.allow_numeric && !guest_upgrade {
            return Err(UsernameRule::Numeric);
        }
        // "@" + localpart + ":" + server_name
        if 1 + mapped.len() + 1 + self.server_name.len() > MAX_USER_ID_BYTES {
            return Err(UsernameRule::TooLong);
        }
        if self.reserved.contains(mapped) {
            return Err(UsernameRule::Reserved);
        }
        if !self.reserved_skeletons.is_empty()
            && self.reserved_skeletons.contains(&skeleton(mapped))
        {
            return Err(UsernameRule::Lookalike);
        }
        if self.deny_patterns.iter().any(|p| p.is_match(mapped)) {
            return Err(UsernameRule::DenyPattern);
        }
        Ok(())
    }
}

/// The look-alike skeleton of a grammar-valid name: separators dropped,
/// digits read as the letters they imitate, `l` read as `i`, and the letter
/// pairs that render like one letter (`rn`, `vv`) merged. Two names with the
/// same skeleton are look-alikes (`adm1n`, `adrnin`, `a.d.m.i.n`, `support_`).
pub fn skeleton(name: &str) -> String {
    let mut letters = String::with_capacity(name.len());
    for c in name.chars() {
        let mapped = match c {
            '.' | '_' | '=' | '-' | '/' | '+' => continue,
            '0' => 'o',
            '1' | 'l' => 'i',
            '2' => 'z',
            '3' => 'e',
            '4' => 'a',
            '5' => 's',
            '6' | '9' => 'g',
            '7' => 't',
            '8' => 'b',
            c => c,
        };
        letters.push(mapped);
    }
    letters.replace("rn", "m").replace("vv", "w")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DenyPattern};

    fn policy_with(f: impl FnOnce(&mut UsernameConfig), server_name: &str) -> UsernamePolicy {
        let mut config = Config::default().username;
        f(&mut config);
        UsernamePolicy::new(&config, server_name)
    }

    fn default_policy() -> UsernamePolicy {
        policy_with(|_| {}, "example.org")
    }

    #[test]
    fn grammar_table() {
        let p = default_policy();
        let cases: &[(&str, Result<&str, UsernameRule>)] = &[
            ("alice", Ok("alice")),
            ("a", Ok("a")),
            ("a.b_c=d-e/f+g", Ok("a.b_c=d-e/f+g")),
            ("Alice", Ok("alice")),
            ("", Err(UsernameRule::Empty)),
            ("al ice", Err(UsernameRule::Grammar)),
            ("al:ice", Err(UsernameRule::Grammar)),
            ("al@ice", Err(UsernameRule::Grammar)),
            ("alice!", Err(UsernameRule::Grammar)),
            ("ali\u{0}ce", Err(UsernameRule::Grammar)),
            ("élise", Err(UsernameRule::Grammar)),
            ("_bridge", Err(UsernameRule::LeadingUnderscore)),
            ("a_b", Ok("a_b")),
            ("12345", Err(UsernameRule::Numeric)),
            ("12345a", Ok("12345a")),
            ("0", Err(UsernameRule::Numeric)),
        ];
        for (input, expected) in cases {
            let got = p.check(input, false);
            assert_eq!(got.as_deref().map_err(|e| *e), *expected, "{input:?}");
        }
    }

    #[test]
    fn unicode_is_mapped_like_synapse_before_the_grammar() {
        let p = default_policy();
        // KELVIN SIGN lower-cases to ASCII k.
        assert_eq!(p.check("\u{212A}elvin", false).as_deref(), Ok("kelvin"));
        assert_eq!(p.check("K\u{212A}elvin", false).as_deref(), Ok("kkelvin"));
        // Dotted capital I lower-cases to i + COMBINING DOT ABOVE: not ASCII.
        assert_eq!(p.check("\u{130}van", false), Err(UsernameRule::Grammar));
        // Fullwidth letters stay fullwidth.
        assert_eq!(p.check("\u{FF41}lice", false), Err(UsernameRule::Grammar));
        assert_eq!(p.check("\u{FF21}lice", false), Err(UsernameRule::Grammar));
        // Combining marks are outside the grammar.
        assert_eq!(p.check("a\u{301}lice", false), Err(UsernameRule::Grammar));
        // Long s has no lower-case mapping to s.
        assert_eq!(p.check("\u{17F}am", false), Err(UsernameRule::Grammar));
        // A Kelvin-sign spelling of a reserved name is still reserved.
        let reserved = policy_with(|c| c.reserved = vec!["kevin".into()], "example.org");
        assert_eq!(
            reserved.check("\u{212A}evin", false),
            Err(UsernameRule::Reserved)
        );
    }

    #[test]
    fn case_reject_refuses_upper_case() {
        let p = policy_with(|c| c.case = CaseMode::Reject, "example.org");
        assert_eq!(p.check("Alice", false), Err(UsernameRule::UpperCase));
        assert_eq!(
            p.check("\u{212A}elvin", false),
            Err(UsernameRule::UpperCase)
        );
        assert_eq!(p.check("alice", false).as_deref(), Ok("alice"));
    }

    #[test]
    fn user_id_length_counts_the_server_name() {
        let server = "s".repeat(200);
        let p = policy_with(|_| {}, &server);
        // 1 + 53 + 1 + 200 = 255
        assert_eq!(p.check(&"a".repeat(53), false).map(|_| ()), Ok(()));
        assert_eq!(p.check(&"a".repeat(54), false), Err(UsernameRule::TooLong));
        let short = default_policy();
        // 1 + 241 + 1 + 11 = 254 / 255 / 256
        assert!(short.check(&"a".repeat(242), false).is_ok());
        assert_eq!(
            short.check(&"a".repeat(243), false),
            Err(UsernameRule::TooLong)
        );
    }

    #[test]
    fn reserved_names_and_lookalikes_are_taken() {
        let p = default_policy();
        for name in ["admin", "ADMIN", "root", "support", "postmaster"] {
            assert_eq!(p.check(name, false), Err(UsernameRule::Reserved), "{name}");
        }
        for name in [
            "adm1n",
            "adrnin",
            "a.d.m.i.n",
            "support_",
            "r00t",
            "p0stmaster",
            "m0derator",
            "4dmin",
            "adm-in",
        ] {
            assert_eq!(p.check(name, false), Err(UsernameRule::Lookalike), "{name}");
        }
        for name in ["administrators", "admins", "alice", "rooty", "supporter"] {
            assert!(p.check(name, false).is_ok(), "{name}");
        }
        let no_lookalikes = policy_with(|c| c.reserved_lookalikes = false, "example.org");
        assert!(no_lookalikes.check("adm1n", false).is_ok());
        assert_eq!(
            no_lookalikes.check("admin", false),
            Err(UsernameRule::Reserved)
        );
    }

    #[test]
    fn deny_patterns_match_the_mapped_name() {
        let p = policy_with(
            |c| {
                c.deny_patterns = vec![
                    DenyPattern(Regex::new("^spam").unwrap()),
                    DenyPattern(Regex::new("viagra").unwrap()),
                ]
            },
            "example.org",
        );
        assert_eq!(p.check("SPAMBOT", false), Err(UsernameRule::DenyPattern));
        assert_eq!(
            p.check("buy-viagra-now", false),
            Err(UsernameRule::DenyPattern)
        );
        assert!(p.check("antispam", false).is_ok());
    }

    #[test]
    fn options_relax_underscore_and_numeric() {
        let p = policy_with(
            |c| {
                c.allow_leading_underscore = true;
                c.allow_numeric = true;
            },
            "example.org",
        );
        assert!(p.check("_bridge", false).is_ok());
        assert!(p.check("1234", false).is_ok());
        let strict = default_policy();
        assert!(strict.check("1234", true).is_ok(), "guest upgrade");
    }

    #[test]
    fn errors_carry_the_spec_codes() {
        assert_eq!(UsernameRule::Reserved.error().errcode, "M_USER_IN_USE");
        assert_eq!(UsernameRule::Lookalike.error().errcode, "M_USER_IN_USE");
        assert_eq!(UsernameRule::Grammar.error().errcode, "M_INVALID_USERNAME");
        assert_eq!(
            UsernameRule::DenyPattern.error().errcode,
            "M_INVALID_USERNAME"
        );
        assert_eq!(UsernameRule::NotAString.error().status.as_u16(), 400);
    }

    proptest::proptest! {
        #[test]
        fn accepted_names_always_satisfy_the_spec_grammar(name in "\\PC{0,40}|[A-Za-z0-9._=/+\\-\u{212A}\u{130}]{0,300}") {
            let p = default_policy();
            if let Ok(mapped) = p.check(&name, false) {
                proptest::prop_assert!(!mapped.is_empty());
                proptest::prop_assert!(mapped.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+')));
                proptest::prop_assert!(!mapped.starts_with('_'));
                proptest::prop_assert!(!mapped.bytes().all(|b| b.is_ascii_digit()));
                let user_id = format!("@{}:example.org", mapped);
                proptest::prop_assert!(user_id.len() <= MAX_USER_ID_BYTES);
                proptest::prop_assert_eq!(mapped.clone(), name.to_lowercase());
            }
        }
    }
}
