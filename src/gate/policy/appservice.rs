//! Registrations by application services (bridges): `POST …/register` with
//! `"type": "m.login.application_service"` and the service's `as_token` as
//! the access token.
//!
//! The homeserver's reading (Synapse 1.163, `RegisterRestServlet`): the
//! top-level `type` makes it an appservice registration; a token is needed
//! (`Authorization: Bearer`, or the `access_token` query parameter, not
//! both); the name is `username`, taken as sent (no lower-casing, no
//! grammar: bridges need odd names); the token must be a service's
//! (`401 M_UNKNOWN_TOKEN`) and the user ID in its namespace
//! (`400 M_EXCLUSIVE`). Any other registration carrying a token is refused.
//!
//! The gate decides the same, before the homeserver, when the services'
//! files are configured; without them it leaves the token and the
//! namespace to the homeserver. What it forwards is canonical: the
//! top-level `type` (also when the client named it only in `auth`), no
//! `auth`, no legacy `user` field, and the token as an `Authorization:
//! Bearer` header.

use std::fmt;
use std::sync::Arc;

use http::{header, HeaderMap, StatusCode};
use serde_json::{Map, Value};

use super::Refusal;
use crate::appservice::AppServices;
use crate::error::MatrixError;
use crate::gate::query::Query;

/// The registration type of application services.
pub const APP_SERVICE_TYPE: &str = "m.login.application_service";

/// The longest name the homeserver takes from a service (Synapse).
const MAX_NAME: usize = 512;

/// An access token a request carried; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(pub String);

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(***)")
    }
}

/// An application service registration the gate lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppServiceGrant {
    /// The service whose `as_token` the request carried; `None` when no
    /// registration file is configured (the homeserver checks the token).
    pub id: Option<Arc<str>>,
    /// Whether the registration limits apply: the file's `rate_limited`
    /// (per-client attempts apply too); without files the attempts limit
    /// alone applies.
    pub rate_limited: bool,
    /// The token, forwarded as `Authorization: Bearer`.
    pub token: AccessToken,
}

impl AppServiceGrant {
    /// The service's name for logs and metrics (`unverified` without
    /// files).
    pub fn name(&self) -> Arc<str> {
        self.id.clone().unwrap_or_else(|| Arc::from("unverified"))
    }

    /// Whether the per-client attempts limit applies.
    pub fn counts_attempts(&self) -> bool {
        self.id.is_none() || self.rate_limited
    }

    /// Whether the registration limits apply.
    pub fn counts_registrations(&self) -> bool {
        self.id.is_some() && self.rate_limited
    }
}

fn missing_token(message: &str) -> Refusal {
    Refusal::new(
        "access_token",
        MatrixError::new(StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN", message),
    )
}

/// The refusal of a token that is no service's.
pub fn unknown_token() -> Refusal {
    Refusal::new(
        "appservice_token",
        MatrixError::new(
            StatusCode::UNAUTHORIZED,
            "M_UNKNOWN_TOKEN",
            "Unrecognised access token.",
        ),
    )
}

/// The access token of a `POST …/register`, read as the homeserver reads
/// it: one `Authorization: Bearer` header or one `access_token` query
/// parameter. Both at once, two of either, or another scheme is refused
/// as Synapse refuses it.
pub fn registration_token(
    headers: &HeaderMap,
    raw_query: Option<&str>,
) -> Result<Option<AccessToken>, Refusal> {
    let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
    let query = Query::parse(raw_query);
    let mut from_query = query.values("access_token");
    match (authorization.next(), from_query.next()) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(missing_token(
            "Mixing Authorization headers and access_token query parameters.",
        )),
        (None, Some(token)) => {
            if from_query.next().is_some() {
                return Err(missing_token(
                    "The access_token parameter is given more than once.",
                ));
            }
            // It is forwarded as a header: a token no header can carry
            // (decoded control characters, non-ASCII) is no service's.
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(unknown_token());
            }
            Ok(Some(AccessToken(token.to_owned())))
        }
        (Some(value), None) => {
            if authorization.next().is_some() {
                return Err(missing_token("Too many Authorization headers."));
            }
            value
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .filter(|token| !token.is_empty())
                .map(|token| Some(AccessToken(token.to_owned())))
                .ok_or_else(|| missing_token("Invalid Authorization header."))
        }
    }
}

/// Whether a registration body asks for an application service
/// registration: the top-level `type` (the homeserver's reading) or the
/// `auth` type (the spec's newer form).
pub fn is_app_service_body(object: &Map<String, Value>) -> bool {
    let is_type = |value: Option<&Value>| value.and_then(Value::as_str) == Some(APP_SERVICE_TYPE);
    is_type(object.get("type")) || is_type(object.get("auth").and_then(|auth| auth.get("type")))
}

