//! Synapse's SSO username picker, read the way Synapse reads it.
//!
//! After an SSO login (OIDC, CAS, SAML) that maps to no account, Synapse
//! lets the person pick a localpart at
//! `POST /_synapse/client/pick_username/account_details` — an HTML form,
//! whatever `enable_registration` says — and offers an availability check at
//! `GET /_synapse/client/pick_username/check?username=`. On an open server
//! with social login this is the sign-up path, so the username policy holds
//! here as on `/register`.
//!
//! What Synapse does with them (and the gate therefore does):
//! - the form is read by Twisted: `&` and `;` separate, `+` is a space,
//!   escapes are decoded, an item without `=` is dropped, and the *first*
//!   value of a field wins. Fields read: `username` (ASCII), `use_display_name`
//!   and `use_avatar` (exactly `true` or `false`), `use_email` (repeatable,
//!   UTF-8). The gate refuses a field given twice (other readers take the
//!   last), and forwards a form it wrote itself, in that field order.
//! - the name is **not** case-mapped: an upper-case name is stored as chosen
//!   and then fails Synapse's localpart check. The gate checks the name
//!   exactly as sent.
//! - a pick Synapse accepts is answered with a redirect (`302`, `Location`
//!   the consent page or `/_synapse/client/sso_register`, where the account
//!   is made); a bad session or field with an HTML error page (`400`).
//!
//! The picker page is for a person: the gate's refusals of the pick are a
//! small HTML page with the reason ([`page`]). The check is read by the
//! page's script, which shows the `error` of a `200` JSON answer and ignores
//! any other status; a name the gate refuses is therefore answered
//! `200 {"available": false, "errcode": …, "error": …}` ([`unavailable`]).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use super::{AccountKind, Forward, HeadDecision, Policy, Refusal, RequestedName};
use crate::error::MatrixError;
use crate::gate::query::{encode_component, Query};
use crate::gate::routes::GuardedRoute;
use crate::gate::username::{map_case, UsernameRule};

/// The only content type the pick is read as.
const FORM: &str = "application/x-www-form-urlencoded";

/// The fields Synapse reads from a pick that it takes once (the first
/// value), in the order the gate forwards them.
const SINGLE_FIELDS: [&str; 3] = ["username", "use_display_name", "use_avatar"];

/// Decides on an availability check from its raw query: the username
/// policy on the name as Synapse reads it; a good name is asked upstream
/// as `?username=<name>` and nothing else.
pub(in crate::gate) fn check(policy: &Policy, raw_query: Option<&str>) -> HeadDecision {
    let query = Query::parse(raw_query);
    let name = match query.single("username") {
        Ok(Some(name)) => name,
        Ok(None) => return HeadDecision::Refuse(missing("username")),
        Err(n) => return HeadDecision::Refuse(repeated("username", n)),
    };
    match judge(policy, name) {
        Ok(checked) => HeadDecision::Forward(Forward {
            path_and_query: format!(
                "{}?username={}",
                GuardedRoute::PickUsernameCheck.canonical_path(),
                encode_component(name)
            ),
            body: None,
            username: Some(checked),
            account: None,
            appservice: None,
        }),
        Err(refusal) => HeadDecision::Refuse(refusal),
    }
}

/// Refuses a pick whose body is not declared as one form: Twisted reads
/// `multipart/form-data` too, and the gate reads only what it forwards.
pub(in crate::gate) fn form_content_type(headers: &HeaderMap) -> Result<(), Refusal> {
    let mut types = headers.get_all(header::CONTENT_TYPE).iter();
    let declared = match (types.next(), types.next()) {
        (Some(value), None) => value.to_str().ok(),
        _ => None,
    };
    let essence = declared.and_then(|v| v.split(';').next()).map(str::trim);
    if essence.is_some_and(|e| e.eq_ignore_ascii_case(FORM)) {
        Ok(())
    } else {
        Err(Refusal::new(
            "content_type",
            MatrixError::bad_request(format!("The form must be sent as {FORM}.")),
        ))
    }
}

