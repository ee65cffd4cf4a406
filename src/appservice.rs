//! Application services (bridges): the registration files the homeserver
//! reads (`[homeserver] app_service_config_files`), so that the gate can
//! tell a bridge registering its puppet users from a client.
//!
//! A bridge registers each remote user it mirrors with `POST …/register`,
//! `"type": "m.login.application_service"` and its `as_token` as the access
//! token, by the hundreds, with names the username rules refuse (`_`
//! prefixes). The gate checks what the homeserver will check — the token
//! names a registration file, and the user ID lies in that file's user
//! namespace — and then lets the registration through without the username
//! policy and the lockdown (and, with `rate_limited: false`, without the
//! registration limits).
//!
//! Only the fields the gate needs are read (`id`, `as_token`,
//! `sender_localpart`, `namespaces.users`, `rate_limited`); the others
//! (`url`, `hs_token`, …) are the homeserver's. Tokens are secrets: they
//! are compared in constant time, never printed (`Debug` hides them), and a
//! file that cannot be read is reported by path and position, never by
//! quoting it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use regex::Regex;
use serde::Deserialize;

use crate::defences::lists::{read, ListError, Stamp};
use crate::secret::constant_time_eq;

/// An application service file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AppServiceError {
    /// The file could not be read whole: unreadable, cut short (no final
    /// line break: a namespace regex cut mid-line is a wider namespace),
    /// or changed while read.
    #[error(transparent)]
    File(#[from] ListError),
    /// The file is not a registration file the gate can use.
    #[error("{path}: {message}")]
    Invalid {
        /// The path as configured.
        path: String,
        /// What is wrong, without quoting the file.
        message: String,
    },
}

/// The part of a registration file the gate reads.
#[derive(Deserialize)]
struct RegistrationFile {
    id: String,
    as_token: String,
    sender_localpart: String,
    #[serde(default)]
    namespaces: Namespaces,
    /// Synapse's default: rate limited unless the file says otherwise.
    #[serde(default = "rate_limited_by_default")]
    rate_limited: bool,
}

fn rate_limited_by_default() -> bool {
    true
}

#[derive(Deserialize, Default)]
struct Namespaces {
    #[serde(default)]
    users: Vec<Namespace>,
}

#[derive(Deserialize)]
struct Namespace {
    regex: String,
}

/// One application service.
pub struct AppService {
    id: Arc<str>,
    as_token: Vec<u8>,
    /// Its own user, `@<sender_localpart>:<server_name>`.
    sender: String,
    /// The user namespace, each pattern anchored at the start only: the
    /// homeserver matches with Python's `re.match`.
    users: Vec<Regex>,
    rate_limited: bool,
}

impl AppService {
    /// The `id` of its registration file.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// Whether its registrations count against the registration limits
    /// (`rate_limited`, true unless the file says `false`).
    pub fn rate_limited(&self) -> bool {
        self.rate_limited
    }

    /// Whether `user_id` (`@localpart:server`) is the service's to
    /// register: its sender, or a match of a user namespace.
    pub fn covers(&self, user_id: &str) -> bool {
        user_id == self.sender || self.users.iter().any(|regex| regex.is_match(user_id))
    }
}

impl fmt::Debug for AppService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppService")
            .field("id", &self.id)
            .field("as_token", &"***")
            .field("users", &self.users.len())
            .field("rate_limited", &self.rate_limited)
            .finish()
    }
}

/// The application services of the configuration, with the stamps their
/// files had when read.
#[derive(Debug, Clone, Default)]
pub struct AppServices {
    services: Arc<[AppService]>,
    stamps: Arc<[(PathBuf, Stamp)]>,
}

impl AppServices {
    /// Reads every file; `server_name` completes the sender's user ID.
    pub fn load(paths: &[PathBuf], server_name: &str) -> Result<AppServices, AppServiceError> {
        let mut services = Vec::with_capacity(paths.len());
        let mut stamps = Vec::with_capacity(paths.len());
        for path in paths {
            let (text, before) = read(&path.display().to_string())?;
            let service = parse(path, &text, server_name)?;
            if services.iter().any(|s: &AppService| s.id == service.id) {
                return Err(invalid(
                    path,
                    format!("id {:?} is used twice", &*service.id),
                ));
            }
            if services
                .iter()
                .any(|s: &AppService| s.as_token == service.as_token)
            {
                return Err(invalid(path, "its as_token is another file's as_token"));
            }
            services.push(service);
            stamps.push((path.clone(), before));
        }
        Ok(AppServices {
            services: services.into(),
            stamps: stamps.into(),
        })
    }

    /// Whether no file is configured.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The services' ids, in file order.
    pub fn ids(&self) -> Vec<&str> {
        self.services.iter().map(|s| &*s.id).collect()
    }

    /// How many services are configured.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// The service whose `as_token` is `token`. Every token is compared,
    /// each in constant time, so the answer's timing tells nothing about
    /// how close a guess came.
    pub fn by_token(&self, token: &str) -> Option<&AppService> {
        let mut found = None;
        for service in self.services.iter() {
            if constant_time_eq(&service.as_token, token.as_bytes()) {
                found = Some(service);
            }
        }
        found
    }

    /// The files and their stamps when they were read.
    pub fn stamps(&self) -> impl Iterator<Item = &(PathBuf, Stamp)> {
        self.stamps.iter()
    }
}

