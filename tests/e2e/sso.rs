//! SSO sign-up with a real Synapse and a real OpenID provider
//! (`oidc-provider-mock`, a login form that takes any subject): a person
//! walks the whole flow through the gate with a cookie-keeping client —
//! Synapse's redirect to the provider, the provider's form, the callback,
//! Synapse's username picker, its availability check, the pick, and the
//! last step where Synapse makes the account. Reserved names are refused by
//! the gate and never made; a good name becomes an account with what the
//! picker's form carried (display name, email); the registration limit
//! binds on the second person.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::header::{LOCATION, SET_COOKIE};
use http::Method;
use serde_json::json;

use crate::common::{eventually, get, post_json, send, Answer, Gate};
use crate::synapse::{free_port, try_get, venv, Synapse, SERVER_NAME};

/// The provider's name in Synapse's configuration (`oidc-<idp_id>` in URLs).
const IDP_ID: &str = "mock";
const PICK: &str = "/_synapse/client/pick_username/account_details";
const CHECK: &str = "/_synapse/client/pick_username/check";
/// Where the client asks to land after sign-up: never fetched, Synapse
/// only appends the login token to it.
const CLIENT_LANDING: &str = "http://127.0.0.1:9/signed-in";

/// A running `oidc-provider-mock`, killed when dropped.
struct Provider {
    port: u16,
    child: Child,
}

