//! Where a list comes from: a file, or a URL fetched into a copy under
//! `[server] state_dir`.
//!
//! A configured entry is a path (`"/etc/matrix-gatekeeper/tor-exits.txt"`),
//! a URL (`"https://lists.example.org/tor-exits.txt"`), or a table
//! `{ url = "https://…", optional = true }`. A URL's list is read from its
//! copy, `state_dir/lists/<SHA-256 of the URL, hex>.txt`, exactly as a file
//! is read (same parsers, same errors); beside it
//! `<same name>.json` keeps the answer's `ETag` and `Last-Modified`, the
//! copy's digest, and when a fetch last succeeded. The fetcher
//! ([`super::remote`]) writes both, a temporary name renamed into place.
//!
//! A URL is never shown whole: its user and password and the values of its
//! query are replaced by `***` ([`shown_url`]) in errors, logs, metric
//! labels, audit lines and `check`'s output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::{read_labeled, read_unchanged, ListError, Stamp};

/// One configured list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListEntry {
    /// A file, by its path as configured.
    File(String),
    /// A URL fetched into `state_dir`.
    Url(UrlEntry),
}

/// A list fetched from a URL.
#[derive(Clone, PartialEq, Eq)]
pub struct UrlEntry {
    /// The URL as configured (may hold a secret: never shown).
    pub url: Arc<str>,
    /// The URL as shown: [`shown_url`].
    pub shown: Arc<str>,
    /// Whether the gate may start without any copy of it (empty until the
    /// first fetch succeeds).
    pub optional: bool,
}

impl std::fmt::Debug for UrlEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UrlEntry")
            .field("url", &self.shown)
            .field("optional", &self.optional)
            .finish()
    }
}

impl UrlEntry {
    fn parse(url: &str, optional: bool) -> Result<UrlEntry, String> {
        let shown = shown_url(url);
        let uri: http::Uri = url.parse().map_err(|_| format!("not a URL: \"{shown}\""))?;
        if !matches!(uri.scheme_str(), Some("https" | "http")) || uri.host().is_none() {
            return Err(format!(
                "expected an https:// or http:// URL with a host, got \"{shown}\""
            ));
        }
        Ok(UrlEntry {
            url: Arc::from(url),
            shown: Arc::from(shown.as_str()),
            optional,
        })
    }

    /// The copy of the list under `state_dir`.
    pub fn copy_path(&self, state_dir: &Path) -> PathBuf {
        lists_dir(state_dir).join(format!("{}.txt", self.file_stem()))
    }

    /// What is known of the copy (validators, last success) under
    /// `state_dir`.
    pub fn sidecar_path(&self, state_dir: &Path) -> PathBuf {
        lists_dir(state_dir).join(format!("{}.json", self.file_stem()))
    }

    /// A name stable for the URL and safe in a file system: the hex of its
    /// SHA-256.
    fn file_stem(&self) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, self.url.as_bytes()).as_ref())
    }
}

/// Where fetched lists are kept.
pub fn lists_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("lists")
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &byte in bytes {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

/// Whether a configured string is a URL rather than a path.
fn is_url(text: &str) -> bool {
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// A list URL as it may be shown: the user and password replaced by
/// `***`, every query value replaced by `***` (`?key=***&x=***`), the
/// fragment dropped; scheme, host, port and path kept, as they name the
/// list.
pub fn shown_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or(url);
    let Some((scheme, rest)) = url.split_once("://") else {
        return "(not a URL)".to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((_, host)) => format!("***@{host}"),
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((name, _)) => format!("{name}=***"),
                    None if pair.is_empty() => String::new(),
                    None => "***".to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

impl<'de> Deserialize<'de> for ListEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d)? {
            toml::Value::String(text) if is_url(&text) => UrlEntry::parse(&text, false)
                .map(ListEntry::Url)
                .map_err(de::Error::custom),
            toml::Value::String(text) if text.is_empty() => {
                Err(de::Error::custom("expected a path or a URL, got \"\""))
            }
            toml::Value::String(text) => Ok(ListEntry::File(text)),
            toml::Value::Table(mut table) => {
                let url = match table.remove("url") {
                    Some(toml::Value::String(url)) => url,
                    _ => {
                        return Err(de::Error::custom(
                            "expected { url = \"https://…\", optional = true }: url is missing or not a string",
                        ))
                    }
                };
                let optional = match table.remove("optional") {
                    None => false,
                    Some(toml::Value::Boolean(optional)) => optional,
                    Some(other) => {
                        return Err(de::Error::custom(format!(
                            "optional: expected true or false, got {other}"
                        )))
                    }
                };
                if let Some(key) = table.keys().next() {
                    return Err(de::Error::custom(format!(
                        "unknown field `{key}`, expected `url` or `optional`"
                    )));
                }
                if !is_url(&url) {
                    return Err(de::Error::custom(format!(
                        "url: expected an https:// or http:// URL, got \"{}\"",
                        shown_url(&url)
                    )));
                }
                UrlEntry::parse(&url, optional)
                    .map(ListEntry::Url)
                    .map_err(de::Error::custom)
            }
            other => Err(de::Error::custom(format!(
                "expected a path, a URL or {{ url = \"https://…\", optional = true }}, got {other}"
            ))),
        }
    }
}