/// Decides on the body of a pick: strict form, username policy on the
/// name exactly as sent, and the canonical form the homeserver receives.
pub(in crate::gate) fn pick(policy: &Policy, body: &[u8]) -> Result<Forward, Refusal> {
    let form = Query::parse_form(body).map_err(|e| {
        Refusal::new(
            "not_utf8",
            MatrixError::bad_request(format!("The form could not be read: {e}.")),
        )
    })?;
    let mut canonical = Vec::new();
    let mut username = None;
    for field in SINGLE_FIELDS {
        let value = match form.single(field) {
            Ok(Some(value)) => value,
            Ok(None) if field == "username" => return Err(missing(field)),
            Ok(None) => continue,
            Err(n) => return Err(repeated(field, n)),
        };
        if field == "username" {
            username = Some(judge(policy, value)?);
        } else if !matches!(value, "true" | "false") {
            return Err(Refusal::new(
                "invalid_param",
                MatrixError::invalid_param(format!("{field} must be true or false.")),
            ));
        }
        canonical.push(format!("{field}={}", encode_component(value)));
    }
    for email in form.values("use_email") {
        canonical.push(format!("use_email={}", encode_component(email)));
    }
    Ok(Forward {
        path_and_query: GuardedRoute::PickUsername.canonical_path().into_owned(),
        body: Some(Bytes::from(canonical.join("&"))),
        username,
        account: Some(AccountKind::User { explicit: false }),
        appservice: None,
    })
}

/// The username policy on a picked name, exactly as sent: Synapse maps no
/// case here, so upper case is refused rather than lower-cased.
fn judge(policy: &Policy, sent: &str) -> Result<RequestedName, Refusal> {
    let upper = map_case(sent) != sent;
    let name = RequestedName {
        sent: sent.to_owned(),
        mapped: (!upper).then(|| sent.to_owned()),
    };
    let verdict = if upper {
        Err(UsernameRule::UpperCase)
    } else {
        policy.username.check_mapped(sent, false)
    };
    verdict.map(|()| name.clone()).map_err(|rule| Refusal {
        username: Some(Box::new(name)),
        ..rule.into()
    })
}

fn missing(field: &str) -> Refusal {
    Refusal::new(
        "missing_param",
        MatrixError::missing_param(format!("Missing {field} parameter.")),
    )
}

fn repeated(field: &str, n: usize) -> Refusal {
    Refusal::new(
        "ambiguous_param",
        MatrixError::invalid_param(format!(
            "The {field} parameter is given {n} times; give it once."
        )),
    )
}

/// Whether the homeserver accepted a pick: Synapse answers one with a
/// redirect to the next step of sign-up, and every refusal with a page.
pub(in crate::gate) fn accepted(status: StatusCode, headers: &HeaderMap) -> bool {
    status.is_redirection() && headers.contains_key(header::LOCATION)
}

/// The check's answer for a name the gate refuses: `200` with
/// `"available": false`, and the reason where the picker's script shows it.
pub(in crate::gate) fn unavailable(error: &MatrixError) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "available": false,
        "errcode": error.errcode,
        "error": error.error,
    });
    crate::error::json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

