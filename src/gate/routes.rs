//! Which requests the gate guards.
//!
//! Synapse matches the raw, undecoded path, but front proxies and other
//! homeservers decode escapes, merge slashes, resolve dot segments or ignore
//! case. A path is therefore classified after the most generous
//! normalization any of them might apply; whatever lands in the registration
//! namespace is either a known route (forwarded under its canonical path) or
//! refused. Nothing that could reach registration somewhere passes unchecked.

use std::borrow::Cow;

/// The API version segment of a client-server registration route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiVersion {
    /// `r0`
    R0,
    /// `v1` (registration token validity only)
    V1,
    /// `v3`
    V3,
    /// `unstable`
    Unstable,
}

impl ApiVersion {
    fn parse(segment: &str) -> Option<ApiVersion> {
        match segment {
            "r0" => Some(ApiVersion::R0),
            "v1" => Some(ApiVersion::V1),
            "v3" => Some(ApiVersion::V3),
            "unstable" => Some(ApiVersion::Unstable),
            _ => None,
        }
    }

    /// The canonical spelling of the segment.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiVersion::R0 => "r0",
            ApiVersion::V1 => "v1",
            ApiVersion::V3 => "v3",
            ApiVersion::Unstable => "unstable",
        }
    }
}

/// The medium of a `requestToken` route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Medium {
    /// `email`
    Email,
    /// `msisdn`
    Msisdn,
}

/// A guarded route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardedRoute {
    /// `POST /_matrix/client/{r0,v3,unstable}/register`
    Register(ApiVersion),
    /// `GET …/register/available`
    Available(ApiVersion),
    /// `POST …/register/{email,msisdn}/requestToken`
    RequestToken(ApiVersion, Medium),
    /// `GET /_matrix/client/{v1,unstable}/register/m.login.registration_token/validity`
    TokenValidity(ApiVersion),
    /// `/_synapse/admin/v1/register` (shared-secret registration)
    AdminRegister,
    /// `GET, POST /_synapse/client/pick_username/account_details`: the SSO
    /// username picker's form (`GET`) and the pick itself (`POST`), which
    /// names the localpart of an account made after an SSO login.
    PickUsername,
    /// `GET /_synapse/client/pick_username/check?username=`: the picker's
    /// availability check.
    PickUsernameCheck,
    /// Something inside the registration namespace that is none of the
    /// above: refused, never passed through.
    Unknown,
}

impl GuardedRoute {
    /// The canonical path this route is forwarded under.
    pub fn canonical_path(self) -> Cow<'static, str> {
        match self {
            GuardedRoute::Register(v) => format!("/_matrix/client/{}/register", v.as_str()).into(),
            GuardedRoute::Available(v) => {
                format!("/_matrix/client/{}/register/available", v.as_str()).into()
            }
            GuardedRoute::RequestToken(v, m) => format!(
                "/_matrix/client/{}/register/{}/requestToken",
                v.as_str(),
                match m {
                    Medium::Email => "email",
                    Medium::Msisdn => "msisdn",
                }
            )
            .into(),
            GuardedRoute::TokenValidity(v) => format!(
                "/_matrix/client/{}/register/m.login.registration_token/validity",
                v.as_str()
            )
            .into(),
            GuardedRoute::AdminRegister => "/_synapse/admin/v1/register".into(),
            GuardedRoute::PickUsername => "/_synapse/client/pick_username/account_details".into(),
            GuardedRoute::PickUsernameCheck => "/_synapse/client/pick_username/check".into(),
            GuardedRoute::Unknown => "/".into(),
        }
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            GuardedRoute::Register(_) => "register",
            GuardedRoute::Available(_) => "available",
            GuardedRoute::RequestToken(_, Medium::Email) => "email_request_token",
            GuardedRoute::RequestToken(_, Medium::Msisdn) => "msisdn_request_token",
            GuardedRoute::TokenValidity(_) => "token_validity",
            GuardedRoute::AdminRegister => "admin_register",
            GuardedRoute::PickUsername => "pick_username",
            GuardedRoute::PickUsernameCheck => "pick_username_check",
            GuardedRoute::Unknown => "unknown_registration_route",
        }
    }
}

/// Classifies a raw request path (without query). `None` means pass-through.
///
/// The common case — a path without `%` and without the letters of
/// "register" or "pick_username" in any case — is decided without
/// allocating.
pub fn classify(raw_path: &str) -> Option<GuardedRoute> {
    if !may_name_a_guarded_route(raw_path.as_bytes()) {
        return None;
    }
    let normalized = normalize(raw_path);
    let segments: Vec<&str> = normalized.iter().map(String::as_str).collect();
    classify_segments(&segments)
}