impl Serialize for ListEntry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            ListEntry::File(path) => s.serialize_str(path),
            ListEntry::Url(entry) if !entry.optional => s.serialize_str(&entry.shown),
            ListEntry::Url(entry) => {
                let mut map = s.serialize_map(Some(2))?;
                map.serialize_entry("url", &*entry.shown)?;
                map.serialize_entry("optional", &true)?;
                map.end()
            }
        }
    }
}

/// What a list's copy is, for a URL's list, as loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyState {
    /// No copy yet: the list is empty until the first fetch succeeds.
    Missing,
    /// The copy is in force.
    Loaded,
    /// The copy is older than `list_max_age` and `on_stale_list = "drop"`:
    /// the list is empty until a fetch succeeds.
    Dropped,
}

/// A URL's list as loaded.
#[derive(Debug, Clone)]
pub struct RemoteList {
    /// The configured entry.
    pub entry: UrlEntry,
    /// Its copy.
    pub copy: PathBuf,
    /// What it knows of the copy.
    pub sidecar: PathBuf,
    /// What the load made of the copy.
    pub state: CopyState,
}

/// One loaded list: its name (the path, or the shown URL), the file
/// watched for changes (a configured path), and its stamp.
#[derive(Debug, Clone)]
pub(crate) struct ListInfo {
    pub(crate) name: Arc<str>,
    pub(crate) file: Option<(Arc<str>, Stamp)>,
    pub(crate) remote: Option<RemoteList>,
}

impl ListInfo {
    /// How errors name the list: the path, or the URL as shown with its
    /// copy's path.
    pub(crate) fn label(&self) -> String {
        match &self.remote {
            Some(remote) => format!("{} (copy {})", remote.entry.shown, remote.copy.display()),
            None => self.name.to_string(),
        }
    }
}

/// The entries of one key of text lists (`deny_lists`,
/// `denied_domain_lists`, `deny_asn_lists`) as configured and, once read,
/// each list's name, watched file and fetched copy: what every kind of
/// list shares. Cheap to clone (shared). Deserialized from the entries.
#[derive(Clone, Default)]
pub struct Sources {
    entries: Arc<[ListEntry]>,
    loaded: Arc<[ListInfo]>,
}

impl Sources {
    /// Files, in order (not read yet).
    pub fn files(paths: &[String]) -> Sources {
        let entries: Vec<ListEntry> = paths.iter().cloned().map(ListEntry::File).collect();
        Sources {
            entries: entries.into(),
            loaded: Arc::new([]),
        }
    }

    /// Reads every entry in order (a file, or a URL's copy under
    /// `context.state_dir`) and hands `parse` its index in the
    /// configuration, its label for errors and its bytes; what `parse`
    /// makes of each, in order. Nothing changes here unless every list
    /// parses.
    pub(crate) fn load<T>(
        &mut self,
        context: &ListContext,
        mut parse: impl FnMut(u32, &str, &[u8]) -> Result<T, ListError>,
    ) -> Result<Vec<T>, ListError> {
        let mut loaded = Vec::with_capacity(self.entries.len());
        let mut parsed = Vec::with_capacity(self.entries.len());
        for (index, entry) in self.entries.iter().enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let (info, bytes) = load_entry(entry, context, true)?;
            parsed.push(parse(index, &info.label(), &bytes)?);
            loaded.push(info);
        }
        self.loaded = loaded.into();
        Ok(parsed)
    }

    /// The name of the list at `index` (its path, or its URL as shown).
    pub(crate) fn name(&self, index: u32) -> Option<&Arc<str>> {
        self.loaded.get(index as usize).map(|list| &list.name)
    }

    /// The names of the lists read, in order.
    pub(crate) fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.loaded.iter().map(|list| &list.name)
    }

    /// The configured entries, in order.
    pub fn entries(&self) -> &[ListEntry] {
        &self.entries
    }

    /// The configured files (not the URLs' copies), in order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.stamps().map(|(path, _)| path)
    }

    /// The configured files (not the URLs' copies) and their stamps when
    /// they were read.
    pub fn stamps(&self) -> impl Iterator<Item = (&str, Stamp)> {
        self.loaded
            .iter()
            .filter_map(|list| list.file.as_ref())
            .map(|(path, stamp)| (&**path, *stamp))
    }

    /// The lists fetched from URLs, as read.
    pub fn remote(&self) -> impl Iterator<Item = &RemoteList> {
        self.loaded.iter().filter_map(|list| list.remote.as_ref())
    }

    /// Whether no list is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter()).finish()
    }
}

impl<'de> Deserialize<'de> for Sources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = Vec::<ListEntry>::deserialize(d)?;
        Ok(Sources {
            entries: entries.into(),
            loaded: Arc::new([]),
        })
    }
}

