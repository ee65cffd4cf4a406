//! Query strings read the way the homeserver reads them.
//!
//! Synapse (Twisted) splits on `&` and on `;`, turns `+` into a space,
//! percent-decodes names and values, and keeps blank values. The gate reads a
//! query the same way, decides on what it read, and forwards a query it wrote
//! itself, so the two can never disagree.
//!
//! An HTML form body (`application/x-www-form-urlencoded`) is read by the
//! same parser, strictly ([`Query::parse_form`]).

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

    /// Parses an `application/x-www-form-urlencoded` body as Twisted does
    /// (the separators and decoding of [`Query::parse`]; an item without
    /// `=` is dropped, as Twisted drops it), refusing what a reader could
    /// take two ways: a name or value that is not UTF-8 once decoded.
    pub fn parse_form(body: &[u8]) -> Result<Query, NotUtf8> {
        let mut pairs = Vec::new();
        for item in body.split(|&b| b == b'&' || b == b';') {
            let Some(equals) = item.iter().position(|&b| b == b'=') else {
                continue;
            };
            let (name, value) = (&item[..equals], &item[equals + 1..]);
            pairs.push((decode_strict(name)?, decode_strict(value)?));
        }
        Ok(Query { pairs })
    }

    /// Every (name, value) pair, in order.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
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

/// A form field whose name or value is not UTF-8 once decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a form field is not UTF-8")]
pub struct NotUtf8;

fn decode_strict(raw: &[u8]) -> Result<String, NotUtf8> {
    let spaced: Vec<u8> = raw
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    String::from_utf8(percent_decode(&spaced)).map_err(|_| NotUtf8)
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
    fn forms_are_read_like_twisted_and_refused_when_not_utf8() {
        let form =
            Query::parse_form(b"username=Al+ice;use_email=a%40b&flag&=x&use_email=").unwrap();
        let pairs: Vec<(&str, &str)> = form.pairs().collect();
        assert_eq!(
            pairs,
            vec![
                ("username", "Al ice"),
                ("use_email", "a@b"),
                ("", "x"),
                ("use_email", "")
            ]
        );
        assert_eq!(Query::parse_form(b"username=%FF"), Err(NotUtf8));
        assert_eq!(Query::parse_form(b"username=\xc3"), Err(NotUtf8));
        assert_eq!(Query::parse_form(b"%C3=x"), Err(NotUtf8));
        assert_eq!(Query::parse_form(b"").unwrap(), Query::default());
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
