//! `matrix-gatekeeper probe`: checks from outside, through the public base
//! URLs of a deployment, that every spelling of every registration route is
//! answered by the gate.
//!
//! The gate's guarantee holds only if every registration request reaches it.
//! A front proxy rule that wins over the gate's, or a second listener of the
//! homeserver (the federation port serving the client API too), lets some
//! spellings walk around it. The probe sends one harmless request per route
//! and spelling to every base URL and looks for the gate's marker header
//! ([`MARKER_HEADER`](crate::gate::MARKER_HEADER)), which the gate puts on every answer to a guarded
//! route — its refusals, its 429s and the homeserver answers it forwarded —
//! and which homeservers never send.
//!
//! Harmless means: nothing sent can create an account, send an e-mail or SMS,
//! or consume a registration token, even on a homeserver reached directly.
//! Every request is one the gate refuses whatever its policy (or, for the
//! admin nonce, a read the homeserver answers harmlessly), and one a
//! homeserver answers without side effects: a registration body with a
//! duplicate key and no `auth`, an availability or token check with the
//! parameter given twice, a `requestToken` body without any field, and a
//! `GET` of the shared-secret nonce.
//!
//! Besides, one read per base URL asks whether the homeserver delegates
//! registration to an OAuth 2.0 server, where the gate does not stand
//! (`delegation.rs`): a warning in the report, not a verdict.
//!
//! The client is a minimal HTTP/1.1 client of its own (`wire`), so that
//! every spelling goes on the wire exactly as written (general-purpose
//! clients normalize dot segments or refuse some escapes), over plain TCP
//! for `http://` and over TLS, verified against the public roots and any
//! `--ca-file`, for `https://`.

mod delegation;
mod report;
mod spelling;
mod wire;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
pub use rustls::pki_types::CertificateDer;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::HumanDuration;
pub use delegation::{Delegation, DelegationCheck, AUTH_METADATA_PATHS};
pub use report::{AnsweredBy, ProbeResult, Report, Summary};
pub use spelling::{
    spellings, Spelling, Variant, REGISTER_BODY, REQUEST_TOKEN_BODY, ROUTES, VARIANTS,
};
use wire::{Answer, AnswerHead, Read, Transport};

/// How long one probe may take (connect, send, answer head) by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes in flight at once per run: enough to finish a few hundred probes
/// quickly, few enough not to look like a flood to the front proxy.
const CONCURRENCY: usize = 8;

/// Exit status: every probe was answered by the gate.
pub const EXIT_GUARDED: u8 = 0;
/// Exit status: some probe reached something other than the gate, or got
/// no answer where others did.
pub const EXIT_NOT_GUARDED: u8 = 1;
/// Exit status: the probe could not run (a bad URL, or nothing answered at
/// a URL).
pub const EXIT_CANNOT_RUN: u8 = 2;

/// A bad probe invocation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// The URL cannot be probed.
    #[error("{url}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A `--host` value that cannot be a Host header.
    #[error("--host {0:?} is not a host name (with an optional port)")]
    BadHost(String),
    /// A host that cannot name a TLS server.
    #[error("{url}: cannot check a certificate for {reason}")]
    BadServerName {
        /// The `https://` URL.
        url: String,
        /// The host, and why it is no server name.
        reason: String,
    },
    /// A `--ca-file` that cannot be used.
    #[error("--ca-file {path}: {reason}")]
    BadCaFile {
        /// The path as given.
        path: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A zero timeout.
    #[error("--timeout must be more than 0")]
    ZeroTimeout,
    /// A timeout that is not a duration.
    #[error("--timeout: {0}")]
    BadTimeout(String),
}

/// The command's arguments checked: the base URLs and the options, the
/// certificates of `ca_file` read.
pub fn parse_arguments(
    urls: &[String],
    timeout: &str,
    host: Option<String>,
    ca_file: Option<&Path>,
) -> Result<(Vec<BaseUrl>, Options), ProbeError> {
    let timeout = HumanDuration::parse(timeout)
        .map_err(ProbeError::BadTimeout)?
        .0;
    let extra_roots = match ca_file {
        Some(path) => load_ca_file(path)?,
        None => Vec::new(),
    };
    let options = Options {
        timeout,
        host,
        extra_roots,
    };
    options.validate()?;
    let urls = urls
        .iter()
        .map(|url| BaseUrl::parse(url))
        .collect::<Result<Vec<_>, _>>()?;
    for url in &urls {
        if url.scheme == Scheme::Https {
            url.server_name(options.host.as_deref())?;
        }
    }
    Ok((urls, options))
}