impl Serialize for Sources {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.entries.iter())
    }
}

/// What loading a URL's list needs from the rest of the configuration.
#[derive(Debug, Clone, Default)]
pub struct ListContext {
    /// `[server] state_dir`.
    pub state_dir: Option<PathBuf>,
    /// `[reputation] list_max_age`: a copy older than this (since the
    /// last fetch that succeeded) is stale.
    pub max_age: Option<Duration>,
    /// `[reputation] on_stale_list = "drop"`: a stale copy is not used.
    pub drop_stale: bool,
}

/// What the fetcher records beside a copy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sidecar {
    /// The URL, as shown (for whoever looks in the directory).
    pub url: String,
    /// The last answer's `ETag`, sent back as `If-None-Match`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
    /// The last answer's `Last-Modified`, sent back as
    /// `If-Modified-Since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_modified: Option<String>,
    /// SHA-256 of the copy (hex): an unchanged list answered in full is
    /// not written again.
    pub sha256: String,
    /// When a fetch last succeeded (seconds since the Unix epoch).
    pub fetched_at: u64,
}

impl Sidecar {
    /// The sidecar at `path`; the default when absent or unreadable.
    pub fn read(path: &Path) -> Sidecar {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// When the copy at `copy` was last known current: the last fetch
    /// that succeeded, else the copy's modification time.
    pub fn last_success(&self, copy: &Path) -> Option<SystemTime> {
        if self.fetched_at > 0 {
            return Some(UNIX_EPOCH + Duration::from_secs(self.fetched_at));
        }
        std::fs::metadata(copy).and_then(|m| m.modified()).ok()
    }
}

/// Loads one entry: its description and its bytes (empty for a URL with
/// no copy, or a dropped one). A text list must end with a line break; a
/// database (`text = false`) is checked by its own structure.
pub(crate) fn load_entry(
    entry: &ListEntry,
    context: &ListContext,
    text: bool,
) -> Result<(ListInfo, Vec<u8>), ListError> {
    let read = |file: &Path, label: &str| match text {
        true => read_labeled(file, label),
        false => read_unchanged(file, label),
    };
    match entry {
        ListEntry::File(path) => {
            let (bytes, stamp) = read(Path::new(path), path)?;
            let name: Arc<str> = Arc::from(path.as_str());
            Ok((
                ListInfo {
                    name: name.clone(),
                    file: Some((name, stamp)),
                    remote: None,
                },
                bytes,
            ))
        }
        ListEntry::Url(url) => {
            let Some(state_dir) = &context.state_dir else {
                return Err(ListError::NoStateDir {
                    url: url.shown.to_string(),
                });
            };
            let copy = url.copy_path(state_dir);
            let sidecar = url.sidecar_path(state_dir);
            let mut remote = RemoteList {
                entry: url.clone(),
                copy: copy.clone(),
                sidecar: sidecar.clone(),
                state: CopyState::Missing,
            };
            let info = |remote| ListInfo {
                name: url.shown.clone(),
                file: None,
                remote: Some(remote),
            };
            if !copy.exists() {
                return Ok((info(remote), Vec::new()));
            }
            let label = format!("{} (copy {})", url.shown, copy.display());
            let (bytes, _) = read(&copy, &label)?;
            let age = Sidecar::read(&sidecar)
                .last_success(&copy)
                .and_then(|at| SystemTime::now().duration_since(at).ok());
            let stale = matches!((age, context.max_age), (Some(age), Some(max)) if age > max);
            if stale && context.drop_stale {
                remote.state = CopyState::Dropped;
                return Ok((info(remote), Vec::new()));
            }
            remote.state = CopyState::Loaded;
            Ok((info(remote), bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_secrets() {
        for (url, shown) in [
            (
                "https://lists.example.org/tor.txt",
                "https://lists.example.org/tor.txt",
            ),
            (
                "https://user:s3cret@lists.example.org:8443/a/b.txt",
                "https://***@lists.example.org:8443/a/b.txt",
            ),
            (
                "https://lists.example.org/x?key=s3cret&format=txt",
                "https://lists.example.org/x?key=***&format=***",
            ),
            (
                "http://lists.example.org?s3cret#frag",
                "http://lists.example.org?***",
            ),
        ] {
            assert_eq!(shown_url(url), shown);
        }
    }

    #[test]
    fn copies_are_named_by_the_url_s_digest() {
        let entry = UrlEntry::parse("https://a.example/x.txt", false).unwrap();
        let path = entry.copy_path(Path::new("/var/lib/g"));
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), 64 + 4, "{name}");
        assert!(path.starts_with("/var/lib/g/lists"));
        let other = UrlEntry::parse("https://a.example/y.txt", false).unwrap();
        assert_ne!(path, other.copy_path(Path::new("/var/lib/g")));
        assert!(UrlEntry::parse("ftp://a.example/x", false).is_err());
        assert!(UrlEntry::parse("https:///x", false).is_err());
    }
}
