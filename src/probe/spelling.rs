//! What the probe sends: every route the gate knows, each spelled every way
//! a front proxy or a homeserver might read differently, and the harmless
//! request that goes with each route.
//!
//! The list is built from the gate's own route table, and the tests below
//! check that every spelling is classified by the gate as the route it
//! probes, that the gate refuses every one of them whatever its policy, and
//! that no body or query could register, send a message or use up a token.

use crate::gate::routes::{ApiVersion, GuardedRoute, Medium};

/// Every route the gate knows, each probed under every [`Variant`].
///
/// The SSO picker's form (`…/pick_username/account_details`) is not probed:
/// Synapse answers a pick without a session with an HTML page, which the
/// probe cannot tell from a front proxy's; its check, under the same
/// prefix, is.
pub const ROUTES: [GuardedRoute; 16] = [
    GuardedRoute::Register(ApiVersion::R0),
    GuardedRoute::Register(ApiVersion::V3),
    GuardedRoute::Register(ApiVersion::Unstable),
    GuardedRoute::Available(ApiVersion::R0),
    GuardedRoute::Available(ApiVersion::V3),
    GuardedRoute::Available(ApiVersion::Unstable),
    GuardedRoute::RequestToken(ApiVersion::R0, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::V3, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::Unstable, Medium::Email),
    GuardedRoute::RequestToken(ApiVersion::R0, Medium::Msisdn),
    GuardedRoute::RequestToken(ApiVersion::V3, Medium::Msisdn),
    GuardedRoute::RequestToken(ApiVersion::Unstable, Medium::Msisdn),
    GuardedRoute::TokenValidity(ApiVersion::V1),
    GuardedRoute::TokenValidity(ApiVersion::Unstable),
    GuardedRoute::AdminRegister,
    GuardedRoute::PickUsernameCheck,
];

/// A registration body with a duplicate key (the gate always refuses it
/// with `400 M_BAD_JSON`) and no `auth` (a homeserver answers a UIA step or
/// an error, never an account). The name is not a valid localpart anywhere,
/// so a homeserver that checks names first refuses it outright.
pub const REGISTER_BODY: &str = r#"{"username":"gatekeeper probe","username":"gatekeeper probe"}"#;

/// A `requestToken` body without any field: the gate refuses it
/// (`M_MISSING_PARAM`), and with no address in it, a homeserver has nowhere
/// to send anything.
pub const REQUEST_TOKEN_BODY: &str = "{}";

/// How a route's path is spelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// As the spec writes it.
    Canonical,
    /// A `/` at the end.
    TrailingSlash,
    /// Every `/` doubled.
    DoubleSlashes,
    /// The `/` before `register` escaped as `%2F`.
    EscapedSlashUpper,
    /// The `/` before `register` escaped as `%2f`.
    EscapedSlashLower,
    /// Every `/` but the first escaped as `%2F`: a proxy that keeps `%2F`
    /// as it is matches none of its path prefixes on it.
    EverySlashEscaped,
    /// A letter of `register` escaped (`r%65gister`).
    EscapedLetter,
    /// A letter of `register` escaped twice (`r%2565gister`).
    DoubleEscapedLetter,
    /// The whole path in upper case.
    UpperCase,
    /// A `.` segment, and a `probe` segment undone by `..`, before `register`.
    DotSegments,
    /// An escaped `..` segment before `register` (`/x/%2e%2e/register`).
    EscapedDotSegment,
    /// `;params` after `register`.
    Params,
    /// The other query: none where the probe has one, a harmless one where
    /// it has none.
    OtherQuery,
}

/// Every variant, in the order they are probed.
pub const VARIANTS: [Variant; 13] = [
    Variant::Canonical,
    Variant::TrailingSlash,
    Variant::DoubleSlashes,
    Variant::EscapedSlashUpper,
    Variant::EscapedSlashLower,
    Variant::EverySlashEscaped,
    Variant::EscapedLetter,
    Variant::DoubleEscapedLetter,
    Variant::UpperCase,
    Variant::DotSegments,
    Variant::EscapedDotSegment,
    Variant::Params,
    Variant::OtherQuery,
];