/// The certificates of a PEM file, to be trusted besides the public roots
/// (`--ca-file`).
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, ProbeError> {
    wire::load_ca_file(path).map_err(|reason| ProbeError::BadCaFile {
        path: path.display().to_string(),
        reason,
    })
}

/// How a base URL is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP over TCP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// The port of a URL that names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A public base URL of the deployment: a scheme, a host, a port and an
/// optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    /// The URL as given, without a trailing `/`.
    pub text: String,
    /// `http://` or `https://`.
    pub scheme: Scheme,
    /// The host to connect to (an IPv6 address without brackets).
    host: String,
    /// The port to connect to.
    port: u16,
    /// `host[:port]` as written, the default `Host` header.
    authority: String,
    /// A path prefix put before every probe path (empty, or `/x` without a
    /// trailing `/`).
    prefix: String,
}

impl BaseUrl {
    /// Parses `http[s]://host[:port][/prefix]`.
    pub fn parse(text: &str) -> Result<BaseUrl, ProbeError> {
        let bad = |reason: &str| ProbeError::BadUrl {
            url: text.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = text
            .parse()
            .map_err(|_| bad("not a URL (expected https://host[:port])"))?;
        let scheme = match uri.scheme_str() {
            Some(scheme) if scheme.eq_ignore_ascii_case("http") => Scheme::Http,
            Some(scheme) if scheme.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(_) => return Err(bad("only http:// and https:// URLs can be probed")),
            None => return Err(bad("not a URL (expected https://host[:port])")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| bad("the URL names no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("a user name or password in the URL is not supported"));
        }
        if uri.query().is_some() || text.contains('#') {
            return Err(bad("a base URL has no query or fragment"));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(bad("the URL names no host"));
        }
        // `Authority::port_u16` reads an out-of-range or empty port as no
        // port at all, which would quietly probe the default port: check it
        // here.
        let port = match authority.as_str().rsplit_once(':') {
            Some((_, after)) if !after.contains(']') => match after.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(bad("the port must be a number from 1 to 65535")),
            },
            _ => scheme.default_port(),
        };
        let prefix = uri.path().trim_end_matches('/').to_owned();
        Ok(BaseUrl {
            text: text.trim_end_matches('/').to_owned(),
            scheme,
            host,
            port,
            authority: authority.as_str().to_owned(),
            prefix,
        })
    }

    /// A path and query with the URL's prefix put before it.
    fn target(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.prefix)
    }

    /// The full URL of `target` (prefix included) at this base URL.
    fn url_of(&self, target: &str) -> String {
        format!("{}://{}{target}", self.scheme.as_str(), self.authority)
    }

    /// The name the server's certificate must be valid for, also sent as
    /// SNI: the host part of `host_header` (`--host`) when given, since a
    /// tunnel's or an address's certificate is the public name's; else the
    /// URL's host.
    pub fn server_name(
        &self,
        host_header: Option<&str>,
    ) -> Result<rustls::pki_types::ServerName<'static>, ProbeError> {
        let host = host_header.map_or(self.host.as_str(), wire::host_part);
        wire::server_name(host).map_err(|reason| ProbeError::BadServerName {
            url: self.text.clone(),
            reason,
        })
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The longest one probe may take.
    pub timeout: Duration,
    /// The `Host` header to send instead of each URL's authority; its host
    /// part is also the TLS server name.
    pub host: Option<String>,
    /// Roots trusted for `https://` URLs besides the public ones
    /// (`--ca-file`).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: DEFAULT_TIMEOUT,
            host: None,
            extra_roots: Vec::new(),
        }
    }
}