/// The gate's refusal of a pick, for the person in front of the picker: a
/// small HTML page with the reason, under the refusal's status (`400`,
/// `403`, `429` with `Retry-After`), and a link back to the form.
pub(in crate::gate) fn page(
    status: StatusCode,
    reason: &str,
    retry_after_secs: Option<u64>,
) -> Response<Full<Bytes>> {
    let title = match status {
        StatusCode::TOO_MANY_REQUESTS => "Too many attempts",
        StatusCode::FORBIDDEN => "Sign-up is not available",
        _ => "This username cannot be used",
    };
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>\n<p>{}</p>\n\
         <p><a href=\"account_details\">Choose another username</a></p>\n</body>\n</html>\n",
        escape_html(reason)
    );
    let mut response = Response::new(Full::new(Bytes::from(html)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The page needs nothing from anywhere: no script, style or frame.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    if let Some(secs) = retry_after_secs {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// Text made safe inside HTML elements and attribute values.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::config::Config;

    fn policy(toml: &str) -> Policy {
        Policy::new(&Config::from_toml(toml).expect("valid configuration"))
    }

    fn refused(result: Result<Forward, Refusal>) -> (&'static str, &'static str) {
        let refusal = result.expect_err("a refusal");
        (refusal.rule, refusal.error.errcode)
    }

    #[test]
    fn a_good_pick_is_forwarded_as_a_canonical_form() {
        let p = policy("");
        let forward = pick(
            &p,
            b"use_email=a%40example.org&extra=1&use_avatar=false;username=alice.b\
              &use_display_name=true&use_email=b+c%40example.org",
        )
        .expect("allowed");
        assert_eq!(
            forward.path_and_query,
            "/_synapse/client/pick_username/account_details"
        );
        assert_eq!(
            forward.body.expect("a body"),
            Bytes::from_static(
                b"username=alice.b&use_display_name=true&use_avatar=false\
                  &use_email=a%40example.org&use_email=b%20c%40example.org"
            )
        );
        let name = forward.username.expect("the name");
        assert_eq!(
            (name.sent.as_str(), name.mapped.as_deref()),
            ("alice.b", Some("alice.b"))
        );
        assert_eq!(forward.account, Some(AccountKind::User { explicit: false }));
        let bare = pick(&p, b"username=bob").expect("allowed");
        assert_eq!(bare.body, Some(Bytes::from_static(b"username=bob")));
    }

    #[test]
    fn reserved_and_bad_picks_are_refused_as_sent() {
        let p = policy("[username]\ndeny_patterns = [\"^spam\"]\n");
        let code = |body: &str| refused(pick(&p, body.as_bytes()));
        assert_eq!(code("username=admin"), ("reserved", "M_USER_IN_USE"));
        assert_eq!(code("username=adm1n"), ("lookalike", "M_USER_IN_USE"));
        assert_eq!(code("username=support"), ("reserved", "M_USER_IN_USE"));
        assert_eq!(code("username=%61dmin"), ("reserved", "M_USER_IN_USE"));
        assert_eq!(code("username=Alice"), ("upper_case", "M_INVALID_USERNAME"));
        assert_eq!(code("username=ADMIN"), ("upper_case", "M_INVALID_USERNAME"));
        assert_eq!(
            code("username=%E2%84%AAelvin"),
            ("upper_case", "M_INVALID_USERNAME")
        );
        assert_eq!(code("username=a+b"), ("grammar", "M_INVALID_USERNAME"));
        assert_eq!(
            code("username=_bridge"),
            ("leading_underscore", "M_INVALID_USERNAME")
        );
        assert_eq!(code("username=1234"), ("numeric", "M_INVALID_USERNAME"));
        assert_eq!(
            code("username=spammer"),
            ("deny_pattern", "M_INVALID_USERNAME")
        );
        assert_eq!(code("username="), ("empty", "M_INVALID_USERNAME"));
        let refusal = pick(&p, b"username=Admin").expect_err("refused");
        let name = refusal.username.expect("the name");
        assert_eq!((name.sent.as_str(), name.mapped), ("Admin", None));
    }

    #[test]
    fn ambiguous_or_unreadable_forms_are_refused() {
        let p = policy("");
        let code = |body: &[u8]| refused(pick(&p, body));
        for body in [
            &b"username=alice&username=admin"[..],
            b"username=alice;username=admin",
            b"username=alice&%75sername=admin",
            b"username=alice&use_display_name=true&use_display_name=false",
            b"username=alice&use_avatar=true&use_avatar=true",
        ] {
            assert_eq!(code(body), ("ambiguous_param", "M_INVALID_PARAM"));
        }
        assert_eq!(code(b"username=al%FFice"), ("not_utf8", "M_UNKNOWN"));
        assert_eq!(
            code(b"username=alice&use_email=\xff"),
            ("not_utf8", "M_UNKNOWN")
        );
        assert_eq!(
            code(b"use_email=a%40b"),
            ("missing_param", "M_MISSING_PARAM")
        );
        // Twisted drops an item without `=`: no username at all.
        assert_eq!(code(b"username"), ("missing_param", "M_MISSING_PARAM"));
        assert_eq!(
            code(b"username=alice&use_display_name=yes"),
            ("invalid_param", "M_INVALID_PARAM")
        );
    }

    #[test]
    fn only_one_form_content_type_is_read() {
        let headers = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CONTENT_TYPE, HeaderValue::from_static(v));
            }
            h
        };
        assert!(form_content_type(&headers(&[FORM])).is_ok());
        assert!(form_content_type(&headers(&[
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8"
        ]))
        .is_ok());
        for bad in [
            &[][..],
            &["multipart/form-data; boundary=x"],
            &["application/json"],
            &[FORM, "multipart/form-data; boundary=x"],
        ] {
            let refusal = form_content_type(&headers(bad)).expect_err("refused");
            assert_eq!(refusal.rule, "content_type");
        }
    }

    #[test]
    fn check_refuses_bad_names_and_forwards_good_ones_canonically() {
        let p = policy("");
        let ask = |q: &str| check(&p, Some(q));
        match ask("username=alice&other=1") {
            HeadDecision::Forward(f) => assert_eq!(
                f.path_and_query,
                "/_synapse/client/pick_username/check?username=alice"
            ),
            other => panic!("{other:?}"),
        }
        let rule = |d: HeadDecision| match d {
            HeadDecision::Refuse(r) => (r.rule, r.error.errcode),
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(rule(ask("username=admin")), ("reserved", "M_USER_IN_USE"));
        assert_eq!(
            rule(ask("username=Admin")),
            ("upper_case", "M_INVALID_USERNAME")
        );
        assert_eq!(
            rule(ask("username=a&username=b")),
            ("ambiguous_param", "M_INVALID_PARAM")
        );
        assert_eq!(rule(check(&p, None)), ("missing_param", "M_MISSING_PARAM"));
    }

    #[test]
    fn the_policy_routes_the_picker_by_method() {
        let p = policy("");
        assert!(matches!(
            p.head(&Method::GET, GuardedRoute::PickUsername, Some("username=admin")),
            HeadDecision::Forward(Forward { ref path_and_query, body: None, .. })
                if path_and_query == "/_synapse/client/pick_username/account_details"
        ));
        assert!(matches!(
            p.head(&Method::POST, GuardedRoute::PickUsername, None),
            HeadDecision::ReadBody(_)
        ));
        let refusal = |d: HeadDecision| match d {
            HeadDecision::Refuse(r) => (r.rule, r.error.status.as_u16()),
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refusal(p.head(&Method::PUT, GuardedRoute::PickUsername, None)),
            ("method", 405)
        );
        assert_eq!(
            refusal(p.head(&Method::POST, GuardedRoute::PickUsernameCheck, None)),
            ("method", 405)
        );
        let closed = policy("[registration]\nenabled = false\n");
        assert_eq!(
            refusal(closed.head(&Method::POST, GuardedRoute::PickUsername, None)),
            ("registration_disabled", 403)
        );
    }

    #[test]
    fn answers_are_what_the_picker_shows() {
        let error = MatrixError::invalid_username("<b>bad</b> & \"worse\"");
        let response = page(StatusCode::BAD_REQUEST, &error.error, None);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        let limited = page(StatusCode::TOO_MANY_REQUESTS, "Too many requests", Some(7));
        assert_eq!(limited.headers()[header::RETRY_AFTER], "7");
        assert_eq!(
            escape_html("<b>'x'</b> & \"y\""),
            "&lt;b&gt;&#39;x&#39;&lt;/b&gt; &amp; &quot;y&quot;"
        );
        let answer = unavailable(&MatrixError::user_in_use());
        assert_eq!(answer.status(), StatusCode::OK);
        let mut location = HeaderMap::new();
        location.insert(
            header::LOCATION,
            HeaderValue::from_static("/_synapse/client/sso_register"),
        );
        assert!(accepted(StatusCode::FOUND, &location));
        assert!(!accepted(StatusCode::FOUND, &HeaderMap::new()));
        assert!(!accepted(StatusCode::OK, &location));
        assert!(!accepted(StatusCode::BAD_REQUEST, &HeaderMap::new()));
    }
}
