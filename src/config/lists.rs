//! The settings of lists fetched from URLs (`[reputation] list_*`,
//! `[server] state_dir`), and the loading of every configured list once the
//! whole configuration is read.

use rustls::pki_types::CertificateDer;

use super::error::ConfigError;
use super::reputation::{OnStaleList, ReputationConfig};
use super::Config;
use crate::defences::lists::remote::{FetchSettings, RemoteSet};
use crate::defences::lists::{ListContext, ListKind, RemoteList};

impl ReputationConfig {
    /// The settings of lists fetched from URLs.
    pub(super) fn validate_lists(&self) -> Result<(), ConfigError> {
        self.list_refresh
            .check_positive("reputation.list_refresh")?;
        self.list_timeout
            .check_positive("reputation.list_timeout")?;
        if self.list_max_bytes == 0 {
            return Err(ConfigError::invalid(
                "reputation.list_max_bytes",
                "must be more than zero",
            ));
        }
        if self.list_max_age.0 < self.list_refresh.0 {
            return Err(ConfigError::invalid(
                "reputation.list_max_age",
                format!(
                    "\"{}\" is shorter than list_refresh (\"{}\"): every list would be stale between two fetches",
                    self.list_max_age, self.list_refresh
                ),
            ));
        }
        if let Some(path) = &self.list_ca_file {
            self.list_roots().map_err(|error| {
                ConfigError::invalid(
                    "reputation.list_ca_file",
                    format!("{}: {error}", path.display()),
                )
            })?;
        }
        Ok(())
    }

    /// The extra roots of `list_ca_file` (none without it).
    pub fn list_roots(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        match &self.list_ca_file {
            Some(path) => crate::tls::load_ca_file(path),
            None => Ok(Vec::new()),
        }
    }
}

impl Config {
    /// How the lists of this configuration are fetched. An unreadable
    /// `list_ca_file` (it was readable when the configuration was
    /// checked) is logged, and only the built-in roots are trusted.
    pub fn fetch_settings(&self) -> FetchSettings {
        let reputation = &self.reputation;
        let roots = reputation.list_roots().unwrap_or_else(|error| {
            tracing::error!(%error, "reputation.list_ca_file not read; only the built-in roots are trusted");
            Vec::new()
        });
        FetchSettings::new(reputation.list_timeout.0, reputation.list_max_bytes, &roots)
    }

    /// The lists of this configuration fetched from URLs, and how to
    /// fetch them: what the refresher works from.
    pub fn remote_set(&self) -> RemoteSet {
        RemoteSet {
            lists: self.remote_lists(),
            refresh: self.reputation.list_refresh.0,
            max_age: self.reputation.list_max_age.0,
            drop_stale: self.reputation.on_stale_list == OnStaleList::Drop,
            settings: std::sync::Arc::new(self.fetch_settings()),
        }
    }

    /// What loading the lists needs from the rest of the configuration.
    pub fn list_context(&self) -> ListContext {
        ListContext {
            state_dir: self.server.state_dir.clone(),
            max_age: Some(self.reputation.list_max_age.0),
            drop_stale: self.reputation.on_stale_list == OnStaleList::Drop,
        }
    }

