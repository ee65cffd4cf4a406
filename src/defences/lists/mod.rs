//! File-based deny lists: address lists (`[client_ip] deny_lists`),
//! disposable e-mail domain lists (`[email] denied_domain_lists`) and lists
//! of autonomous systems (`[reputation] deny_asn_lists`).
//!
//! Both are read when the configuration is loaded (at start and on every
//! reload), never on the request path. Published lists are large — a Tor
//! exit list, a FireHOL `.netset` with hundreds of thousands of networks, a
//! disposable-domain list with over 100,000 names — so each is compiled into
//! a structure whose lookup is a handful of comparisons and never allocates:
//!
//! - addresses: sorted, merged ranges (`u32` bounds for IPv4, `u128` for
//!   IPv6) searched by bisection, one set per file so that a match can name
//!   the file it came from;
//! - domains: one hash map from a listed domain to its file; a lookup tries
//!   the domain and each parent at a label boundary;
//! - autonomous systems: one sorted array of AS numbers and their files.
//!
//! File format (every kind): one entry per line, `#` starts a comment (a
//! whole line or the rest of one), blank lines are skipped, and every line
//! ends with a line break. A line that is not an entry is an error naming
//! the file and the line number.
//!
//! A list read half-written must be refused, not guard less. A download
//! cut mid-line can leave a valid entry (`10.0.0.0/2` of `10.0.0.0/24`):
//! a non-empty file whose last byte is not a line break is refused. A file
//! written while it is read is caught by its stamp (modification time and
//! length), taken before and after the read. Neither catches a writer that
//! pauses at a line boundary before the read and resumes after it, so lists
//! are to be written to a temporary name and renamed into place, which
//! readers see all at once.
//!
//! Networks are read as [`IpNet`](crate::client_ip::IpNet) reads them
//! everywhere: an IPv6 network covers IPv6 clients only, and an
//! IPv4-mapped entry of 96 bits or less (`::ffff:0:0/96`, a line of IPv6
//! bogon lists) covers no client and is skipped.

use std::path::Path;
use std::time::SystemTime;

mod addresses;
mod asns;
mod database;
mod domains;
pub mod remote;
mod source;

pub use addresses::{AddressLists, AddressSet};
pub use asns::AsnLists;
pub(crate) use database::open_database;
pub use domains::DomainLists;
pub use source::{
    lists_dir, shown_url, CopyState, ListContext, ListEntry, RemoteList, Sidecar, Sources, UrlEntry,
};
pub(crate) use source::{load_entry, ListInfo};

/// How much of a broken line an error message repeats.
const SHOWN_LINE_MAX: usize = 80;

/// A list file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path as configured.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file does not end with a line break: a download or a copy
    /// stopped part-way.
    #[error("{path}: does not end with a line break: was it cut short?")]
    CutShort {
        /// The path as configured.
        path: String,
    },
    /// The file changed between the start and the end of its reading.
    #[error(
        "{path}: changed while it was read; write lists to a temporary name and rename them into place"
    )]
    ChangedWhileRead {
        /// The path as configured.
        path: String,
    },
    /// A line of an address list is not an address or a network.
    #[error("{path}:{line}: not an address or network: {text:?}")]
    NotAnAddress {
        /// The path as configured.
        path: String,
        /// One-based line number.
        line: usize,
        /// The entry (comment removed, cut to a readable length).
        text: String,
    },
    /// A list is a URL, and there is no `[server] state_dir` to keep its
    /// copy in.
    #[error("{url}: a list fetched from a URL needs [server] state_dir, where its copy is kept")]
    NoStateDir {
        /// The URL, as shown.
        url: String,
    },
    /// A network database (`[reputation] asn_database`,
    /// `country_database`) is not a usable MaxMind DB file.
    #[error("{path}: not a usable MaxMind DB database: {reason}")]
    NotADatabase {
        /// The path as configured (a URL as shown, with its copy).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A line of an AS list names no AS number.
    #[error("{path}:{line}: not an AS number: {text:?}")]
    NotAnAsn {
        /// The path as configured.
        path: String,
        /// One-based line number.
        line: usize,
        /// The entry (comment removed, cut to a readable length).
        text: String,
    },
    /// A line of a domain list is not a domain name.
    #[error("{path}:{line}: not a domain: {text:?}")]
    NotADomain {
        /// The path as configured.
        path: String,
        /// One-based line number.
        line: usize,
        /// The entry (comment removed, cut to a readable length).
        text: String,
    },
}

