//! Lists fetched from URLs: the fetch, and the refresher that repeats it.
//!
//! A fetch is one `GET` over HTTP/1.1 (TLS with the ring provider and the
//! built-in public roots, plus `[reputation] list_ca_file`), conditional
//! on the copy's `ETag` and `Last-Modified`, within `list_timeout` from
//! connecting to the last byte, and refused past `list_max_bytes`. A
//! redirect is not followed (the answer is a failure naming where it
//! points): the configured URL is the list's source, and an https URL
//! never ends up read over http.
//!
//! A `200` answer is checked whole by the parser the configuration loader
//! uses for its kind ([`ListKind::check`]); only a usable list is written,
//! to a temporary name in the copies' directory renamed into place. A
//! failed fetch — no connection, a TLS failure, a status other than 200 or
//! 304, a cut or oversized body, a list that does not parse — changes
//! nothing: the copy on disk and the lists in force stay, and the failure
//! is logged and counted.
//!
//! The refresher is one task. It fetches each list `list_refresh` after
//! the last fetch that succeeded (at once for a list with no copy, and a
//! minute after a failure at most), and reloads the configuration when a
//! copy changed or a list must enter or leave the lists in force; the
//! configuration loader reads the copies (`lists::source`). A list whose
//! last successful fetch is older than `list_max_age` is stale: logged,
//! announced by a `list_stale` webhook event, shown by the metrics, and
//! with `on_stale_list = "drop"` no longer used until a fetch succeeds.

use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;

use super::source::hex;
use super::{CopyState, ListKind, RemoteList, Sidecar, UrlEntry};
use crate::error::ErrorChain;
use crate::notify::{Event, Notifier};
use crate::telemetry::{ListFetch, Metrics};

/// Longest wait before a failed fetch is tried again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(60);

/// How lists are fetched: `[reputation] list_timeout`, `list_max_bytes`
/// and the TLS client.
pub struct FetchSettings {
    /// Longest wait for one fetch, connecting to the last byte.
    pub timeout: Duration,
    /// Largest body read.
    pub max_bytes: u64,
    /// The TLS client (an error when it could not be set up).
    connector: Result<TlsConnector, String>,
}

impl FetchSettings {
    /// Fetches bounded by `timeout` and `max_bytes`, over TLS checked
    /// against the built-in roots and `extra_roots`.
    pub fn new(timeout: Duration, max_bytes: u64, extra_roots: &[CertificateDer<'static>]) -> Self {
        FetchSettings {
            timeout,
            max_bytes,
            connector: crate::tls::tls_connector(extra_roots),
        }
    }
}

/// What a fetch that succeeded did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// A new list was written.
    Changed,
    /// The list was sent again, the same as the copy.
    Unchanged,
    /// `304 Not Modified`.
    NotModified,
}

/// An answer worth keeping.
enum Answer {
    NotModified,
    List {
        body: Vec<u8>,
        etag: Option<String>,
        last_modified: Option<String>,
    },
}

/// Fetches `list` once and, when the answer is a usable list of `kind`,
/// writes its copy (and always, on success, the sidecar). An error says
/// why nothing was written.
pub async fn fetch_and_store(
    kind: ListKind,
    list: &RemoteList,
    settings: &FetchSettings,
) -> Result<Fetched, String> {
    let have_copy = list.copy.exists();
    let mut sidecar = if have_copy {
        Sidecar::read(&list.sidecar)
    } else {
        Sidecar::default()
    };
    let answer = tokio::time::timeout(settings.timeout, get(&list.entry, &sidecar, settings))
        .await
        .map_err(|_| {
            format!(
                "no complete answer within {:?} (reputation.list_timeout)",
                settings.timeout
            )
        })??;
    sidecar.url = list.entry.shown.to_string();
    sidecar.fetched_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (body, etag, last_modified) = match answer {
        Answer::NotModified => {
            let path = list.sidecar.clone();
            blocking(move || write_sidecar(&path, &sidecar)).await?;
            return Ok(Fetched::NotModified);
        }
        Answer::List {
            body,
            etag,
            last_modified,
        } => (body, etag, last_modified),
    };
    let shown = list.entry.shown.clone();
    let copy = list.copy.clone();
    let sidecar_path = list.sidecar.clone();
    blocking(move || {
        kind.check(&shown, &body)
            .map_err(|error| format!("not a usable list: {error}"))?;
        let digest = hex(ring::digest::digest(&ring::digest::SHA256, &body).as_ref());
        let same = have_copy && copy.exists() && digest == sidecar.sha256;
        sidecar.etag = etag;
        sidecar.last_modified = last_modified;
        sidecar.sha256 = digest;
        if !same {
            write_atomically(&copy, &body)
                .map_err(|error| format!("cannot write {}: {error}", copy.display()))?;
        }
        write_sidecar(&sidecar_path, &sidecar)?;
        Ok(if same {
            Fetched::Unchanged
        } else {
            Fetched::Changed
        })
    })
    .await
}

