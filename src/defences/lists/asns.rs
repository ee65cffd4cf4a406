//! Lists of autonomous systems (`[reputation] deny_asn_lists`): published
//! lists of hosting and datacenter networks, one AS per line. Loaded into
//! one sorted array of `(AS number, list)` searched by bisection.
//!
//! A line is an AS number, `64496` or `AS64496` (any case), optionally
//! followed by white space or a comma and anything else (the network's
//! name, as such lists write it: `AS64496 Example Hosting`,
//! `64496,"Example Hosting"`); `#` starts a comment, as in every list.

use std::fmt;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize, Serializer};

use super::{entries, shown, ListContext, ListError, Sources};

/// The AS number a line names, `None` when it names none.
fn line_asn(entry: &str) -> Option<u32> {
    let first = entry
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap_or_default();
    let first = first.trim_matches('"');
    let prefixed = first.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("as"));
    let number = if prefixed { &first[2..] } else { first };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

/// Adds the AS numbers of one list (`index` in the configuration, `name`
/// naming it in errors) to `asns`.
fn add_asns(
    name: &str,
    bytes: &[u8],
    index: u32,
    asns: &mut Vec<(u32, u32)>,
) -> Result<(), ListError> {
    for (line, entry) in entries(bytes) {
        let Some(asn) = line_asn(&entry) else {
            return Err(ListError::NotAnAsn {
                path: name.to_owned(),
                line,
                text: shown(&entry),
            });
        };
        asns.push((asn, index));
    }
    Ok(())
}

/// Checks that every line of an AS list names an AS or is a comment.
pub(super) fn check(name: &str, bytes: &[u8]) -> Result<(), ListError> {
    add_asns(name, bytes, 0, &mut Vec::new())
}

/// The lists of `[reputation] deny_asn_lists`, loaded; cheap to clone
/// (shared). Read from the configuration, the entries alone are known; the
/// lists are read by [`AsnLists::load_with`].
#[derive(Clone, Default)]
pub struct AsnLists {
    sources: Sources,
    /// Every listed AS and the index of the first list holding it, sorted
    /// by AS, one pair per AS.
    asns: Arc<[(u32, u32)]>,
}

impl AsnLists {
    /// Reads and parses every file, in order.
    pub fn load(paths: &[String]) -> Result<AsnLists, ListError> {
        let mut lists = AsnLists {
            sources: Sources::files(paths),
            ..AsnLists::default()
        };
        lists.load_with(&ListContext::default())?;
        Ok(lists)
    }

    /// Reads and parses every configured entry, in order: a file, or a
    /// URL's copy under `context.state_dir`.
    pub fn load_with(&mut self, context: &ListContext) -> Result<(), ListError> {
        let mut asns = Vec::new();
        self.sources.load(context, |index, label, bytes| {
            add_asns(label, bytes, index, &mut asns)
        })?;
        // Sorted by AS, then by list: the first list naming an AS is kept.
        asns.sort_unstable();
        asns.dedup_by_key(|(asn, _)| *asn);
        self.asns = asns.into();
        Ok(())
    }

    /// The list that names `asn`, if one does.
    pub fn find(&self, asn: u32) -> Option<&Arc<str>> {
        let at = self.asns.binary_search_by_key(&asn, |&(a, _)| a).ok()?;
        self.sources.name(self.asns[at].1)
    }

    /// Where the lists come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// How many distinct AS numbers are listed.
    pub fn len(&self) -> usize {
        self.asns.len()
    }

    /// Whether no AS is listed.
    pub fn is_empty(&self) -> bool {
        self.asns.is_empty()
    }
}

impl fmt::Debug for AsnLists {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<_> = self.sources.names().collect();
        f.debug_struct("AsnLists")
            .field("lists", &names)
            .field("asns", &self.asns.len())
            .finish()
    }
}

impl<'de> Deserialize<'de> for AsnLists {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let sources = Sources::deserialize(d)?;
        Ok(AsnLists {
            sources,
            asns: Arc::new([]),
        })
    }
}

impl Serialize for AsnLists {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.sources.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defences::lists::scratch_file;

    fn load(texts: &[&str]) -> (AsnLists, Vec<String>) {
        let paths: Vec<String> = texts
            .iter()
            .map(|text| {
                let path = scratch_file();
                std::fs::write(&path, text).unwrap();
                path.display().to_string()
            })
            .collect();
        let lists = AsnLists::load(&paths).unwrap();
        for path in &paths {
            let _ = std::fs::remove_file(path);
        }
        (lists, paths)
    }

    #[test]
    fn every_spelling_of_a_line_names_its_as() {
        let (lists, paths) = load(&[
            "# hosting networks\nAS64496\nas64497 Example Hosting\n64498,\"Example, Inc\"\n\
             \"64499\",\"quoted\"\nAs64500\t# tab, then a comment\n\n4294967295\n",
            "AS64496\nAS64501\n",
        ]);
        assert_eq!(lists.len(), 7);
        for asn in [64496, 64497, 64498, 64499, 64500, 4_294_967_295] {
            assert_eq!(lists.find(asn).map(|l| &**l), Some(&*paths[0]), "AS{asn}");
        }
        // An AS in two lists is named by the first.
        assert_eq!(lists.find(64501).map(|l| &**l), Some(&*paths[1]));
        for free in [0, 6449, 644_960, 64502, 1] {
            assert!(lists.find(free).is_none(), "AS{free}");
        }
        assert!(AsnLists::default().find(64496).is_none());
    }

    #[test]
    fn a_line_that_names_no_as_names_file_and_line() {
        for (text, line, shown) in [
            ("AS64496\nASN,Entity\n", 2, "ASN,Entity"),
            ("AS\n", 1, "AS"),
            ("AS-1\n", 1, "AS-1"),
            ("ASAS64496\n", 1, "ASAS64496"),
            ("+64496\n", 1, "+64496"),
            ("4294967296\n", 1, "4294967296"),
            ("64496.5\n", 1, "64496.5"),
            ("192.0.2.0/24\n", 1, "192.0.2.0/24"),
            ("ＡＳ64496\n", 1, "ＡＳ64496"),
            // A terminal escape is shown escaped, never replayed.
            ("AS64496\u{1b}[2J\n", 1, "AS64496\u{1b}[2J"),
        ] {
            let path = scratch_file();
            std::fs::write(&path, text).unwrap();
            let shown_path = path.display().to_string();
            let error = AsnLists::load(std::slice::from_ref(&shown_path))
                .unwrap_err()
                .to_string();
            assert_eq!(
                error,
                format!("{shown_path}:{line}: not an AS number: {shown:?}"),
                "{text:?}"
            );
            let _ = std::fs::remove_file(&path);
        }
    }
}