impl Options {
    /// Checks the options: a non-zero timeout, a plausible host.
    pub fn validate(&self) -> Result<(), ProbeError> {
        if self.timeout.is_zero() {
            return Err(ProbeError::ZeroTimeout);
        }
        if let Some(host) = &self.host {
            let plausible = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
            if !plausible {
                return Err(ProbeError::BadHost(host.clone()));
            }
        }
        Ok(())
    }
}

/// Sends every spelling to every URL and collects who answered.
pub async fn run(urls: &[BaseUrl], options: &Options) -> Report {
    let spellings = spellings();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    // One TLS configuration for the run: its session cache lets later
    // connections to the same server resume rather than redo the handshake.
    let tls = urls
        .iter()
        .any(|url| url.scheme == Scheme::Https)
        .then(|| wire::tls_connector(&options.extra_roots));
    let mut tasks = JoinSet::new();
    let mut checks = JoinSet::new();
    let mut index = 0usize;
    for (position, base) in urls.iter().enumerate() {
        let transport = Arc::new(transport_for(base, options, tls.as_ref()));
        {
            let (base, options, transport) = (base.clone(), options.clone(), transport.clone());
            checks.spawn(async move {
                let check = delegation::check(&base, &options, &transport).await;
                (position, check)
            });
        }
        for spelling in &spellings {
            let base = base.clone();
            let spelling = spelling.clone();
            let options = options.clone();
            let permits = permits.clone();
            let transport = transport.clone();
            let position = index;
            index += 1;
            tasks.spawn(async move {
                // The semaphore is never closed, so a permit always comes.
                let _permit = permits.acquire_owned().await.ok();
                let result = probe_one(&base, &spelling, &options, &transport).await;
                (position, result)
            });
        }
    }
    let mut results: Vec<Option<ProbeResult>> = vec![None; index];
    while let Some(joined) = tasks.join_next().await {
        // A probe task does not panic; should one, its row stays missing
        // rather than taking the whole report down.
        if let Ok((position, result)) = joined {
            results[position] = Some(result);
        }
    }
    let mut delegation: Vec<Option<DelegationCheck>> = vec![None; urls.len()];
    while let Some(joined) = checks.join_next().await {
        if let Ok((position, check)) = joined {
            delegation[position] = Some(check);
        }
    }
    Report {
        urls: urls.iter().map(|u| u.text.clone()).collect(),
        probes: results.into_iter().flatten().collect(),
        delegation: delegation.into_iter().flatten().collect(),
    }
}

/// How `base` is reached, or why it cannot be (then every probe there is
/// unanswered with that reason).
fn transport_for(
    base: &BaseUrl,
    options: &Options,
    tls: Option<&Result<tokio_rustls::TlsConnector, String>>,
) -> Result<Transport, String> {
    match base.scheme {
        Scheme::Http => Ok(Transport::Plain),
        Scheme::Https => {
            let connector = match tls {
                Some(Ok(connector)) => connector.clone(),
                Some(Err(error)) => return Err(error.clone()),
                None => return Err("TLS setup: no configuration".to_owned()),
            };
            let server_name = base
                .server_name(options.host.as_deref())
                .map_err(|error| error.to_string())?;
            Ok(Transport::Tls {
                connector,
                server_name,
            })
        }
    }
}

/// Who gave an answer: the gate marks its own; a homeserver answers these
/// routes with JSON (Synapse, Conduit and Dendrite alike, errors included);
/// anything else was made in front of the homeserver. Unsure cases count
/// against the deployment: a JSON answer without the marker is taken for the
/// homeserver's.
fn classify_answer(head: &AnswerHead) -> AnsweredBy {
    if head.marker.is_some() {
        return AnsweredBy::Gate;
    }
    let json = head.content_type.as_deref().is_some_and(|value| {
        let essence = value.split(';').next().unwrap_or("").trim();
        essence.eq_ignore_ascii_case("application/json")
            || essence.to_ascii_lowercase().ends_with("+json")
    });
    if json || head.content_type.is_none() && head.status == 200 {
        AnsweredBy::Homeserver
    } else {
        AnsweredBy::Front
    }
}

