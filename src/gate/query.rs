//! Query strings read the way the homeserver reads them.
//!
//! Synapse (Twisted) splits on `&` and on `;`, turns `+` into a space,
//! percent-decodes names and values, and keeps blank values. The gate reads a
//! query the same way, decides on what it read, and forwards a query it wrote
//! itself, so the two can never disagree.

use std::borrow::Cow;

use super::routes::percent_decode;

/// A parsed query string.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses a raw query (the part after `?`, without it).
    pub fn parse(raw: Option<&str>) -> Query {
        let Some(raw) = raw else {
            return Query::default();
        };
        let pairs = raw
            .split(['&', ';'])
            .filter(|part| !part.is_empty())
            .map(|part| {
                let (name, value) = part.split_once('=').unwrap_or((part, ""));
                (decode_component(name), decode_component(value))
            })
            .collect();
        Query { pairs }
    }

    /// Every value given for `name`, in order.
    pub fn values<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.pairs
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The single value of `name`: `Ok(None)` when absent, `Err(n)` when it
    /// is given `n > 1` times.
    pub fn single<'a>(&'a self, name: &str) -> Result<Option<&'a str>, usize> {
        let mut values = self.values(name);
        let first = values.next();
        let more = values.count();
        if more > 0 {
            Err(more + 1)
        } else {
            Ok(first)
        }
    }
}

fn decode_component(raw: &str) -> String {
    let spaced: Cow<'_, str> = if raw.contains('+') {
        raw.replace('+', " ").into()
    } else {
        raw.into()
    };
    String::from_utf8_lossy(&percent_decode(spaced.as_bytes())).into_owned()
}

/// Percent-encodes a query component: everything but unreserved characters.
pub fn encode_component(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_ampersand_and_semicolon_and_decodes() {
        let q = Query::parse(Some("x=1;kind=%67uest&kind=user&%6bind=a+b&flag"));
        let kinds: Vec<&str> = q.values("kind").collect();
        assert_eq!(kinds, vec!["guest", "user", "a b"]);
        assert_eq!(q.single("flag"), Ok(Some("")));
        assert_eq!(q.single("kind"), Err(3));
        assert_eq!(q.single("missing"), Ok(None));
    }

    #[test]
    fn absent_and_empty_queries_have_no_pairs() {
        assert_eq!(Query::parse(None), Query::default());
        assert_eq!(Query::parse(Some("")), Query::default());
        assert_eq!(Query::parse(Some("&&;")), Query::default());
    }

    #[test]
    fn encoding_round_trips() {
        for s in ["alice", "a b&c=d;e", "ü/+%", ""] {
            let encoded = encode_component(s);
            let q = Query::parse(Some(&format!("v={encoded}")));
            assert_eq!(q.single("v"), Ok(Some(s)));
        }
    }
}