fn classify_segments(s: &[&str]) -> Option<GuardedRoute> {
    match s {
        ["_synapse", "admin", _, "register", ..] => Some(GuardedRoute::AdminRegister),
        // Synapse serves both picker resources as leaves (any tail reaches
        // them); only the exact paths are known routes, the rest refused.
        ["_synapse", "client", "pick_username", rest @ ..] => Some(match rest {
            ["account_details"] => GuardedRoute::PickUsername,
            ["check"] => GuardedRoute::PickUsernameCheck,
            _ => GuardedRoute::Unknown,
        }),
        ["_matrix", "client", version, "register", rest @ ..] => {
            Some(match (ApiVersion::parse(version), rest) {
                (Some(v @ (ApiVersion::R0 | ApiVersion::V3 | ApiVersion::Unstable)), []) => {
                    GuardedRoute::Register(v)
                }
                (
                    Some(v @ (ApiVersion::R0 | ApiVersion::V3 | ApiVersion::Unstable)),
                    ["available"],
                ) => GuardedRoute::Available(v),
                (
                    Some(v @ (ApiVersion::R0 | ApiVersion::V3 | ApiVersion::Unstable)),
                    [medium @ ("email" | "msisdn"), "requesttoken"],
                ) => GuardedRoute::RequestToken(
                    v,
                    if *medium == "email" {
                        Medium::Email
                    } else {
                        Medium::Msisdn
                    },
                ),
                (
                    Some(v @ (ApiVersion::V1 | ApiVersion::Unstable)),
                    ["m.login.registration_token", "validity"],
                ) => GuardedRoute::TokenValidity(v),
                _ => GuardedRoute::Unknown,
            })
        }
        // Unstable MSC prefixes and the long-gone `api/v1` put one more
        // segment before `register`: no known route, but never unchecked.
        ["_matrix", "client", _, _, "register", ..] => Some(GuardedRoute::Unknown),
        _ => None,
    }
}

/// The most generous normalization of a path: escapes decoded (repeatedly,
/// so double encoding cannot hide a segment), `\` read as `/`, the path cut
/// at a decoded `?`, `#` or NUL, `;params` dropped, segments trimmed of
/// whitespace, empty and `.` segments removed, `..` applied, ASCII
/// lower-cased.
pub fn normalize(raw_path: &str) -> Vec<String> {
    let mut bytes = raw_path.as_bytes().to_vec();
    for _ in 0..4 {
        let decoded = percent_decode(&bytes);
        if decoded == bytes {
            break;
        }
        bytes = decoded;
    }
    let text = String::from_utf8_lossy(&bytes).replace('\\', "/");
    // A decoded `?`, `#` or NUL ends the path for some parsers.
    let text = text.split(['?', '#', '\0']).next().unwrap_or("");
    let mut segments: Vec<String> = Vec::new();
    for segment in text.split('/') {
        let segment = segment
            .split(';')
            .next()
            .unwrap_or("")
            .trim_matches(|c: char| c.is_whitespace() || c.is_control());
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s.to_ascii_lowercase()),
        }
    }
    segments
}