/// The entries of a list file: `(line number, entry)` for every line that
/// is neither blank nor a comment. A UTF-8 byte order mark opening the
/// file (an editor's, not an entry's) is skipped. A line that is not UTF-8
/// is handed on as it reads lossily, so the caller reports it as a broken
/// entry.
fn entries(bytes: &[u8]) -> impl Iterator<Item = (usize, std::borrow::Cow<'_, str>)> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(index, line)| {
            let line = match line.iter().position(|&b| b == b'#') {
                Some(hash) => &line[..hash],
                None => line,
            };
            let line = line.trim_ascii();
            if line.is_empty() {
                return None;
            }
            Some((index + 1, String::from_utf8_lossy(line)))
        })
}

/// An entry for an error message: cut on a character boundary.
fn shown(text: &str) -> String {
    match text.char_indices().nth(SHOWN_LINE_MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A file's modification time and length, `None` while it cannot be read:
/// what a watcher compares to see a change.
pub type Stamp = Option<(SystemTime, u64)>;

/// `path`'s [`Stamp`] now.
pub fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .and_then(|m| Ok((m.modified()?, m.len())))
        .ok()
}

/// The file's bytes and its stamp, refused when the file is cut short or
/// changes while it is read (list files, and application service files).
pub(crate) fn read(path: &str) -> Result<(Vec<u8>, Stamp), ListError> {
    read_with(path, |path| std::fs::read(path))
}

/// [`read`], `label` naming the file in errors.
fn read_labeled(path: &Path, label: &str) -> Result<(Vec<u8>, Stamp), ListError> {
    read_with_label(path, label, |path| std::fs::read(path))
}

/// The kinds of list, each with the check its content must pass: the
/// parser the configuration loader uses, and the last line break.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    /// Addresses and networks (`[client_ip] deny_lists`).
    Addresses,
    /// E-mail domains (`[email] denied_domain_lists`).
    Domains,
    /// Autonomous systems (`[reputation] deny_asn_lists`).
    Asns,
    /// The ASN database (`[reputation] asn_database`).
    AsnDatabase,
    /// The country database (`[reputation] country_database`).
    CountryDatabase,
}

impl ListKind {
    /// The configuration key that names lists of this kind.
    pub fn key(self) -> &'static str {
        match self {
            ListKind::Addresses => "client_ip.deny_lists",
            ListKind::Domains => "email.denied_domain_lists",
            ListKind::Asns => "reputation.deny_asn_lists",
            ListKind::AsnDatabase => "reputation.asn_database",
            ListKind::CountryDatabase => "reputation.country_database",
        }
    }

    /// Whether lists of this kind are text, one entry per line (else a
    /// database, whose own structure shows a cut).
    pub fn is_text(self) -> bool {
        matches!(
            self,
            ListKind::Addresses | ListKind::Domains | ListKind::Asns
        )
    }

    /// Checks a whole list (`name` names it in errors) as the
    /// configuration loader would read it.
    pub fn check(self, name: &str, bytes: &[u8]) -> Result<(), ListError> {
        if !self.is_text() {
            return open_database(name, bytes.to_vec()).map(drop);
        }
        if bytes.last().is_some_and(|&last| last != b'\n') {
            return Err(ListError::CutShort {
                path: name.to_owned(),
            });
        }
        match self {
            ListKind::Addresses => AddressSet::parse(name, bytes).map(drop),
            ListKind::Domains => domains::check(name, bytes),
            ListKind::Asns => asns::check(name, bytes),
            ListKind::AsnDatabase | ListKind::CountryDatabase => Ok(()),
        }
    }
}