async fn probe_one(
    base: &BaseUrl,
    spelling: &Spelling,
    options: &Options,
    transport: &Result<Transport, String>,
) -> ProbeResult {
    let target = base.target(&spelling.target);
    let mut result = ProbeResult {
        route: spelling.route.canonical_path().into_owned(),
        spelling: spelling.variant.name().to_owned(),
        method: spelling.method,
        url: base.url_of(&target),
        base_url: base.text.clone(),
        answered_by: AnsweredBy::Nothing,
        status: None,
        marker: None,
        server: None,
        content_type: None,
        error: None,
        label: spelling.label(),
    };
    let transport = match transport {
        Ok(transport) => transport,
        Err(error) => {
            result.error = Some(error.clone());
            return result;
        }
    };
    let request = Request {
        method: spelling.method,
        target: &target,
        body: spelling.body,
    };
    match exchange(base, &request, options, transport, Read::Head).await {
        Ok(answer) => {
            let head = answer.head;
            result.answered_by = classify_answer(&head);
            result.status = Some(head.status);
            result.marker = head.marker;
            result.server = head.server;
            result.content_type = head.content_type;
        }
        Err(error) => result.error = Some(error),
    }
    result
}

/// One request to a base URL.
struct Request<'a> {
    method: &'static str,
    /// Path and query, the base URL's prefix included.
    target: &'a str,
    body: Option<&'static str>,
}

