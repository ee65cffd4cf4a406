//! Domain lists (`[email] denied_domain_lists`): one hash map from a listed
//! domain to its file; a lookup tries the domain and each parent at a label
//! boundary.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::{entries, shown, ListContext, ListError, Sources};

/// Longest domain name (RFC 1035, without the trailing dot).
const MAX_DOMAIN_LEN: usize = 253;

/// A listed domain as stored: lower case, no trailing dot. `None` when the
/// entry is not a domain name.
fn normalized_domain(entry: &str) -> Option<String> {
    let domain = entry.strip_suffix('.').unwrap_or(entry);
    let well_formed = !domain.is_empty()
        && domain.len() <= MAX_DOMAIN_LEN
        && domain.split('.').all(|label| !label.is_empty())
        && !domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '@' | '/' | '*' | '\\'));
    well_formed.then(|| domain.to_ascii_lowercase())
}

/// Adds the domains of one list (`index` in the configuration, `name`
/// naming it in errors) to `domains`.
fn add_domains(
    name: &str,
    bytes: &[u8],
    index: u32,
    domains: &mut HashMap<Box<str>, u32>,
) -> Result<(), ListError> {
    for (line, entry) in entries(bytes) {
        let Some(domain) = normalized_domain(&entry) else {
            return Err(ListError::NotADomain {
                path: name.to_owned(),
                line,
                text: shown(&entry),
            });
        };
        domains.entry(domain.into_boxed_str()).or_insert(index);
    }
    Ok(())
}

/// Checks that every line of a domain list is a domain or a comment.
pub(super) fn check(name: &str, bytes: &[u8]) -> Result<(), ListError> {
    for (line, entry) in entries(bytes) {
        if normalized_domain(&entry).is_none() {
            return Err(ListError::NotADomain {
                path: name.to_owned(),
                line,
                text: shown(&entry),
            });
        }
    }
    Ok(())
}

/// The domain lists of `[email] denied_domain_lists`, loaded; cheap to
/// clone (shared).
///
/// Read from the configuration, the entries alone are known; the lists are
/// read by [`DomainLists::load_with`], which the configuration loader
/// calls once the whole configuration (and so `[server] state_dir`) is
/// read.
#[derive(Clone, Default)]
pub struct DomainLists {
    sources: Sources,
    /// Every listed domain and the index of the first list holding it.
    domains: Arc<HashMap<Box<str>, u32>>,
}

impl DomainLists {
    /// Reads and parses every file, in order.
    pub fn load(paths: &[String]) -> Result<DomainLists, ListError> {
        let mut lists = DomainLists {
            sources: Sources::files(paths),
            ..DomainLists::default()
        };
        lists.load_with(&ListContext::default())?;
        Ok(lists)
    }

    /// Reads and parses every configured entry, in order: a file, or a
    /// URL's copy under `context.state_dir`.
    pub fn load_with(&mut self, context: &ListContext) -> Result<(), ListError> {
        let mut domains: HashMap<Box<str>, u32> = HashMap::new();
        self.sources.load(context, |index, label, bytes| {
            add_domains(label, bytes, index, &mut domains)
        })?;
        domains.shrink_to_fit();
        self.domains = Arc::new(domains);
        Ok(())
    }

    /// The list that denies `domain` — listed itself, or a parent domain
    /// at a label boundary (`mailinator.com` denies `x.mailinator.com`,
    /// not `notmailinator.com`). Case and one trailing dot do not matter.
    /// Does not allocate.
    pub fn find(&self, domain: &str) -> Option<&Arc<str>> {
        if self.domains.is_empty() {
            return None;
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
            return None;
        }
        let mut buffer = [0u8; MAX_DOMAIN_LEN];
        let lowered = &mut buffer[..domain.len()];
        lowered.copy_from_slice(domain.as_bytes());
        lowered.make_ascii_lowercase();
        // ASCII lower-casing keeps UTF-8 valid.
        let lowered = std::str::from_utf8(lowered).ok()?;
        let mut candidate = lowered;
        loop {
            if let Some(&index) = self.domains.get(candidate) {
                return self.sources.name(index);
            }
            let (_, parent) = candidate.split_once('.')?;
            candidate = parent;
        }
    }

    /// Where the lists come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// How many distinct domains are listed.
    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// Whether no domain is listed.
    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// Bytes the lists keep on the heap (the table and the names;
    /// allocator overhead not counted).
    pub fn heap_bytes(&self) -> usize {
        // hashbrown keeps one control byte per bucket next to each slot.
        let slot = std::mem::size_of::<(Box<str>, u32)>() + 1;
        self.domains.capacity() * slot + self.domains.keys().map(|k| k.len()).sum::<usize>()
    }
}

impl fmt::Debug for DomainLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.sources.names().collect();
        f.debug_struct("DomainLists")
            .field("lists", &names)
            .field("domains", &self.domains.len())
            .finish()
    }
}

impl<'de> Deserialize<'de> for DomainLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sources = Sources::deserialize(d)?;
        Ok(DomainLists {
            sources,
            domains: Arc::default(),
        })
    }
}

impl Serialize for DomainLists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sources.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defences::lists::scratch_file;

    fn domains(text: &str) -> DomainLists {
        let path = scratch_file();
        std::fs::write(&path, text).unwrap();
        let lists = DomainLists::load(&[path.display().to_string()]);
        let _ = std::fs::remove_file(&path);
        lists.unwrap()
    }

    #[test]
    fn domains_match_themselves_and_subdomains_at_label_boundaries() {
        let d = domains("# disposable\nMailinator.com\nguerrillamail.info.  # trailing dot\n\n10minutemail.net\n");
        assert_eq!(d.len(), 3);
        for denied in [
            "mailinator.com",
            "MAILINATOR.COM",
            "x.mailinator.com",
            "a.b.Mailinator.com",
            "mailinator.com.",
            "guerrillamail.info",
            "x.guerrillamail.info.",
        ] {
            assert!(d.find(denied).is_some(), "{denied}");
        }
        for free in [
            "notmailinator.com",
            "mailinator.com.evil",
            "com",
            "mailinator",
            "",
            ".",
            "example.org",
        ] {
            assert!(d.find(free).is_none(), "{free}");
        }
        assert!(d.find(&"a.".repeat(200)).is_none());
        let path = d.find("x.mailinator.com").unwrap();
        assert!(path.ends_with(".txt"), "{path}");
    }

    #[test]
    fn a_broken_domain_line_names_file_and_line() {
        for (text, line, shown) in [
            ("ok.example\nuser@example.org\n", 2, "user@example.org"),
            ("a..b\n", 1, "a..b"),
            ("*.example.org\n", 1, "*.example.org"),
            ("two words\n", 1, "two words"),
            (".example\n", 1, ".example"),
        ] {
            let path = scratch_file();
            std::fs::write(&path, text).unwrap();
            let shown_path = path.display().to_string();
            let error = DomainLists::load(std::slice::from_ref(&shown_path))
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!("{shown_path}:{line}: not a domain: {shown:?}"),
                "{text:?}"
            );
            let _ = std::fs::remove_file(&path);
        }
        let absent = scratch_file().display().to_string();
        let missing = DomainLists::load(std::slice::from_ref(&absent))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with(&format!("cannot read {absent}: ")),
            "{missing}"
        );
    }
}