impl Provider {
    /// Starts the provider on a free loopback port and waits until its
    /// discovery document answers.
    async fn start() -> Provider {
        let port = free_port();
        let child = Command::new(venv().join("bin/oidc-provider-mock"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start oidc-provider-mock");
        let provider = Provider { port, child };
        let discovery = format!("{}/.well-known/openid-configuration", provider.issuer());
        eventually(Duration::from_secs(30), "the provider answers", || async {
            try_get(&discovery).await == Ok(200)
        })
        .await;
        provider
    }

    /// The issuer, exactly as the provider writes it into its tokens.
    fn issuer(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets the claims the provider hands out for `sub`.
    async fn set_claims(&self, sub: &str, claims: serde_json::Value) {
        let answer = send(
            Method::PUT,
            &format!("{}/users/{sub}", self.issuer()),
            &[("content-type", "application/json")],
            claims.to_string(),
        )
        .await;
        assert_eq!(answer.status, 204, "{:?}", answer.body);
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Synapse's extra YAML: registration closed, the gate as public base URL,
/// and the provider with no `localpart_template`, so every new person is
/// shown the username picker; display name and email come from the claims
/// so the picker's form carries those fields too.
fn oidc_yaml(gate: &Gate, provider: &Provider) -> String {
    format!(
        "enable_registration: false\npublic_baseurl: \"{}/\"\n\
         oidc_providers: [{{idp_id: {IDP_ID}, idp_name: Mock, issuer: \"{}\", \
         client_id: gatekeeper-e2e, client_secret: e2e-secret, skip_verification: true, \
         scopes: [openid, profile, email], user_mapping_provider: {{config: \
         {{display_name_template: \"{{{{ user.name }}}}\", email_template: \"{{{{ user.email }}}}\"}}}}}}]\n",
        gate.url(""),
        provider.issuer()
    )
}

/// One cookie: name, value and the path it is sent under.
struct Cookie {
    name: String,
    value: String,
    path: String,
}

/// A client that keeps cookies like a browser on one loopback host.
/// Synapse marks its `oidc_session` cookie `Secure`; browsers send such
/// cookies to loopback over plain HTTP, and so does this client.
#[derive(Default)]
struct Browser {
    cookies: Vec<Cookie>,
}

impl Browser {
    /// One request with the cookies whose path covers the URL; keeps what
    /// the answer sets. A cookie set to an empty value is removed: that is
    /// how Synapse clears its cookies.
    async fn go(&mut self, method: Method, url: &str, form: Option<String>) -> Answer {
        let path = path_of(url);
        let cookie = self
            .cookies
            .iter()
            .filter(|c| path.starts_with(&c.path))
            .map(|c| format!("{}={}", c.name, c.value))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers = vec![("cookie", cookie.as_str())];
        if form.is_some() {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
        }
        let answer = send(method, url, &headers, form.unwrap_or_default()).await;
        for set in answer.headers.get_all(SET_COOKIE) {
            self.keep(set.to_str().expect("ASCII Set-Cookie"));
        }
        answer
    }

    fn keep(&mut self, set_cookie: &str) {
        let mut parts = set_cookie.split(';').map(str::trim);
        let (name, value) = parts
            .next()
            .and_then(|pair| pair.split_once('='))
            .expect("a cookie pair");
        let path = parts
            .filter_map(|attr| attr.split_once('='))
            .find(|(key, _)| key.eq_ignore_ascii_case("path"))
            .map_or("/", |(_, path)| path);
        self.cookies.retain(|c| c.name != name);
        if !value.is_empty() {
            self.cookies.push(Cookie {
                name: name.to_owned(),
                value: value.to_owned(),
                path: path.to_owned(),
            });
        }
    }

    /// Signs `sub` in at the provider, starting from the gate's SSO
    /// redirect, and returns the URL of the picker Synapse sends a new
    /// person to.
    async fn sign_in(&mut self, gate: &Gate, provider: &Provider, sub: &str) -> String {
        let start = gate.url(&format!(
            "/_matrix/client/v3/login/sso/redirect/oidc-{IDP_ID}?redirectUrl={CLIENT_LANDING}"
        ));
        let authorize = redirect(&self.go(Method::GET, &start, None).await, &start);
        assert!(
            authorize.starts_with(&format!("{}/oauth2/authorize?", provider.issuer())),
            "{authorize}"
        );
        let form = format!("sub={sub}");
        let callback = redirect(
            &self.go(Method::POST, &authorize, Some(form)).await,
            &authorize,
        );
        assert!(
            callback.starts_with(&gate.url("/_synapse/client/oidc/callback?")),
            "{callback}"
        );
        let picker = redirect(&self.go(Method::GET, &callback, None).await, &callback);
        assert_eq!(picker, gate.url(PICK));
        picker
    }

    /// The fields the picker's page would post besides the username: its
    /// checked checkboxes, as `(name, value)`.
    async fn picker_fields(&mut self, picker: &str) -> Vec<(String, String)> {
        let page = self.go(Method::GET, picker, None).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let html = std::str::from_utf8(&page.body).expect("UTF-8 page");
        assert!(html.contains("name=\"username\""), "{html}");
        html.split("<input")
            .skip(1)
            .filter_map(|tag| {
                let tag = &tag[..tag.find('>')?];
                (attribute(tag, "type")? == "checkbox" && tag.contains(" checked"))
                    .then(|| Some((attribute(tag, "name")?, attribute(tag, "value")?)))?
            })
            .collect()
    }

    /// The picker's availability check for `name`.
    async fn check(&mut self, gate: &Gate, name: &str) -> Answer {
        self.go(
            Method::GET,
            &gate.url(&format!("{CHECK}?username={name}")),
            None,
        )
        .await
    }

    /// Posts the picker's form with `username` and `fields`.
    async fn pick(&mut self, gate: &Gate, username: &str, fields: &[(String, String)]) -> Answer {
        let mut form = format!("username={username}");
        for (name, value) in fields {
            form.push_str(&format!("&{name}={}", crate::query_escape(value)));
        }
        self.go(Method::POST, &gate.url(PICK), Some(form)).await
    }

    /// Follows an accepted pick to the step where Synapse makes the account
    /// and returns the login token its "continue" page hands the client.
    async fn finish_sign_up(&mut self, gate: &Gate, accepted: &Answer) -> String {
        let next = redirect(accepted, &gate.url(PICK));
        assert_eq!(next, gate.url("/_synapse/client/sso_register"));
        let page = self.go(Method::GET, &next, None).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let html = std::str::from_utf8(&page.body).expect("UTF-8 page");
        let link = format!("{CLIENT_LANDING}?loginToken=");
        let start = html.find(&link).expect("the continue link") + link.len();
        html[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            .collect()
    }
}

/// The scheme and authority of a URL (`http://host:port`).
fn origin_of(url: &str) -> &str {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let end = url[authority..]
        .find('/')
        .map_or(url.len(), |i| authority + i);
    &url[..end]
}

/// The path of a URL (no query).
fn path_of(url: &str) -> &str {
    let rest = &url[origin_of(url).len()..];
    rest.split('?')
        .next()
        .filter(|p| !p.is_empty())
        .unwrap_or("/")
}

/// The absolute target of a redirect answered to a request for `from`.
fn redirect(answer: &Answer, from: &str) -> String {
    assert!(
        answer.status.is_redirection(),
        "expected a redirect from {from}: {} {:?}",
        answer.status,
        answer.body
    );
    let location = answer.headers[LOCATION].to_str().expect("ASCII Location");
    if location.starts_with('/') {
        format!("{}{location}", origin_of(from))
    } else {
        location.to_owned()
    }
}

/// An attribute's value in an HTML tag (double-quoted, as Synapse writes).
fn attribute(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = start + tag[start..].find('"')?;
    Some(tag[start..end].replace("&#64;", "@").replace("&amp;", "&"))
}

/// Synapse's own profile answer for a localpart (bypassing the gate).
async fn profile(synapse: &Synapse, localpart: &str) -> Answer {
    get(&format!(
        "{}/_matrix/client/v3/profile/@{localpart}:{SERVER_NAME}",
        synapse.url()
    ))
    .await
}

/// Asserts the gate's HTML refusal of a pick, with its marker header.
fn assert_refusal_page(answer: &Answer, status: u16, marker: &str) {
    assert_eq!(answer.status.as_u16(), status, "{:?}", answer.body);
    assert_eq!(answer.headers["content-type"], "text/html; charset=utf-8");
    assert_eq!(answer.headers["x-matrix-gatekeeper"], marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_sign_up_through_the_gate_refuses_reserved_picks_and_binds_the_registration_limit() {
    let provider = Provider::start().await;
    let synapse_port = free_port();
    let gate = crate::gate_for_upstream(
        &format!("http://127.0.0.1:{synapse_port}"),
        "[rate_limit]\nregistrations_per_ip = { count = 1, period = \"1h\" }\n",
    )
    .await;
    let synapse = Synapse::start_on(synapse_port, &oidc_yaml(&gate, &provider)).await;
    provider
        .set_claims(
            "person-one",
            json!({"email": "one@example.org", "name": "SSO Person"}),
        )
        .await;

    let mut person = Browser::default();
    let picker = person.sign_in(&gate, &provider, "person-one").await;
    let fields = person.picker_fields(&picker).await;
    assert_eq!(
        fields,
        [
            ("use_display_name".to_owned(), "true".to_owned()),
            ("use_email".to_owned(), "one@example.org".to_owned()),
        ]
    );

    // The names people got before the guard: refused by the check and by
    // the pick, and never made.
    for name in ["admin", "adm1n", "support"] {
        let check = person.check(&gate, name).await;
        assert_eq!(check.status, 200, "{:?}", check.body);
        assert_eq!(check.json()["available"], false);
        assert_eq!(check.errcode(), "M_USER_IN_USE");
        let refused = person.pick(&gate, name, &fields).await;
        assert_refusal_page(&refused, 400, "refused");
        assert_eq!(profile(&synapse, name).await.status, 404, "{name} made");
    }

    // A good name: Synapse's check says available, the pick is accepted with
    // a redirect, and the last step makes the account with the form's fields.
    let check = person.check(&gate, "ssoperson").await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    assert_eq!(check.json(), json!({"available": true}));
    let accepted = person.pick(&gate, "ssoperson", &fields).await;
    let token = person.finish_sign_up(&gate, &accepted).await;
    let login = post_json(
        &gate.url("/_matrix/client/v3/login"),
        &json!({"type": "m.login.token", "token": token}).to_string(),
    )
    .await;
    assert_eq!(login.status, 200, "{:?}", login.body);
    assert_eq!(
        login.json()["user_id"],
        format!("@ssoperson:{SERVER_NAME}").as_str()
    );
    let made = profile(&synapse, "ssoperson").await;
    assert_eq!(made.status, 200, "{:?}", made.body);
    assert_eq!(made.json()["displayname"], "SSO Person");
    let bearer = format!("Bearer {}", login.json()["access_token"].as_str().unwrap());
    let threepids = send(
        Method::GET,
        &format!("{}/_matrix/client/v3/account/3pid", synapse.url()),
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(
        threepids.json()["threepids"][0]["address"],
        "one@example.org"
    );

    // The registration limit binds: a second person's good pick is refused
    // and not made.
    provider
        .set_claims("person-two", json!({"email": "two@example.org"}))
        .await;
    let mut second = Browser::default();
    second.sign_in(&gate, &provider, "person-two").await;
    let limited = second.pick(&gate, "secondperson", &[]).await;
    assert_refusal_page(&limited, 429, "rate_limited");
    assert!(limited.headers.contains_key("retry-after"));
    assert_eq!(profile(&synapse, "secondperson").await.status, 404);
    for name in ["admin", "adm1n", "support"] {
        assert_eq!(profile(&synapse, name).await.status, 404, "{name} made");
    }
}
