//! `[email]`: rules for third-party identifiers (`requestToken`).

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::values::parse_str;
use crate::defences::lists::DomainLists;

/// `[email]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// If not empty, `email/requestToken` only for these domains (globs such
    /// as `"example.org"`, `"*.example.org"`).
    pub allowed_domains: Vec<DomainGlob>,
    /// `email/requestToken` refused for these domains (globs).
    pub denied_domains: Vec<DomainGlob>,
    /// Files of domains refused for `email/requestToken`, with their
    /// subdomains; read when the configuration is loaded.
    pub denied_domain_lists: DomainLists,
}

/// A domain glob: `*` matches any run of characters; case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainGlob(pub String);

impl DomainGlob {
    /// Whether `domain` matches this glob.
    pub fn matches(&self, domain: &str) -> bool {
        glob_match(self.0.as_bytes(), domain.to_ascii_lowercase().as_bytes())
    }
}

fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl std::str::FromStr for DomainGlob {
    type Err = ();

    fn from_str(text: &str) -> Result<Self, ()> {
        let ok = !text.is_empty()
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_'));
        ok.then(|| DomainGlob(text.to_ascii_lowercase())).ok_or(())
    }
}

impl<'de> Deserialize<'de> for DomainGlob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a domain or glob such as \"*.example.org\"")
    }
}

impl Serialize for DomainGlob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;
    use crate::config::Config;

    #[test]
    fn domains_are_globs() {
        let c =
            Config::from_toml("[email]\nallowed_domains = [\"*.Example.org\", \"example.org\"]\n")
                .unwrap();
        assert!(c.email.allowed_domains[0].matches("mail.EXAMPLE.org"));
        assert!(!c.email.allowed_domains[0].matches("example.org"));
        assert!(c.email.allowed_domains[1].matches("example.org"));
        assert!(
            err("[email]\ndenied_domains = [\"a b\"]\n").starts_with("email.denied_domains[0]:")
        );
    }

    #[test]
    fn globs_match_like_shells() {
        let g = |p: &str, t: &str| DomainGlob(p.to_owned()).matches(t);
        assert!(g("*", "anything.example"));
        assert!(g("*.mail.*", "x.mail.example"));
        assert!(!g("*.mail.*", "mail.example"));
        assert!(g("a*b*c", "aXXbYYc"));
        assert!(!g("a*b*c", "aXXbYY"));
        assert!(!g("example.org", "example.org.evil"));
    }
}