/// [`read`], reading the bytes with `read_bytes`. A file written in place
/// (not renamed into place) can be read half-written: a cut in the middle
/// of a line can leave a valid entry that guards less (`10.0.0.0/2` of
/// `10.0.0.0/24`), and a cut at a line boundary drops the entries after
/// it. The first shows as a missing last line break; a write while the
/// file is read shows as a stamp that changed between before and after.
fn read_with(
    path: &str,
    read_bytes: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<(Vec<u8>, Stamp), ListError> {
    read_with_label(path.as_ref(), path, read_bytes)
}

/// [`read_with`], `label` naming the file in errors.
fn read_with_label(
    file: &Path,
    label: &str,
    read_bytes: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<(Vec<u8>, Stamp), ListError> {
    let (bytes, before) = unchanged_with_label(file, label, read_bytes)?;
    if bytes.last().is_some_and(|&last| last != b'\n') {
        return Err(ListError::CutShort {
            path: label.to_owned(),
        });
    }
    Ok((bytes, before))
}

/// The file's bytes and its stamp, refused when the file changes while it
/// is read; for a file that is not text (a network database), whose own
/// checks catch a cut. `label` names the file in errors.
pub(crate) fn read_unchanged(file: &Path, label: &str) -> Result<(Vec<u8>, Stamp), ListError> {
    unchanged_with_label(file, label, |path| std::fs::read(path))
}

fn unchanged_with_label(
    file: &Path,
    label: &str,
    read_bytes: impl FnOnce(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<(Vec<u8>, Stamp), ListError> {
    let before = stamp(file);
    let bytes = read_bytes(file).map_err(|source| ListError::Read {
        path: label.to_owned(),
        source,
    })?;
    if stamp(file) != before {
        return Err(ListError::ChangedWhileRead {
            path: label.to_owned(),
        });
    }
    Ok((bytes, before))
}

/// A fresh scratch file name for each list a test writes.
#[cfg(test)]
pub(crate) fn scratch_file() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("mgk-lists-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{}.txt", NEXT.fetch_add(1, Ordering::Relaxed)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// A scratch list holding `text`: its path, and the path as configured.
    fn list_file(text: &str) -> (std::path::PathBuf, String) {
        let path = scratch_file();
        std::fs::write(&path, text).unwrap();
        let shown = path.display().to_string();
        (path, shown)
    }

    #[test]
    fn a_list_cut_mid_line_is_refused_naming_the_file() {
        let (path, shown) = list_file("192.0.2.0/24\n10.0.0.0/2");
        let error = AddressLists::load(std::slice::from_ref(&shown))
            .unwrap_err()
            .to_string();
        let cut = format!("{shown}: does not end with a line break: was it cut short?");
        assert_eq!(error, cut);
        std::fs::write(&path, "mailinator.com\nyopmail.co").unwrap();
        let error = DomainLists::load(std::slice::from_ref(&shown))
            .unwrap_err()
            .to_string();
        assert_eq!(error, cut);
        // An empty file is an empty list, and a whole last line may end
        // with CR LF.
        std::fs::write(&path, "").unwrap();
        assert!(AddressLists::load(std::slice::from_ref(&shown)).is_ok());
        assert!(DomainLists::load(std::slice::from_ref(&shown))
            .unwrap()
            .is_empty());
        std::fs::write(&path, "192.0.2.0/24\r\n").unwrap();
        let lists = AddressLists::load(std::slice::from_ref(&shown)).unwrap();
        assert!(lists.find(ip("192.0.2.9")).is_some());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_byte_order_mark_opening_a_list_is_no_entry() {
        let (path, shown) = list_file("\u{feff}192.0.2.0/24\r\n");
        let lists = AddressLists::load(std::slice::from_ref(&shown)).unwrap();
        assert!(lists.find(ip("192.0.2.9")).is_some());
        std::fs::write(&path, "\u{feff}# disposable\r\nmailinator.com\r\n").unwrap();
        let domains = DomainLists::load(std::slice::from_ref(&shown)).unwrap();
        assert!(domains.find("mailinator.com").is_some());
        std::fs::write(&path, "\u{feff}AS64496\n").unwrap();
        let asns = AsnLists::load(std::slice::from_ref(&shown)).unwrap();
        assert!(asns.find(64496).is_some());
        // Only at the very start: one further in is a broken entry.
        std::fs::write(&path, "AS64496\n\u{feff}AS64497\n").unwrap();
        let error = AsnLists::load(std::slice::from_ref(&shown))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            format!("{shown}:2: not an AS number: \"\\u{{feff}}AS64497\"")
        );
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_list_changed_while_it_is_read_is_refused() {
        let (path, shown) = list_file("192.0.2.0/24\n");
        // The writer appends while the gate reads: what was read is the
        // old content, and the file is no longer what it was.
        let error = read_with(&shown, |path| {
            let bytes = std::fs::read(path)?;
            std::fs::write(path, "192.0.2.0/24\n198.51.100.0/24\n")?;
            Ok(bytes)
        })
        .unwrap_err()
        .to_string();
        assert_eq!(
            error,
            format!(
                "{shown}: changed while it was read; write lists to a temporary name and \
                 rename them into place"
            )
        );
        // Read again undisturbed, it loads.
        let (bytes, stamp) = read(&shown).unwrap();
        assert_eq!(bytes, b"192.0.2.0/24\n198.51.100.0/24\n");
        assert_eq!(stamp, super::stamp(&path));
        let _ = std::fs::remove_file(&path);
    }
}