    /// Reads every configured list (`[client_ip] deny_lists`, `[email]
    /// denied_domain_lists`, `[reputation] deny_asn_lists` and the network
    /// databases): files, and the copies of URLs under `[server]
    /// state_dir` (a URL without a copy yet loads empty; nothing is
    /// fetched here). Errors name the key.
    pub fn load_lists(&mut self) -> Result<(), ConfigError> {
        let first_url = self
            .client_ip
            .deny_lists
            .sources()
            .entries()
            .iter()
            .map(|entry| (ListKind::Addresses, entry))
            .chain(
                self.email
                    .denied_domain_lists
                    .sources()
                    .entries()
                    .iter()
                    .map(|entry| (ListKind::Domains, entry)),
            )
            .chain(
                self.reputation
                    .deny_asn_lists
                    .sources()
                    .entries()
                    .iter()
                    .map(|entry| (ListKind::Asns, entry)),
            )
            .chain(
                self.reputation
                    .database_entries()
                    .map(|(kind, database)| (kind, database.entry())),
            )
            .find_map(|(kind, entry)| match entry {
                crate::defences::lists::ListEntry::Url(url) => Some((kind, url.shown.clone())),
                crate::defences::lists::ListEntry::File(_) => None,
            });
        if let (Some((kind, url)), None) = (first_url, &self.server.state_dir) {
            return Err(ConfigError::invalid(
                "server.state_dir",
                format!(
                    "needed by {} ({url}): lists fetched from URLs are kept there",
                    kind.key()
                ),
            ));
        }
        let context = self.list_context();
        self.client_ip
            .deny_lists
            .load_with(&context)
            .map_err(|e| ConfigError::invalid(ListKind::Addresses.key(), e.to_string()))?;
        self.email
            .denied_domain_lists
            .load_with(&context)
            .map_err(|e| ConfigError::invalid(ListKind::Domains.key(), e.to_string()))?;
        self.reputation
            .deny_asn_lists
            .load_with(&context)
            .map_err(|e| ConfigError::invalid(ListKind::Asns.key(), e.to_string()))?;
        for (kind, database) in [
            (ListKind::AsnDatabase, &mut self.reputation.asn_database),
            (
                ListKind::CountryDatabase,
                &mut self.reputation.country_database,
            ),
        ] {
            if let Some(database) = database {
                database
                    .load_with(&context)
                    .map_err(|e| ConfigError::invalid(kind.key(), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The lists fetched from URLs, with their kind, as loaded.
    pub fn remote_lists(&self) -> Vec<(ListKind, RemoteList)> {
        self.client_ip
            .deny_lists
            .sources()
            .remote()
            .map(|list| (ListKind::Addresses, list.clone()))
            .chain(
                self.email
                    .denied_domain_lists
                    .sources()
                    .remote()
                    .map(|list| (ListKind::Domains, list.clone())),
            )
            .chain(
                self.reputation
                    .deny_asn_lists
                    .sources()
                    .remote()
                    .map(|list| (ListKind::Asns, list.clone())),
            )
            .chain(
                self.reputation
                    .database_entries()
                    .filter_map(|(kind, database)| Some((kind, database.remote()?.clone()))),
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use crate::config::tests::err;
    use crate::config::Config;
    use crate::defences::lists::{CopyState, ListEntry, Sidecar};

    fn state_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("mgk-list-config-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn list_settings_have_defaults_and_errors_name_their_key() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.reputation.list_refresh.0, Duration::from_secs(3600));
        assert_eq!(c.reputation.list_timeout.0, Duration::from_secs(30));
        assert_eq!(c.reputation.list_max_bytes, 64 * 1024 * 1024);
        assert_eq!(c.reputation.list_max_age.0, Duration::from_secs(86_400));
        assert_eq!(c.reputation.on_stale_list, super::OnStaleList::Keep);
        assert!(c.server.state_dir.is_none());
        let c = Config::from_toml(
            "[reputation]\nlist_refresh = \"1s\"\nlist_max_age = \"2s\"\non_stale_list = \"drop\"\n",
        )
        .unwrap();
        assert_eq!(c.reputation.list_refresh.0, Duration::from_secs(1));
        for (text, key) in [
            (
                "list_refresh = \"0s\"",
                "reputation.list_refresh: must be longer than zero",
            ),
            (
                "list_timeout = \"0ms\"",
                "reputation.list_timeout: must be longer than zero",
            ),
            (
                "list_max_bytes = 0",
                "reputation.list_max_bytes: must be more than zero",
            ),
            (
                "list_max_age = \"30m\"",
                "reputation.list_max_age: \"30m\" is shorter than list_refresh (\"1h\")",
            ),
            (
                "on_stale_list = \"forget\"",
                "reputation.on_stale_list: expected \"keep\" or \"drop\", got \"forget\"",
            ),
            (
                "list_ca_file = \"/nonexistent/ca.pem\"",
                "reputation.list_ca_file: /nonexistent/ca.pem: ",
            ),
        ] {
            let e = err(&format!("[reputation]\n{text}\n"));
            assert!(e.starts_with(key), "{text}: {e}");
        }
    }

    #[test]
    fn a_url_needs_a_state_dir_and_is_never_shown_whole() {
        let e = err("[client_ip]\ndeny_lists = [\"https://gate:s3cret@lists.example.org/tor.txt?key=s3cret\"]\n");
        assert_eq!(
            e,
            "server.state_dir: needed by client_ip.deny_lists \
             (https://***@lists.example.org/tor.txt?key=***): lists fetched from URLs are kept there"
        );
        let e = err("[email]\ndenied_domain_lists = [{ url = \"https://lists.example.org/d.txt\", optional = true }]\n");
        assert!(
            e.starts_with("server.state_dir: needed by email.denied_domain_lists"),
            "{e}"
        );
        for (entry, message) in [
            (
                "{ url = \"/etc/x.txt\" }",
                "url: expected an https:// or http:// URL",
            ),
            (
                "{ url = \"https://a.example/x\", optional = 1 }",
                "optional: expected true or false",
            ),
            (
                "{ url = \"https://a.example/x\", optinal = true }",
                "unknown field `optinal`",
            ),
            ("{ optional = true }", "expected { url = "),
            ("\"https://\"", "not a URL"),
            ("\"\"", "expected a path or a URL"),
            ("2", "expected a path, a URL or"),
        ] {
            let e = err(&format!("[client_ip]\ndeny_lists = [{entry}]\n"));
            assert!(e.starts_with("client_ip.deny_lists[0]: "), "{entry}: {e}");
            assert!(e.contains(message), "{entry}: {e}");
        }
    }

    #[test]
    fn a_url_s_copy_is_read_like_a_file_and_printed_as_configured() {
        let dir = state_dir("copy");
        let toml = format!(
            "[server]\nstate_dir = {:?}\n[client_ip]\ndeny_lists = [\"https://gate:s3cret@lists.example.org/a.txt\", \
             {{ url = \"https://lists.example.org/b.txt\", optional = true }}]\n",
            dir.display().to_string()
        );
        // No copy yet: loaded empty, and said so.
        let c = Config::from_toml(&toml).unwrap();
        let remote = c.remote_lists();
        assert_eq!(remote.len(), 2);
        assert!(remote.iter().all(|(_, l)| l.state == CopyState::Missing));
        assert!(c.client_ip.deny_lists.find(ip("192.0.2.1")).is_none());
        // With a copy, it is in force and named by its URL as shown.
        let a = &remote[0].1;
        std::fs::create_dir_all(a.copy.parent().unwrap()).unwrap();
        std::fs::write(&a.copy, "192.0.2.0/24\n").unwrap();
        let c = Config::from_toml(&toml).unwrap();
        assert_eq!(
            c.client_ip.deny_lists.find(ip("192.0.2.1")).map(|n| &**n),
            Some("https://***@lists.example.org/a.txt")
        );
        assert_eq!(c.remote_lists()[0].1.state, CopyState::Loaded);
        // Not watched as a file: the refresher reloads when it writes one.
        assert_eq!(c.client_ip.deny_lists.sources().paths().count(), 0);
        // A broken copy is an error naming the URL and the copy.
        std::fs::write(&a.copy, "192.0.2.0/24\nnot an address\n").unwrap();
        let e = err(&toml);
        assert!(
            e.starts_with("client_ip.deny_lists: https://***@lists.example.org/a.txt (copy "),
            "{e}"
        );
        assert!(
            e.ends_with(":2: not an address or network: \"not an address\""),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::write(&a.copy, "192.0.2.0/24\n").unwrap();
        // `check` prints the entries as written, secrets hidden, and what
        // it prints loads again.
        let printed = c.to_toml();
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(
            printed.contains("https://***@lists.example.org/a.txt"),
            "{printed}"
        );
        let again = Config::from_toml(&printed).unwrap();
        let entries = again.client_ip.deny_lists.sources().entries();
        assert_eq!(entries.len(), 2);
        assert!(
            matches!(&entries[1], ListEntry::Url(u) if u.optional && &*u.shown == "https://lists.example.org/b.txt")
        );
        assert!(matches!(&entries[0], ListEntry::Url(u) if !u.optional));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_copy_older_than_list_max_age_is_dropped_only_when_asked() {
        let dir = state_dir("stale");
        let toml = |on_stale: &str| {
            format!(
                "[server]\nstate_dir = {:?}\n[email]\ndenied_domain_lists = [\"https://lists.example.org/d.txt\"]\n\
                 [reputation]\nlist_refresh = \"1s\"\nlist_max_age = \"1m\"\non_stale_list = \"{on_stale}\"\n",
                dir.display().to_string()
            )
        };
        let c = Config::from_toml(&toml("drop")).unwrap();
        let list = c.remote_lists().remove(0).1;
        std::fs::create_dir_all(list.copy.parent().unwrap()).unwrap();
        std::fs::write(&list.copy, "mailinator.com\n").unwrap();
        let fetched_at = |at: SystemTime| {
            let sidecar = Sidecar {
                fetched_at: at.duration_since(UNIX_EPOCH).unwrap().as_secs(),
                ..Sidecar::default()
            };
            std::fs::write(&list.sidecar, serde_json::to_vec(&sidecar).unwrap()).unwrap();
        };
        fetched_at(SystemTime::now());
        let c = Config::from_toml(&toml("drop")).unwrap();
        assert!(c.email.denied_domain_lists.find("mailinator.com").is_some());
        fetched_at(SystemTime::now() - Duration::from_secs(120));
        let c = Config::from_toml(&toml("drop")).unwrap();
        assert!(c.email.denied_domain_lists.find("mailinator.com").is_none());
        assert_eq!(c.remote_lists()[0].1.state, CopyState::Dropped);
        let c = Config::from_toml(&toml("keep")).unwrap();
        assert!(c.email.denied_domain_lists.find("mailinator.com").is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn configuration_errors_name_the_key_the_file_and_the_line() {
        let addresses = crate::defences::lists::scratch_file();
        std::fs::write(&addresses, "192.0.2.0/24\n2001:db8::/32 # v6\n").unwrap();
        let domains = crate::defences::lists::scratch_file();
        std::fs::write(&domains, "mailinator.com\n").unwrap();
        let toml = format!(
            "[client_ip]\ndeny_lists = [{:?}]\n[email]\ndenied_domain_lists = [{:?}]\n",
            addresses.display().to_string(),
            domains.display().to_string()
        );
        let config = Config::from_toml(&toml).unwrap();
        assert!(config.client_ip.deny_lists.find(ip("192.0.2.9")).is_some());
        assert!(config
            .email
            .denied_domain_lists
            .find("x.mailinator.com")
            .is_some());
        // `check` prints the paths, and what it prints loads again.
        let printed = config.to_toml();
        assert!(
            printed.contains(&format!("{:?}", addresses.display().to_string())),
            "{printed}"
        );
        let again = Config::from_toml(&printed).unwrap();
        assert!(again.client_ip.deny_lists.find(ip("2001:db8::1")).is_some());

        std::fs::write(&addresses, "192.0.2.0/24\n\n10.0.0.0/8x\n").unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "client_ip.deny_lists: {}:3: not an address or network: \"10.0.0.0/8x\"",
                addresses.display()
            )
        );
        std::fs::write(&addresses, "192.0.2.0/24\n").unwrap();
        std::fs::write(&domains, "ok.example\nnot a domain\n").unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert_eq!(
            error,
            format!(
                "email.denied_domain_lists: {}:2: not a domain: \"not a domain\"",
                domains.display()
            )
        );
        std::fs::remove_file(&domains).unwrap();
        let error = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!(
                "email.denied_domain_lists: cannot read {}: ",
                domains.display()
            )),
            "{error}"
        );
        assert!(Config::from_toml("[client_ip]\ndeny_lists = [1]\n")
            .unwrap_err()
            .to_string()
            .starts_with("client_ip.deny_lists"));
        let _ = std::fs::remove_file(&addresses);
    }
}