/// Decodes `%XX` escapes; malformed escapes are kept as they are.
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' && i + 2 < input.len() {
            if let (Some(h), Some(l)) = (hex(input[i + 1]), hex(input[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(input[i]);
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether a raw path could name a guarded route in some spelling: it has
/// an escape, or `register` or `pick_username` in any case. One pass over
/// the path, the pass-through fast path's only cost here.
fn may_name_a_guarded_route(path: &[u8]) -> bool {
    let starts_ci = |at: usize, word: &[u8]| {
        path.get(at..at + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    path.iter().enumerate().any(|(at, byte)| match byte {
        b'%' => true,
        b'r' | b'R' => starts_ci(at, b"register"),
        b'p' | b'P' => starts_ci(at, b"pick_username"),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_routes_are_recognized() {
        for v in ["r0", "v3", "unstable"] {
            assert!(matches!(
                classify(&format!("/_matrix/client/{v}/register")),
                Some(GuardedRoute::Register(_))
            ));
            assert!(matches!(
                classify(&format!("/_matrix/client/{v}/register/available")),
                Some(GuardedRoute::Available(_))
            ));
            assert!(matches!(
                classify(&format!("/_matrix/client/{v}/register/email/requestToken")),
                Some(GuardedRoute::RequestToken(_, Medium::Email))
            ));
            assert!(matches!(
                classify(&format!("/_matrix/client/{v}/register/msisdn/requestToken")),
                Some(GuardedRoute::RequestToken(_, Medium::Msisdn))
            ));
        }
        for v in ["v1", "unstable"] {
            assert!(matches!(
                classify(&format!(
                    "/_matrix/client/{v}/register/m.login.registration_token/validity"
                )),
                Some(GuardedRoute::TokenValidity(_))
            ));
        }
        assert_eq!(
            classify("/_synapse/admin/v1/register"),
            Some(GuardedRoute::AdminRegister)
        );
    }

    #[test]
    fn variants_that_normalize_to_register_are_guarded() {
        let register = Some(GuardedRoute::Register(ApiVersion::V3));
        for path in [
            "/_matrix/client/v3/register/",
            "//_matrix//client/v3///register",
            "/_matrix/client/v3/r%65gister",
            "/_matrix/client/v3/r%2565gister",
            "/_matrix/client/v3%2Fregister",
            "/_matrix/client/./v3/foo/../register",
            "/_matrix/client/V3/register",
            "/_MATRIX/CLIENT/v3/REGISTER",
            "/_matrix/client/v3/register;x=1",
            "/_matrix/client/v3;a/register",
            "\\_matrix\\client\\v3\\register",
            "/../_matrix/client/v3/register",
            "/_matrix/client/v3/register%3Fkind=guest",
            "/_matrix/client/v3/register%23x",
            "/_matrix/client/v3/register%00.png",
            "/_matrix/client/v3/register%20",
            "/_matrix/client/v3/%09register",
        ] {
            assert_eq!(classify(path), register, "{path}");
        }
        assert_eq!(
            classify("/_matrix/client/v3/register/available/"),
            Some(GuardedRoute::Available(ApiVersion::V3))
        );
    }

    #[test]
    fn sso_username_picker_is_guarded_in_every_spelling() {
        let pick = Some(GuardedRoute::PickUsername);
        let check = Some(GuardedRoute::PickUsernameCheck);
        for path in [
            "/_synapse/client/pick_username/account_details",
            "/_synapse/client/pick_username/account_details/",
            "//_synapse//client/pick_username///account_details",
            "/_synapse/client/pick_username/account%5Fdetails",
            "/_synapse/client/pick%255Fusername/account_details",
            "/_synapse/client%2Fpick_username%2Faccount_details",
            "/_synapse/client/./x/../pick_username/account_details",
            "/_SYNAPSE/Client/PICK_USERNAME/Account_Details",
            "/_synapse/client/pick_username/account_details;x=1",
            "\\_synapse\\client\\pick_username\\account_details",
            "/_synapse/client/pick_username/account_details%3Fusername=admin",
            "/_synapse/client/pick_username/account_details%20",
        ] {
            assert_eq!(classify(path), pick, "{path}");
        }
        for path in [
            "/_synapse/client/pick_username/check",
            "/_synapse/client/pick_username/check/",
            "/_synapse/client/pick_username/CHECK",
            "/_synapse/client/pick_username/%63heck",
            "/_synapse/client/pick_username/check%23x",
        ] {
            assert_eq!(classify(path), check, "{path}");
        }
        for path in [
            "/_synapse/client/pick_username",
            "/_synapse/client/pick_username/",
            "/_synapse/client/pick_username/account_details/x",
            "/_synapse/client/pick_username/check/x",
            "/_synapse/client/pick_username/other",
        ] {
            assert_eq!(classify(path), Some(GuardedRoute::Unknown), "{path}");
        }
        for path in [
            "/_synapse/client/new_user_consent",
            "/_synapse/client/sso_register",
            "/_synapse/client/oidc/callback",
            "/_synapse/client/pick_idp",
        ] {
            assert_eq!(classify(path), None, "{path}");
        }
    }

    #[test]
    fn unknown_paths_in_the_namespace_are_refused() {
        for path in [
            "/_matrix/client/v4/register",
            "/_matrix/client/v3/register/other",
            "/_matrix/client/v1/register",
            "/_matrix/client/v3/register/m.login.registration_token/validity",
            "/_matrix/client/unstable/org.matrix.msc3231/register/x/validity",
            "/_matrix/client/api/v1/register",
        ] {
            assert_eq!(classify(path), Some(GuardedRoute::Unknown), "{path}");
        }
        assert_eq!(
            classify("/_synapse/admin/v2/register"),
            Some(GuardedRoute::AdminRegister)
        );
    }

    #[test]
    fn other_paths_pass_through() {
        for path in [
            "/_matrix/client/v3/sync",
            "/_matrix/client/versions",
            "/_matrix/client/v3/login",
            "/_matrix/client/v3/rooms/%21abc%3Aexample.org/send/m.room.message/1",
            "/_matrix/media/v3/upload",
            "/registered",
            "/_matrix/client/v3/registered",
            "/",
            "",
        ] {
            assert_eq!(classify(path), None, "{path}");
        }
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(percent_decode(b"%41%4"), b"A%4");
        assert_eq!(percent_decode(b"%zz%"), b"%zz%");
        assert_eq!(percent_decode(b"a%2fb"), b"a/b");
    }
}