/// The refusal of a user registration that carries an access token.
pub fn token_on_user_registration() -> Refusal {
    Refusal::new(
        "access_token",
        MatrixError::new(
            StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "An access token should not be provided on requests to /register \
             (except if type is m.login.application_service).",
        ),
    )
}

/// Decides an application service registration and puts its body in
/// canonical form. Returns the name registered and the grant.
pub fn decide(
    services: &AppServices,
    server_name: &str,
    object: &mut Map<String, Value>,
    token: Option<&AccessToken>,
) -> Result<(String, AppServiceGrant), Refusal> {
    let unknown = |rule: &'static str, message: &str| {
        Refusal::new(
            rule,
            MatrixError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", message),
        )
    };
    let Some(token) = token else {
        return Err(unknown(
            "access_token",
            "Appservice token must be provided when using a type of m.login.application_service.",
        ));
    };
    let name = match object.get("username") {
        Some(Value::String(name)) if name.len() <= MAX_NAME => name.clone(),
        Some(Value::String(_)) => return Err(unknown("appservice_username", "Invalid username")),
        _ => {
            return Err(unknown(
                "appservice_username",
                "Desired Username is missing or not a string",
            ))
        }
    };
    let grant = if services.is_empty() {
        AppServiceGrant {
            id: None,
            rate_limited: false,
            token: token.clone(),
        }
    } else {
        let Some(service) = services.by_token(&token.0) else {
            return Err(unknown_token());
        };
        if !service.covers(&format!("@{name}:{server_name}")) {
            return Err(Refusal::new(
                "appservice_namespace",
                MatrixError::new(
                    StatusCode::BAD_REQUEST,
                    "M_EXCLUSIVE",
                    "Invalid user localpart for this application service.",
                ),
            ));
        }
        AppServiceGrant {
            id: Some(service.id().clone()),
            rate_limited: service.rate_limited(),
            token: token.clone(),
        }
    };
    object.insert(
        "type".to_owned(),
        Value::String(APP_SERVICE_TYPE.to_owned()),
    );
    object.remove("auth");
    object.remove("user");
    Ok((name, grant))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn token(headers: &[&str], query: Option<&str>) -> Result<Option<AccessToken>, &'static str> {
        let mut map = HeaderMap::new();
        for value in headers {
            map.append(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        }
        registration_token(&map, query).map_err(|refusal| refusal.error.errcode)
    }

    #[test]
    fn the_token_is_read_from_one_header_or_one_parameter() {
        let t = |s: &str| Ok(Some(AccessToken(s.to_owned())));
        assert_eq!(token(&[], None), Ok(None));
        assert_eq!(token(&[], Some("kind=user")), Ok(None));
        assert_eq!(token(&["Bearer as-1"], None), t("as-1"));
        assert_eq!(token(&[], Some("access_token=as%2D1&kind=user")), t("as-1"));
        for (headers, query) in [
            (&["Bearer a"][..], Some("access_token=b")),
            (&["Bearer a", "Bearer a"][..], None),
            (&["Basic YTpi"][..], None),
            (&["Bearer "][..], None),
            (&[][..], Some("access_token=a&access_token=b")),
        ] {
            assert_eq!(
                token(headers, query),
                Err("M_MISSING_TOKEN"),
                "{headers:?} {query:?}"
            );
        }
        // Decoded into what no header can carry: no service's token.
        for query in [
            "access_token=a%0Ab",
            "access_token=%C3%A9",
            "access_token=a%20b",
            "access_token=",
        ] {
            assert_eq!(token(&[], Some(query)), Err("M_UNKNOWN_TOKEN"), "{query}");
        }
        assert_eq!(
            format!("{:?}", AccessToken("s3cret".into())),
            "AccessToken(***)"
        );
    }

    #[test]
    fn the_type_is_read_at_the_top_or_in_auth() {
        let object = |text: &str| serde_json::from_str::<Map<String, Value>>(text).unwrap();
        assert!(is_app_service_body(&object(
            r#"{"type":"m.login.application_service"}"#
        )));
        assert!(is_app_service_body(&object(
            r#"{"auth":{"type":"m.login.application_service"}}"#
        )));
        assert!(!is_app_service_body(&object(
            r#"{"auth":{"type":"m.login.dummy"}}"#
        )));
        assert!(!is_app_service_body(&object(r#"{"type":5}"#)));
    }
}
