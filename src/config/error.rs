//! What a configuration that cannot be loaded says.

/// A configuration that could not be loaded; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path that was tried.
        path: String,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The text is not TOML. Only where and why: the offending source
    /// text is never repeated, since the line may hold a secret (a
    /// password in `redis_url`, a `webhook_secret`), and this message goes
    /// to the terminal, the journal and the `reload_failed` webhook.
    #[error("not valid TOML at line {line}, column {column}{}: {message}", key_part(.key))]
    Syntax {
        /// One-based line of the error.
        line: usize,
        /// One-based column (in characters) of the error.
        column: usize,
        /// The dotted key written on that line, when one can be read.
        key: Option<String>,
        /// What the parser expected.
        message: String,
    },
    /// A key has the wrong type or value, or is unknown.
    #[error("{key}: {message}")]
    Invalid {
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
}

fn key_part(key: &Option<String>) -> String {
    key.as_ref()
        .map(|key| format!(" ({key})"))
        .unwrap_or_default()
}

impl ConfigError {
    /// The error of a TOML text that does not parse: its position, the key
    /// on that line, and the parser's message — never the text itself.
    pub(super) fn syntax(text: &str, error: &toml::de::Error) -> Self {
        let at = error.span().map_or(0, |span| span.start).min(text.len());
        let before = text.get(..at).unwrap_or("");
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = text
            .get(line_start..at)
            .map_or(1, |part| part.chars().count() + 1);
        // Only the first line: the message is the parser's own text.
        let message = error.message().lines().next().unwrap_or("").trim();
        ConfigError::Syntax {
            line,
            column,
            key: key_at(text, line),
            message: message.to_owned(),
        }
    }

    pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Whether `name` is a dotted run of TOML bare keys.
fn is_bare_key_path(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            let part = part.trim();
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// The dotted key assigned on one-based `line` of `text` (`[rate_limit]`
/// then `redis_url = …` is `rate_limit.redis_url`), when the line starts
/// with bare keys and `=`. Only key names are read, never a value.
fn key_at(text: &str, line: usize) -> Option<String> {
    let mut table = String::new();
    // Inside a multi-line string a line is a value, whatever it looks like.
    let mut in_string = false;
    for (index, current) in text.lines().enumerate() {
        let current = current.trim();
        let opened = in_string;
        let quotes = current.matches("\"\"\"").count() + current.matches("'''").count();
        in_string ^= quotes % 2 == 1;
        if opened {
            if index + 1 == line {
                return None;
            }
            continue;
        }
        if index + 1 == line {
            let (key, _) = current.split_once('=')?;
            let key = key.trim();
            if !is_bare_key_path(key) {
                return None;
            }
            let key: Vec<&str> = key.split('.').map(str::trim).collect();
            let key = key.join(".");
            return Some(if table.is_empty() {
                key
            } else {
                format!("{table}.{key}")
            });
        }
        if current.starts_with('[') {
            let name = current
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            table = if is_bare_key_path(name) {
                name.split('.').map(str::trim).collect::<Vec<_>>().join(".")
            } else {
                String::new()
            };
        }
    }
    None
}