impl Variant {
    /// The short name used in the table and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Variant::Canonical => "canonical",
            Variant::TrailingSlash => "trailing slash",
            Variant::DoubleSlashes => "double slashes",
            Variant::EscapedSlashUpper => "%2F",
            Variant::EscapedSlashLower => "%2f",
            Variant::EverySlashEscaped => "every / as %2F",
            Variant::EscapedLetter => "%65 escape",
            Variant::DoubleEscapedLetter => "%2565 escape",
            Variant::UpperCase => "upper case",
            Variant::DotSegments => "dot segments",
            Variant::EscapedDotSegment => "%2e%2e segment",
            Variant::Params => ";params",
            Variant::OtherQuery => "other query",
        }
    }

    /// The path of `canonical` spelled this way.
    fn spell(self, canonical: &str) -> String {
        // Every canonical route path has exactly one `/register` segment,
        // or one `/pick_username`: the segment the variants spell around.
        let pivot = if canonical.contains("/pick_username/") {
            "/pick_username"
        } else {
            "/register"
        };
        let around_register = |replacement: &str| canonical.replacen(pivot, replacement, 1);
        match self {
            Variant::Canonical | Variant::OtherQuery => canonical.to_owned(),
            Variant::TrailingSlash => format!("{canonical}/"),
            Variant::DoubleSlashes => canonical.replace('/', "//"),
            Variant::EscapedSlashUpper => around_register(&format!("%2F{}", &pivot[1..])),
            Variant::EscapedSlashLower => around_register(&format!("%2f{}", &pivot[1..])),
            Variant::EverySlashEscaped => format!("/{}", canonical[1..].replace('/', "%2F")),
            // Both segments have an `e` to escape.
            Variant::EscapedLetter => around_register(&pivot.replacen('e', "%65", 1)),
            Variant::DoubleEscapedLetter => around_register(&pivot.replacen('e', "%2565", 1)),
            Variant::UpperCase => canonical.to_ascii_uppercase(),
            Variant::DotSegments => around_register(&format!("/./probe/..{pivot}")),
            Variant::EscapedDotSegment => around_register(&format!("/probe/%2e%2e{pivot}")),
            Variant::Params => around_register(&format!("{pivot};probe")),
        }
    }
}

/// One probe request: a route spelled one way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spelling {
    /// The route the gate classifies it as.
    pub route: GuardedRoute,
    /// How the path is spelled.
    pub variant: Variant,
    /// `GET` or `POST`.
    pub method: &'static str,
    /// Path and query, exactly as sent (before a base URL's prefix).
    pub target: String,
    /// The JSON body of a `POST`.
    pub body: Option<&'static str>,
}

impl Spelling {
    /// `v3/register/available (%2F)`: the route without its common prefix,
    /// and the variant.
    pub fn label(&self) -> String {
        format!("{} ({})", route_label(self.route), self.variant.name())
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.target
            .split_once('?')
            .map_or(self.target.as_str(), |(path, _)| path)
    }
}

/// A route's canonical path without `/_matrix/client/`.
fn route_label(route: GuardedRoute) -> String {
    let path = route.canonical_path();
    path.strip_prefix("/_matrix/client/")
        .unwrap_or_else(|| path.trim_start_matches('/'))
        .to_owned()
}

/// The harmless request probing a route.
struct HarmlessRequest {
    method: &'static str,
    /// The query every spelling carries (with its `?`), or `""`.
    query: &'static str,
    /// The query of [`Variant::OtherQuery`].
    other_query: &'static str,
    body: Option<&'static str>,
}

/// The harmless request for a route.
fn request_for(route: GuardedRoute) -> HarmlessRequest {
    let request = |method, query, other_query, body| HarmlessRequest {
        method,
        query,
        other_query,
        body,
    };
    // An exhaustive match: a route added to the gate cannot be probed
    // without someone choosing its harmless request here.
    match route {
        // `kind=user`, never `kind=guest`: a guest registration needs no
        // `auth` and would create an account on a homeserver reached
        // directly.
        GuardedRoute::Register(_) => request("POST", "", "?kind=user", Some(REGISTER_BODY)),
        // The name given twice: the gate refuses the ambiguity; a homeserver
        // only reads whether a name is taken.
        GuardedRoute::Available(_) => request("GET", "?username=probe&username=probe", "", None),
        GuardedRoute::RequestToken(..) => request("POST", "", "?probe=1", Some(REQUEST_TOKEN_BODY)),
        // A validity check never consumes a token; given twice, the gate
        // refuses it.
        GuardedRoute::TokenValidity(_) => request("GET", "?token=probe&token=probe", "", None),
        // The nonce of shared-secret registration: a read.
        GuardedRoute::AdminRegister => request("GET", "", "?probe=1", None),
        // The name given twice, and no session cookie: the gate refuses
        // the ambiguity; Synapse refuses a check without a session.
        GuardedRoute::PickUsernameCheck => {
            request("GET", "?username=probe&username=probe", "", None)
        }
        // Not probed (see `ROUTES`).
        GuardedRoute::PickUsername | GuardedRoute::Unknown => request("GET", "", "", None),
    }
}