/// Runs file work (and the parse of a large list) off the runtime's
/// workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| format!("did not finish: {error}"))?
}

fn write_sidecar(path: &Path, sidecar: &Sidecar) -> Result<(), String> {
    let json = serde_json::to_vec_pretty(sidecar).map_err(|error| error.to_string())?;
    write_atomically(path, &json)
        .map_err(|error| format!("cannot write {}: {error}", path.display()))
}

/// Writes `bytes` to a temporary name beside `path`, then renames it into
/// place: a reader sees the old file or the new one, never part of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("list");
    let temporary = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Connects (TLS for `https://`) and makes the request.
async fn get(
    url: &UrlEntry,
    sidecar: &Sidecar,
    settings: &FetchSettings,
) -> Result<Answer, String> {
    let uri: http::Uri = url.url.parse().map_err(|_| "not a URL".to_owned())?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().ok_or("no host in the URL")?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(
            header::HOST,
            match uri.port_u16() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            },
        )
        .header(
            header::USER_AGENT,
            concat!("matrix-gatekeeper/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::ACCEPT_ENCODING, "identity")
        .header(header::CONNECTION, "close");
    if let Some(credentials) = basic_credentials(&uri) {
        request = request.header(header::AUTHORIZATION, credentials);
    }
    let conditional = [
        (header::IF_NONE_MATCH, &sidecar.etag),
        (header::IF_MODIFIED_SINCE, &sidecar.last_modified),
    ];
    let mut asked_conditionally = false;
    for (name, value) in conditional {
        if let Some(value) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            request = request.header(name, value);
            asked_conditionally = true;
        }
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|error| format!("cannot make the request: {error}"))?;
    let tcp = TcpStream::connect((bare_host, port))
        .await
        .map_err(|error| format!("cannot connect to {host}:{port}: {error}"))?;
    let _ = tcp.set_nodelay(true);
    if https {
        let connector = settings.connector.as_ref().map_err(Clone::clone)?;
        let name = crate::tls::server_name(bare_host)?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|error| format!("TLS handshake with {host}:{port}: {error}"))?;
        exchange(tls, request, asked_conditionally, settings.max_bytes).await
    } else {
        exchange(tcp, request, asked_conditionally, settings.max_bytes).await
    }
}

/// Aborts the connection task when the exchange ends, however it ends.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn exchange<S>(
    stream: S,
    request: Request<Empty<Bytes>>,
    asked_conditionally: bool,
    max_bytes: u64,
) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("HTTP handshake: {}", ErrorChain(&error)))?;
    let _connection = AbortOnDrop(tokio::spawn(connection).abort_handle());
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("no answer: {}", ErrorChain(&error)))?;
    let status = response.status();
    let text = |name: header::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    match status {
        StatusCode::OK => {}
        StatusCode::NOT_MODIFIED if asked_conditionally => return Ok(Answer::NotModified),
        _ if status.is_redirection() => {
            let location = text(header::LOCATION)
                .map(|to| format!(" to {}", super::shown_url(&to)))
                .unwrap_or_default();
            return Err(format!(
                "answered {status}{location}: redirects are not followed; configure the URL of the list itself"
            ));
        }
        _ => return Err(format!("answered {status}")),
    }
    let etag = text(header::ETAG);
    let last_modified = text(header::LAST_MODIFIED);
    let announced = text(header::CONTENT_LENGTH).and_then(|length| length.parse::<u64>().ok());
    if let Some(length) = announced.filter(|&length| length > max_bytes) {
        return Err(format!(
            "announces {length} bytes, more than reputation.list_max_bytes ({max_bytes})"
        ));
    }
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            format!(
                "the answer was cut after {} bytes: {}",
                bytes.len(),
                ErrorChain(&error)
            )
        })?;
        if let Ok(data) = frame.into_data() {
            if (bytes.len() + data.len()) as u64 > max_bytes {
                return Err(format!(
                    "longer than reputation.list_max_bytes ({max_bytes} bytes)"
                ));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Answer::List {
        body: bytes,
        etag,
        last_modified,
    })
}

