//! A MaxMind DB writer for tests and benchmarks: the ASN and country
//! databases the gate reads, made from a few networks, so that no test needs
//! a downloaded database.
//!
//! It writes what the format's specification describes
//! (<https://maxmind.github.io/MaxMind-DB/>): a binary search tree over 128
//! address bits with 32-bit records, IPv4 networks under `::/96` and
//! `::ffff:0:0/96` aliased to them (as published databases do), sixteen zero
//! bytes, the data section, and the metadata after its marker. Networks are
//! inserted broadest first; a narrower one splits the broader one's record.
//!
//! Included by unit tests (`#[path]`), integration tests and benchmarks;
//! not every user calls every function.
#![allow(dead_code)]

use std::net::IpAddr;

/// A value of the data section.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// A UTF-8 string.
    Str(String),
    /// An unsigned 16-bit integer.
    U16(u16),
    /// An unsigned 32-bit integer.
    U32(u32),
    /// An unsigned 64-bit integer.
    U64(u64),
    /// A map with string keys.
    Map(Vec<(String, Value)>),
    /// An array.
    Array(Vec<Value>),
}

/// A map value from `(key, value)` pairs.
pub fn map(pairs: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
    Value::Map(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

/// A string value.
pub fn text(s: &str) -> Value {
    Value::Str(s.to_owned())
}

/// A GeoLite2-ASN record.
pub fn asn_record(number: u32, name: &str) -> Value {
    map([
        ("autonomous_system_number", Value::U32(number)),
        ("autonomous_system_organization", text(name)),
    ])
}

/// A GeoLite2-Country record.
pub fn country_record(iso_code: &str) -> Value {
    map([(
        "country",
        map([
            ("iso_code", text(iso_code)),
            ("names", map([("en", text(iso_code))])),
        ]),
    )])
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Record {
    Empty,
    Node(usize),
    Data(usize),
}

/// A database being written.
#[derive(Debug, Clone)]
pub struct Writer {
    database_type: String,
    networks: Vec<(u128, u8, Value)>,
}

impl Writer {
    /// An empty database whose metadata says `database_type`
    /// (`"GeoLite2-ASN"`, `"GeoLite2-Country"`).
    pub fn new(database_type: &str) -> Self {
        Writer {
            database_type: database_type.to_owned(),
            networks: Vec::new(),
        }
    }

    /// Adds `network` (`"198.51.100.0/24"`, `"2001:db8::/32"`, an address
    /// alone) with `value`.
    pub fn insert(&mut self, network: &str, value: Value) -> &mut Self {
        let (address, len) = match network.split_once('/') {
            Some((address, len)) => (address, Some(len.parse::<u8>().expect("a prefix length"))),
            None => (network, None),
        };
        let (bits, len) = match address.parse::<IpAddr>().expect("an address") {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 96 + len.unwrap_or(32)),
            IpAddr::V6(v6) => (u128::from(v6), len.unwrap_or(128)),
        };
        assert!((1..=128).contains(&len), "{network}: prefix out of range");
        self.networks.push((bits, len, value));
        self
    }

    /// The database file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut networks: Vec<&(u128, u8, Value)> = self.networks.iter().collect();
        networks.sort_by_key(|(_, len, _)| *len);
        let mut values: Vec<&Value> = Vec::new();
        let mut indices: std::collections::HashMap<&Value, usize> = Default::default();
        let mut nodes: Vec<[Record; 2]> = vec![[Record::Empty; 2]];
        // The IPv4 subtree exists even with no IPv4 network, so that the
        // alias below has a node to point at.
        let ipv4_root = walk(&mut nodes, 0, 96);
        for (bits, len, value) in networks {
            let index = *indices.entry(value).or_insert_with(|| {
                values.push(value);
                values.len() - 1
            });
            let parent = walk(&mut nodes, *bits, len - 1);
            nodes[parent][bit(*bits, len - 1)] = Record::Data(index);
        }
        // `::ffff:0:0/96` is the IPv4 subtree too.
        let mapped = 0xffff_u128 << 32;
        let parent = walk(&mut nodes, mapped, 95);
        nodes[parent][1] = Record::Node(ipv4_root);

        let mut data = Vec::new();
        let offsets: Vec<usize> = values
            .iter()
            .map(|value| {
                let offset = data.len();
                encode(&mut data, value);
                offset
            })
            .collect();
        let node_count = nodes.len();
        let mut out = Vec::with_capacity(node_count * 8 + 16 + data.len() + 300);
        for node in &nodes {
            for record in node {
                let value = match *record {
                    Record::Empty => node_count,
                    Record::Node(n) => n,
                    Record::Data(d) => node_count + 16 + offsets[d],
                };
                out.extend(u32::try_from(value).expect("a small tree").to_be_bytes());
            }
        }
        out.extend([0u8; 16]);
        out.extend(&data);
        out.extend(b"\xAB\xCD\xEFMaxMind.com");
        encode(
            &mut out,
            &map([
                ("binary_format_major_version", Value::U16(2)),
                ("binary_format_minor_version", Value::U16(0)),
                ("build_epoch", Value::U64(1_790_000_000)),
                ("database_type", text(&self.database_type)),
                ("description", map([("en", text("test database"))])),
                ("ip_version", Value::U16(6)),
                ("languages", Value::Array(vec![text("en")])),
                (
                    "node_count",
                    Value::U32(u32::try_from(node_count).expect("a small tree")),
                ),
                ("record_size", Value::U16(32)),
            ]),
        );
        out
    }

    /// Writes the database to `path` through a temporary name renamed into
    /// place, as an operator's download job would.
    pub fn write(&self, path: &std::path::Path) {
        let temporary = path.with_extension("tmp-write");
        std::fs::write(&temporary, self.to_bytes()).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    }
}

/// Bit `depth` (0 = most significant) of `bits`.
fn bit(bits: u128, depth: u8) -> usize {
    ((bits >> (127 - depth)) & 1) as usize
}

/// Follows (creating) the path of `bits`' first `depth` bits; the node there.
/// A data record on the way is pushed down into both halves of a new node.
fn walk(nodes: &mut Vec<[Record; 2]>, bits: u128, depth: u8) -> usize {
    let mut current = 0;
    for d in 0..depth {
        let side = bit(bits, d);
        current = match nodes[current][side] {
            Record::Node(next) => next,
            other => {
                let fill = match other {
                    Record::Data(_) => other,
                    _ => Record::Empty,
                };
                nodes.push([fill, fill]);
                let next = nodes.len() - 1;
                nodes[current][side] = Record::Node(next);
                next
            }
        };
    }
    current
}

/// A control byte (and extended type byte, and size bytes).
fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
    let (type_bits, extended) = if kind <= 7 {
        (kind << 5, None)
    } else {
        (0, Some(kind - 7))
    };
    let (size_bits, size_bytes): (u8, Vec<u8>) = if size < 29 {
        (size as u8, vec![])
    } else if size < 29 + 256 {
        (29, vec![(size - 29) as u8])
    } else if size < 285 + 65_536 {
        (30, ((size - 285) as u16).to_be_bytes().to_vec())
    } else {
        (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec())
    };
    out.push(type_bits | size_bits);
    out.extend(extended);
    out.extend(size_bytes);
}

fn unsigned(out: &mut Vec<u8>, kind: u8, value: u64) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    control(out, kind, 8 - skip);
    out.extend(&bytes[skip..]);
}

fn encode(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Str(s) => {
            control(out, 2, s.len());
            out.extend(s.as_bytes());
        }
        Value::U16(n) => unsigned(out, 5, u64::from(*n)),
        Value::U32(n) => unsigned(out, 6, u64::from(*n)),
        Value::U64(n) => unsigned(out, 9, *n),
        Value::Map(pairs) => {
            control(out, 7, pairs.len());
            for (key, value) in pairs {
                encode(out, &Value::Str(key.clone()));
                encode(out, value);
            }
        }
        Value::Array(items) => {
            control(out, 11, items.len());
            for item in items {
                encode(out, item);
            }
        }
    }
}