/// Every probe: each route of [`ROUTES`] under each [`Variant`].
pub fn spellings() -> Vec<Spelling> {
    let mut out = Vec::with_capacity(ROUTES.len() * VARIANTS.len());
    for route in ROUTES {
        let request = request_for(route);
        let canonical = route.canonical_path();
        for variant in VARIANTS {
            let query = if variant == Variant::OtherQuery {
                request.other_query
            } else {
                request.query
            };
            out.push(Spelling {
                route,
                variant,
                method: request.method,
                target: format!("{}{query}", variant.spell(&canonical)),
                body: request.body,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gate::policy::{HeadDecision, Policy};
    use crate::gate::routes::classify;
    use http::Method;

    #[test]
    fn every_spelling_is_classified_as_the_route_it_probes() {
        let all = spellings();
        assert_eq!(all.len(), ROUTES.len() * VARIANTS.len());
        for spelling in &all {
            assert_eq!(
                classify(spelling.path()),
                Some(spelling.route),
                "{}: {}",
                spelling.label(),
                spelling.target
            );
        }
        // Each variant really changes the spelling (only the query variant
        // keeps the canonical path).
        for spelling in all
            .iter()
            .filter(|s| !matches!(s.variant, Variant::Canonical | Variant::OtherQuery))
        {
            assert_ne!(
                spelling.path(),
                spelling.route.canonical_path(),
                "{}",
                spelling.label()
            );
        }
    }

    #[test]
    fn every_route_the_gate_knows_is_probed() {
        // Every version segment and every tail the gate's routes use: any
        // combination `classify` recognizes as a known route must be one of
        // the probed routes, so a route added to the gate fails here until
        // the probe covers it.
        let versions = ["r0", "v1", "v2", "v3", "v4", "unstable"];
        let tails = [
            "",
            "/available",
            "/email/requestToken",
            "/msisdn/requestToken",
            "/m.login.registration_token/validity",
            "/email/submitToken",
            "/3pid/requestToken",
        ];
        for version in versions {
            for tail in tails {
                let path = format!("/_matrix/client/{version}/register{tail}");
                match classify(&path) {
                    Some(GuardedRoute::Unknown) | None => {}
                    Some(route) => assert!(ROUTES.contains(&route), "{path}: {route:?}"),
                }
            }
        }
        for version in versions {
            let path = format!("/_synapse/admin/{version}/register");
            if let Some(route) = classify(&path) {
                assert!(
                    route == GuardedRoute::Unknown || ROUTES.contains(&route),
                    "{path}"
                );
            }
        }
        for tail in ["account_details", "check", "other", "check/x"] {
            let path = format!("/_synapse/client/pick_username/{tail}");
            match classify(&path) {
                // The form is left out on purpose (see `ROUTES`).
                Some(GuardedRoute::Unknown | GuardedRoute::PickUsername) | None => {}
                Some(route) => assert!(ROUTES.contains(&route), "{path}: {route:?}"),
            }
        }
        for route in ROUTES {
            assert_eq!(classify(&route.canonical_path()), Some(route));
        }
    }

    #[test]
    fn the_picker_check_is_probed_in_every_spelling() {
        let targets: std::collections::HashSet<String> = spellings()
            .into_iter()
            .filter(|s| s.route == GuardedRoute::PickUsernameCheck)
            .map(|s| s.target)
            .collect();
        assert_eq!(targets.len(), VARIANTS.len());
        assert!(targets
            .contains("/_synapse/client/pick_us%65rname/check?username=probe&username=probe"));
        assert!(targets
            .contains("/_synapse%2Fclient%2Fpick_username%2Fcheck?username=probe&username=probe"));
    }

    /// What the gate's policy does with a probe (no rate limit involved).
    fn forwarded(policy: &Policy, spelling: &Spelling) -> bool {
        let method = Method::from_bytes(spelling.method.as_bytes()).expect("valid method");
        let query = spelling.target.split_once('?').map(|(_, q)| q);
        match policy.head(&method, spelling.route, query) {
            HeadDecision::Refuse(_) => false,
            HeadDecision::Forward(_) => true,
            HeadDecision::ReadBody(plan) => policy
                .body(plan, spelling.body.unwrap_or("").as_bytes())
                .is_ok(),
        }
    }

    #[test]
    fn the_gate_refuses_every_probe_whatever_its_policy() {
        let permissive = Config::from_toml(
            "[registration]\nenabled = true\nallow_admin_register = true\n\
             [guest]\naccess = \"allow\"\n\
             [username]\nallow_leading_underscore = true\nallow_numeric = true\n\
             reserved = []\nreserved_lookalikes = false\n",
        )
        .expect("valid configuration");
        let strict = Config::from_toml("[registration]\nenabled = false\n").expect("valid");
        for config in [Config::default(), permissive.clone(), strict] {
            let policy = Policy::new(&config);
            for spelling in spellings() {
                let admin_allowed = spelling.route == GuardedRoute::AdminRegister
                    && config.registration.allow_admin_register;
                // With shared-secret registration allowed, the nonce read is
                // forwarded (its answer still carries the marker).
                assert_eq!(
                    forwarded(&policy, &spelling),
                    admin_allowed,
                    "{}",
                    spelling.label()
                );
            }
        }
    }

    #[test]
    fn probes_are_harmless_by_construction() {
        for spelling in spellings() {
            assert!(!spelling.target.contains("guest"), "{}", spelling.target);
            if let Some(body) = spelling.body {
                assert!(!body.contains("auth"), "{body}");
                let parsed: serde_json::Value =
                    serde_json::from_str(body).expect("bodies are JSON");
                let object = parsed.as_object().expect("bodies are objects");
                assert!(
                    object.is_empty() || body.matches("\"username\"").count() == 2,
                    "{body}"
                );
            }
        }
    }
}