fn invalid(path: &Path, message: impl Into<String>) -> AppServiceError {
    AppServiceError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads one registration file.
fn parse(path: &Path, text: &[u8], server_name: &str) -> Result<AppService, AppServiceError> {
    let file: RegistrationFile = serde_yaml::from_slice(text).map_err(|error| {
        // serde_yaml's message may quote a value (a token in the wrong
        // place): say where, and which field is missing, nothing more.
        let message = error.to_string();
        let what = match message.find("missing field") {
            Some(at) => message[at..]
                .split(" at line")
                .next()
                .unwrap_or("missing field")
                .to_owned(),
            None => "not a registration file (YAML with id, as_token, sender_localpart)".to_owned(),
        };
        match error.location() {
            Some(at) => invalid(
                path,
                format!("{what}, at line {}, column {}", at.line(), at.column()),
            ),
            None => invalid(path, what),
        }
    })?;
    if file.id.is_empty() {
        return Err(invalid(path, "id must not be empty"));
    }
    if file.as_token.is_empty() {
        return Err(invalid(path, "as_token must not be empty"));
    }
    let users = file
        .namespaces
        .users
        .iter()
        .enumerate()
        .map(|(index, namespace)| {
            Regex::new(&format!("^(?:{})", namespace.regex)).map_err(|_| {
                invalid(
                    path,
                    format!("namespaces.users[{index}].regex is not a regular expression the gate can read"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppService {
        id: Arc::from(file.id),
        as_token: file.as_token.into_bytes(),
        sender: format!("@{}:{server_name}", file.sender_localpart),
        users,
        rate_limited: file.rate_limited,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = "id: testbridge\nurl: http://127.0.0.1:9999\nas_token: as-s3cret\n\
        hs_token: hs-s3cret\nsender_localpart: _testbridge_bot\nrate_limited: false\n\
        namespaces:\n  users:\n    - exclusive: true\n      regex: '@_testbridge_.*'\n  aliases: []\n  rooms: []\n";

    fn service(text: &str) -> Result<AppService, AppServiceError> {
        parse(Path::new("bridge.yaml"), text.as_bytes(), "example.org")
    }

    #[test]
    fn a_registration_file_gives_id_token_namespace_and_rate_limit() {
        let bridge = service(BRIDGE).unwrap();
        assert_eq!(&**bridge.id(), "testbridge");
        assert!(!bridge.rate_limited());
        assert!(bridge.covers("@_testbridge_alice:example.org"));
        assert!(bridge.covers("@_testbridge_bot:example.org"));
        // Anchored at the start only, as Python's re.match is.
        assert!(bridge.covers("@_testbridge_x:other.example"));
        assert!(!bridge.covers("@alice_testbridge_:example.org"));
        assert!(!bridge.covers("@alice:example.org"));
        let printed = format!("{bridge:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        // Synapse's default is rate limited.
        let limited = service(&BRIDGE.replace("rate_limited: false\n", "")).unwrap();
        assert!(limited.rate_limited());
    }

    #[test]
    fn a_broken_file_is_refused_without_quoting_it() {
        for (text, wanted) in [
            (
                BRIDGE.replace("as_token: as-s3cret\n", ""),
                "missing field `as_token`",
            ),
            (
                BRIDGE.replace("rate_limited: false", "rate_limited: as-s3cret"),
                "not a registration file",
            ),
            (BRIDGE.replace("'@_testbridge_.*'", "'@_(s3cret'"), "regex"),
            (
                BRIDGE.replace("as_token: as-s3cret", "as_token: ''"),
                "as_token must not be empty",
            ),
            ("as-s3cret: [".to_owned(), "not a registration file"),
        ] {
            let error = service(&text).unwrap_err().to_string();
            assert!(error.starts_with("bridge.yaml: "), "{error}");
            assert!(error.contains(wanted), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn tokens_find_their_service() {
        let dir = std::env::temp_dir();
        let one = dir.join(format!("mgk-as-one-{}.yaml", std::process::id()));
        let two = dir.join(format!("mgk-as-two-{}.yaml", std::process::id()));
        std::fs::write(&one, BRIDGE).unwrap();
        std::fs::write(
            &two,
            BRIDGE
                .replace("id: testbridge", "id: other")
                .replace("as-s3cret", "as-other"),
        )
        .unwrap();
        let services = AppServices::load(&[one.clone(), two.clone()], "example.org").unwrap();
        assert_eq!(services.len(), 2);
        assert_eq!(&**services.by_token("as-other").unwrap().id(), "other");
        assert_eq!(
            &**services.by_token("as-s3cret").unwrap().id(),
            "testbridge"
        );
        assert!(services.by_token("as-s3cre").is_none());
        assert!(services.by_token("").is_none());
        // One token for two services is refused: which would it name?
        std::fs::write(&two, BRIDGE.replace("id: testbridge", "id: other")).unwrap();
        let error = AppServices::load(&[one.clone(), two.clone()], "example.org")
            .unwrap_err()
            .to_string();
        assert!(error.contains("another file's as_token"), "{error}");
        // A file being written in place, cut mid-line: an unquoted regex
        // cut short is a wider namespace, so the file is refused.
        std::fs::write(&two, BRIDGE.trim_end_matches('\n')).unwrap();
        let error = AppServices::load(std::slice::from_ref(&two), "example.org")
            .unwrap_err()
            .to_string();
        assert!(error.contains("does not end with a line break"), "{error}");
        assert!(!error.contains("s3cret"), "{error}");
        let _ = std::fs::remove_file(one);
        let _ = std::fs::remove_file(two);
    }
}
