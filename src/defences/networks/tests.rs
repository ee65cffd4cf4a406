use std::net::IpAddr;

use super::mmdb::{asn_record, country_record, map, text, Value, Writer};
use super::*;

pub(crate) fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A scratch file holding `bytes`; its path as configured.
pub(crate) fn scratch(name: &str, bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("mgk-networks-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{n}-{name}"));
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

pub(crate) fn asn_db() -> Writer {
    let mut w = Writer::new("GeoLite2-ASN");
    w.insert("198.51.100.0/24", asn_record(64496, "Example Hosting"))
        .insert("203.0.113.0/24", asn_record(64497, "Example Residential"))
        // A narrower network inside the first, of another AS.
        .insert("198.51.100.128/25", asn_record(64498, "Example Cloud"))
        .insert("2001:db8::/32", asn_record(64496, "Example Hosting"));
    w
}

pub(crate) fn country_db() -> Writer {
    let mut w = Writer::new("GeoLite2-Country");
    w.insert("198.51.100.0/24", country_record("NL"))
        .insert("203.0.113.0/24", country_record("de"))
        .insert("2001:db8::/32", country_record("NL"));
    w
}

#[test]
fn asn_and_country_are_found_for_ipv4_ipv6_and_mapped_addresses() {
    let asn = NetworkDatabase::load(&scratch("asn.mmdb", &asn_db().to_bytes())).unwrap();
    let country = NetworkDatabase::load(&scratch("c.mmdb", &country_db().to_bytes())).unwrap();
    assert_eq!(asn.database_type(), Some("GeoLite2-ASN"));
    let hosting = asn.record(ip("198.51.100.7")).unwrap();
    assert_eq!(hosting.asn, Some(64496));
    assert_eq!(hosting.as_name.as_deref(), Some("Example Hosting"));
    assert_eq!(asn.record(ip("198.51.100.200")).unwrap().asn, Some(64498));
    assert_eq!(
        asn.record(ip("::ffff:198.51.100.7")).unwrap().asn,
        Some(64496)
    );
    assert_eq!(asn.record(ip("2001:db8:1::5")).unwrap().asn, Some(64496));
    assert!(asn.record(ip("192.0.2.1")).is_none());
    assert!(asn.record(ip("2001:db9::1")).is_none());
    let de = country.record(ip("203.0.113.9")).unwrap();
    assert_eq!(de.country.map(|c| c.to_string()), Some("DE".to_owned()));
    assert_eq!(de.asn, None);
}

#[test]
fn the_records_of_each_publisher_are_read() {
    let mut w = Writer::new("ipinfo lite");
    // IPinfo: the ASN as text, a name, the country as a code.
    w.insert(
        "192.0.2.0/24",
        map([
            ("asn", text("AS64500")),
            ("as_name", text("Example\u{7} Net")),
            ("country_code", text("fr")),
        ]),
    )
    // A record with a registered country only, and odd shapes elsewhere.
    .insert(
        "198.51.100.0/24",
        map([
            ("autonomous_system_number", text("not a number")),
            ("name", Value::U32(5)),
            ("registered_country", map([("iso_code", text("BE"))])),
        ]),
    )
    .insert("203.0.113.0/24", Value::Array(vec![text("not a map")]));
    let db = NetworkDatabase::load(&scratch("ipinfo.mmdb", &w.to_bytes())).unwrap();
    let seen = db.record(ip("192.0.2.1")).unwrap();
    assert_eq!(seen.asn, Some(64500));
    assert_eq!(seen.as_name.as_deref(), Some("Example Net"));
    assert_eq!(seen.country.map(|c| c.to_string()), Some("FR".to_owned()));
    let odd = db.record(ip("198.51.100.1")).unwrap();
    assert_eq!((odd.asn, odd.as_name.as_deref()), (None, None));
    assert_eq!(odd.country.map(|c| c.to_string()), Some("BE".to_owned()));
    assert!(db.record(ip("203.0.113.1")).is_none());
}

#[test]
fn a_corrupt_or_cut_database_is_refused_by_name() {
    let good = asn_db().to_bytes();
    for (name, bytes) in [
        ("cut.mmdb", good[..good.len() / 2].to_vec()),
        ("empty.mmdb", Vec::new()),
        ("text.mmdb", b"198.51.100.0/24\n".to_vec()),
        ("tree.mmdb", {
            // A record pointing far past the data section.
            let mut bad = good.clone();
            bad[4..8].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
            bad
        }),
    ] {
        let path = scratch(name, &bytes);
        let error = NetworkDatabase::load(&path).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{path}: not a usable MaxMind DB database: ")),
            "{name}: {error}"
        );
    }
    let missing = scratch("gone.mmdb", b"");
    std::fs::remove_file(&missing).unwrap();
    let error = NetworkDatabase::load(&missing).unwrap_err().to_string();
    assert!(
        error.starts_with(&format!("cannot read {missing}: ")),
        "{error}"
    );
}
