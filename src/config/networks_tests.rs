//! The network settings of `[reputation]` and `[rate_limit]`, read into
//! the rules the gate applies, over databases the tests write.

use crate::config::Config;
use crate::defences::networks::tests::{asn_db, country_db, ip, scratch};
use crate::defences::networks::NetworkVerdict;

fn config(extra: &str) -> Result<Config, String> {
    let asn = scratch("cfg-asn.mmdb", &asn_db().to_bytes());
    let country = scratch("cfg-country.mmdb", &country_db().to_bytes());
    Config::from_toml(&format!(
        "[reputation]\nasn_database = {asn:?}\ncountry_database = {country:?}\n{extra}"
    ))
    .map_err(|e| e.to_string())
}

#[test]
fn rules_refuse_denied_networks_and_countries_and_trust_allowed_ones() {
    let config = config(
        "deny_asns = [64498, \"AS64499\"]\nallow_asns = [\"as64497\"]\n\
         deny_countries = [\"de\", \"NL\"]\n\
         [rate_limit]\nregistrations_per_asn = { count = 5, period = \"1h\" }\n",
    )
    .unwrap();
    let networks = config.networks();
    let verdict = |addr: &str| {
        let network = networks.lookup(ip(addr));
        let verdict = networks.verdict(&network);
        (verdict, networks.counted_asn(&network, verdict))
    };
    // Denied AS first; then a trusted AS escapes its country's rule and the
    // per-network limit; then the country.
    assert_eq!(
        verdict("198.51.100.200"),
        (NetworkVerdict::DeniedAsn, Some(64498))
    );
    assert_eq!(verdict("203.0.113.5"), (NetworkVerdict::Trusted, None));
    assert_eq!(
        verdict("198.51.100.5"),
        (NetworkVerdict::DeniedCountry, Some(64496))
    );
    assert_eq!(verdict("192.0.2.1"), (NetworkVerdict::Pass, None));
    assert_eq!(NetworkVerdict::DeniedAsn.rule(), Some("denied_asn"));
    assert_eq!(NetworkVerdict::DeniedCountry.rule(), Some("denied_country"));
    // What `check` prints loads again.
    let printed = config.to_toml();
    assert!(printed.contains("deny_asns = [64498, 64499]"), "{printed}");
    assert!(
        printed.contains("deny_countries = [\"DE\", \"NL\"]"),
        "{printed}"
    );
    Config::from_toml(&printed).unwrap();
}

#[test]
fn without_a_per_network_limit_no_asn_is_counted() {
    let config = config("").unwrap();
    let networks = config.networks();
    let network = networks.lookup(ip("198.51.100.5"));
    assert_eq!(network.asn, Some(64496));
    assert_eq!(
        networks.counted_asn(&network, networks.verdict(&network)),
        None
    );
}

#[test]
fn configuration_errors_name_the_key() {
    let err = |toml: &str| Config::from_toml(toml).unwrap_err().to_string();
    assert_eq!(
        err("[reputation]\ndeny_asns = [64496]\n"),
        "reputation.deny_asns: needs reputation.asn_database to know a client's network"
    );
    assert_eq!(
        err("[reputation]\ndeny_countries = [\"NL\"]\n"),
        "reputation.deny_countries: needs reputation.country_database to know a client's country"
    );
    assert_eq!(
        err("[rate_limit]\nattempts_per_asn = { count = 5, period = \"1h\" }\n"),
        "rate_limit.attempts_per_asn: needs reputation.asn_database to know a client's network"
    );
    assert_eq!(
        config("deny_asns = [64496]\nallow_asns = [\"AS64496\"]\n").unwrap_err(),
        "reputation.allow_asns: AS64496 is also in reputation.deny_asns"
    );
    assert!(config("deny_asns = [\"ASX\"]\n")
        .unwrap_err()
        .starts_with("reputation.deny_asns"));
    assert!(config("deny_asns = [-1]\n")
        .unwrap_err()
        .starts_with("reputation.deny_asns"));
    assert!(config("deny_asns = [4294967296]\n")
        .unwrap_err()
        .starts_with("reputation.deny_asns"));
    assert!(config("deny_countries = [\"NLD\"]\n")
        .unwrap_err()
        .starts_with("reputation.deny_countries"));
    let corrupt = scratch("cfg-corrupt.mmdb", b"not a database");
    let error = err(&format!("[reputation]\nasn_database = {corrupt:?}\n"));
    assert!(
        error.starts_with(&format!(
            "reputation.asn_database: {corrupt}: not a usable MaxMind DB database"
        )),
        "{error}"
    );
}