/// Sends `request` to `base` and reads the answer as `read` says, within
/// the run's timeout.
async fn exchange(
    base: &BaseUrl,
    request: &Request<'_>,
    options: &Options,
    transport: &Transport,
    read: Read,
) -> Result<Answer, String> {
    let host = options.host.as_deref().unwrap_or(&base.authority);
    let bytes = wire::request_bytes(request.method, request.target, host, request.body);
    let sent = wire::send(&base.host, base.port, transport, &bytes, read);
    match tokio::time::timeout(options.timeout, sent).await {
        Ok(answer) => answer,
        Err(_) => Err(format!("no answer within {:?}", options.timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::routes::{ApiVersion, GuardedRoute};

    #[test]
    fn answers_without_the_marker_are_the_homeservers_only_when_json() {
        let head = |marker: Option<&str>, content_type: Option<&str>, status| AnswerHead {
            status,
            marker: marker.map(str::to_owned),
            server: None,
            content_type: content_type.map(str::to_owned),
        };
        let cases = [
            (
                head(Some("refused"), Some("application/json"), 400),
                AnsweredBy::Gate,
            ),
            (head(Some("allowed"), None, 502), AnsweredBy::Gate),
            (
                head(None, Some("application/json"), 401),
                AnsweredBy::Homeserver,
            ),
            (
                head(None, Some("Application/JSON; charset=utf-8"), 404),
                AnsweredBy::Homeserver,
            ),
            (
                head(None, Some("application/problem+json"), 400),
                AnsweredBy::Homeserver,
            ),
            (head(None, None, 200), AnsweredBy::Homeserver),
            (head(None, Some("text/html"), 404), AnsweredBy::Front),
            (
                head(None, Some("text/plain; charset=utf-8"), 400),
                AnsweredBy::Front,
            ),
            (head(None, None, 404), AnsweredBy::Front),
        ];
        for (answer, expected) in cases {
            assert_eq!(
                classify_answer(&answer),
                expected,
                "{:?} {:?} {}",
                answer.marker,
                answer.content_type,
                answer.status
            );
        }
    }

    #[test]
    fn base_urls_are_http_or_https_with_an_optional_prefix() {
        let url = BaseUrl::parse("http://example.org:8448/").expect("valid");
        assert_eq!(url.scheme, Scheme::Http);
        assert_eq!(
            (
                url.host.as_str(),
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            ("example.org", 8448, "example.org:8448", "")
        );
        let url = BaseUrl::parse("http://[::1]/matrix/").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 80));
        assert_eq!(url.prefix, "/matrix");
        let url = BaseUrl::parse("HTTP://[::1]:8008").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 8008));
        for bad in ["ftp://example.org", "ws://example.org"] {
            match BaseUrl::parse(bad) {
                Err(ProbeError::BadUrl { reason, .. }) => {
                    assert!(reason.contains("only http:// and https://"), "{reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        for (bad, why) in [
            ("ftp://example.org", "only http://"),
            ("https://example.org:0", "port"),
            ("https://example.org:", "port"),
            ("example.org", "not a URL"),
            ("http://user:pw@example.org", "user name"),
            ("http://example.org/?x=1", "no query"),
            ("http://example.org/#top", "no query or fragment"),
            ("http://example.org:99999", "port"),
            ("http://example.org:0", "port"),
            ("http://example.org:", "port"),
            ("http://[::1]:", "port"),
            ("", "not a URL"),
            ("http://exa mple.org", "not a URL"),
        ] {
            match BaseUrl::parse(bad) {
                Err(ProbeError::BadUrl { reason, .. }) => {
                    assert!(reason.contains(why), "{bad}: {reason}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn https_urls_default_to_port_443() {
        let url = BaseUrl::parse("https://matrix.example.org").expect("valid");
        assert_eq!(
            (
                url.scheme,
                url.host.as_str(),
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            (
                Scheme::Https,
                "matrix.example.org",
                443,
                "matrix.example.org",
                ""
            )
        );
        let url = BaseUrl::parse("HTTPS://matrix.example.org:8448/matrix/").expect("valid");
        assert_eq!(
            (
                url.scheme,
                url.port,
                url.authority.as_str(),
                url.prefix.as_str()
            ),
            (Scheme::Https, 8448, "matrix.example.org:8448", "/matrix")
        );
        let url = BaseUrl::parse("https://[::1]").expect("valid");
        assert_eq!((url.host.as_str(), url.port), ("::1", 443));
        // Plain HTTP keeps its own default.
        let url = BaseUrl::parse("http://matrix.example.org").expect("valid");
        assert_eq!(url.port, 80);
    }

    #[test]
    fn the_tls_server_name_is_the_host_header_s_host_when_given() {
        use rustls::pki_types::ServerName;
        let dns = |name: &str| ServerName::try_from(name.to_owned()).expect("a DNS name");
        let url = BaseUrl::parse("https://127.0.0.1:8443").expect("valid");
        assert!(matches!(
            url.server_name(None),
            Ok(ServerName::IpAddress(_))
        ));
        for host in [
            "matrix.example.org",
            "matrix.example.org:8448",
            "matrix.example.org:443",
        ] {
            assert_eq!(
                url.server_name(Some(host)),
                Ok(dns("matrix.example.org")),
                "{host}"
            );
        }
        assert!(matches!(
            url.server_name(Some("[::1]:8448")),
            Ok(ServerName::IpAddress(_))
        ));
        let url = BaseUrl::parse("https://matrix.example.org:8448").expect("valid");
        assert_eq!(url.server_name(None), Ok(dns("matrix.example.org")));
        assert_eq!(
            url.server_name(Some("other.example.org")),
            Ok(dns("other.example.org"))
        );
        // A --host that is a valid Host header but no server name stops the
        // run before anything is sent.
        let urls = ["https://127.0.0.1:8443".to_owned()];
        let error = parse_arguments(&urls, "5s", Some("matrix..example.org".to_owned()), None)
            .err()
            .map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("cannot check a certificate")),
            "{error:?}"
        );
    }

    #[test]
    fn requests_go_on_the_wire_as_spelled() {
        let spelling = spellings()
            .into_iter()
            .find(|s| {
                s.route == GuardedRoute::Register(ApiVersion::V3)
                    && s.variant == Variant::DotSegments
            })
            .expect("the spelling exists");
        let bytes = wire::request_bytes(
            spelling.method,
            &spelling.target,
            "example.org",
            spelling.body,
        );
        let text = String::from_utf8(bytes).expect("ASCII");
        assert!(
            text.starts_with("POST /_matrix/client/v3/./probe/../register HTTP/1.1\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nHost: example.org\r\n"));
        assert!(text.ends_with(&format!(
            "Content-Length: {}\r\n\r\n{REGISTER_BODY}",
            REGISTER_BODY.len()
        )));
    }
}