/// `Basic …` for a URL's `user:password@`, percent-decoded.
fn basic_credentials(uri: &http::Uri) -> Option<HeaderValue> {
    let (userinfo, _) = uri.authority()?.as_str().rsplit_once('@')?;
    let decoded = percent_decode(userinfo);
    let mut value = HeaderValue::from_str(&format!("Basic {}", base64(&decoded))).ok()?;
    value.set_sensitive(true);
    Some(value)
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_pair = bytes
            .get(i + 1..i + 3)
            .and_then(|pair| std::str::from_utf8(pair).ok())
            .and_then(|pair| u8::from_str_radix(pair, 16).ok());
        match (bytes[i], hex_pair) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The lists fetched from URLs in the configuration in force, and how to
/// fetch them: what the refresher works from.
#[derive(Clone)]
pub struct RemoteSet {
    /// The lists, their kind, and how the configuration loaded them.
    pub lists: Vec<(ListKind, RemoteList)>,
    /// `[reputation] list_refresh`.
    pub refresh: Duration,
    /// `[reputation] list_max_age`.
    pub max_age: Duration,
    /// `[reputation] on_stale_list = "drop"`.
    pub drop_stale: bool,
    /// How to fetch.
    pub settings: Arc<FetchSettings>,
}

impl std::fmt::Debug for RemoteSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteSet")
            .field("lists", &self.lists)
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

/// At start: fetches every list of `set` that has no copy yet. A failure
/// is logged; for a list not marked optional it is returned (the gate does
/// not start without it). `Ok(true)` when a copy was written (the lists
/// are to be loaded again).
pub async fn fetch_missing(set: &RemoteSet) -> Result<bool, String> {
    let missing = set
        .lists
        .iter()
        .filter(|(_, list)| list.state == CopyState::Missing);
    let mut fetched = false;
    for (kind, list) in missing {
        let (kind, shown) = (*kind, &list.entry.shown);
        match fetch_and_store(kind, list, &set.settings).await {
            Ok(_) => {
                tracing::info!(key = kind.key(), list = %shown, "list fetched");
                fetched = true;
            }
            Err(error) if list.entry.optional => tracing::warn!(
                key = kind.key(),
                list = %shown,
                %error,
                "list not fetched; it is optional, so the gate starts with it empty and keeps trying"
            ),
            Err(error) => {
                return Err(format!(
                    "{}: {shown} could not be fetched and has no copy in {}: {error} \
                     (mark it {{ url = \"…\", optional = true }} to start without it)",
                    kind.key(),
                    list.copy.parent().unwrap_or(Path::new(".")).display()
                ))
            }
        }
    }
    Ok(fetched)
}

/// What the refresher knows of one list.
struct Tracked {
    next_fetch: Instant,
    last_success: Option<SystemTime>,
    have_copy: bool,
    stale: bool,
    /// The state a reload was last asked to bring the list to.
    asked: Option<CopyState>,
}

/// Refreshes the lists of the configuration in force (`set`, replaced at
/// every reload) until the sender is dropped; `reload` reloads the
/// configuration (off the runtime) when a copy changed or a list must
/// enter or leave the lists in force.
pub async fn refresh_lists<R, F>(
    mut set: watch::Receiver<RemoteSet>,
    metrics: Arc<Metrics>,
    notifier: Notifier,
    reload: R,
) where
    R: Fn() -> F,
    F: Future<Output = ()>,
{
    let mut tracked: HashMap<Arc<str>, Tracked> = HashMap::new();
    loop {
        let current = set.borrow_and_update().clone();
        tracked.retain(|url, _| current.lists.iter().any(|(_, l)| &l.entry.url == url));
        metrics.keep_lists(current.lists.iter().map(|(_, l)| l.entry.shown.clone()));
        let mut must_reload = false;
        for (kind, list) in &current.lists {
            let shown = &list.entry.shown;
            let state = tracked.entry(list.entry.url.clone()).or_insert_with(|| {
                let last_success = Sidecar::read(&list.sidecar).last_success(&list.copy);
                let have_copy = list.copy.exists();
                // Due at once without a copy (or with one of unknown age).
                let since = last_success
                    .filter(|_| have_copy)
                    .and_then(|at| SystemTime::now().duration_since(at).ok())
                    .unwrap_or(Duration::MAX);
                Tracked {
                    next_fetch: Instant::now() + current.refresh.saturating_sub(since),
                    last_success: last_success.filter(|_| have_copy),
                    have_copy,
                    stale: false,
                    asked: None,
                }
            });
            if Instant::now() >= state.next_fetch {
                match fetch_and_store(*kind, list, &current.settings).await {
                    Ok(fetched) => {
                        // As the configuration loader will read it.
                        state.last_success = Sidecar::read(&list.sidecar)
                            .last_success(&list.copy)
                            .or(Some(SystemTime::now()));
                        state.have_copy = true;
                        state.next_fetch = Instant::now() + current.refresh;
                        let result = match fetched {
                            Fetched::Changed => {
                                tracing::info!(key = kind.key(), list = %shown, "list fetched: changed");
                                must_reload = true;
                                ListFetch::Ok
                            }
                            Fetched::Unchanged => {
                                tracing::debug!(key = kind.key(), list = %shown, "list fetched: unchanged");
                                ListFetch::Ok
                            }
                            Fetched::NotModified => {
                                tracing::debug!(key = kind.key(), list = %shown, "list not modified");
                                ListFetch::NotModified
                            }
                        };
                        metrics.list_fetched(shown, result);
                    }
                    Err(error) => {
                        state.next_fetch =
                            Instant::now() + current.refresh.min(RETRY_AFTER_FAILURE);
                        metrics.list_fetched(shown, ListFetch::Error);
                        if state.have_copy {
                            tracing::warn!(key = kind.key(), list = %shown, %error, "list not refreshed; the last good copy stays in force");
                        } else {
                            tracing::warn!(key = kind.key(), list = %shown, %error, "list not fetched; it stays empty until a fetch succeeds");
                        }
                    }
                }
            }
            let age = state
                .last_success
                .and_then(|at| SystemTime::now().duration_since(at).ok());
            let stale = age.is_some_and(|age| age > current.max_age);
            if stale && !state.stale {
                let action = if current.drop_stale {
                    "dropped"
                } else {
                    "kept"
                };
                let age = age.unwrap_or_default().as_secs();
                tracing::error!(
                    key = kind.key(),
                    list = %shown,
                    age_seconds = age,
                    max_age = ?current.max_age,
                    action,
                    "list stale: not refreshed for longer than reputation.list_max_age"
                );
                notifier.send(Event::ListStale {
                    key: kind.key().to_owned(),
                    list: shown.to_string(),
                    age_seconds: age,
                    action: action.to_owned(),
                });
            } else if !stale && state.stale {
                tracing::info!(key = kind.key(), list = %shown, "list refreshed again; no longer stale");
            }
            state.stale = stale;
            metrics.list_state(shown, state.last_success, stale);
            let wanted = if !state.have_copy {
                CopyState::Missing
            } else if stale && current.drop_stale {
                CopyState::Dropped
            } else {
                CopyState::Loaded
            };
            if wanted == list.state {
                state.asked = None;
            } else if state.asked != Some(wanted) {
                state.asked = Some(wanted);
                must_reload = true;
            }
        }
        if must_reload {
            reload().await;
            // The reload replaced `set` when it succeeded: look again.
            continue;
        }
        let now = SystemTime::now();
        let wake = tracked
            .values()
            .flat_map(|state| {
                // When a list still fresh turns stale.
                let stale_at = state
                    .last_success
                    .filter(|_| !state.stale)
                    .map(|at| at + current.max_age + Duration::from_millis(1))
                    .map(|at| Instant::now() + at.duration_since(now).unwrap_or_default());
                [Some(state.next_fetch), stale_at]
            })
            .flatten()
            .min();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            changed = set.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_base64_of_the_decoded_userinfo() {
        assert_eq!(
            base64(b"Aladdin:open sesame"),
            "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(percent_decode("a%3Ab%zz%4"), b"a:b%zz%4");
        let uri: http::Uri = "https://gate:p%40ss@lists.example.org/x".parse().unwrap();
        assert_eq!(
            basic_credentials(&uri).unwrap(),
            format!("Basic {}", base64(b"gate:p@ss"))
        );
        let uri: http::Uri = "https://lists.example.org/x".parse().unwrap();
        assert!(basic_credentials(&uri).is_none());
    }
}
