//! Value types shared by several sections: durations, the string-valued
//! enums, regexes, and the helpers that read them from TOML and write them
//! back.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::error::ConfigError;

/// Declares a configuration enum spelled as a string, with its default, its
/// spelling (`as_str`), and serde impls whose error lists every choice
/// (`expected "allow" or "deny", got "sometimes"`).
macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? } default $default:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl Default for $name {
            fn default() -> Self {
                $name::$default
            }
        }

        impl $name {
            /// The configuration spelling of this value.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error as _;
                let expected = $crate::config::values::expected_list(&[$($text),+]);
                let value = <toml::Value as serde::Deserialize>::deserialize(d)?;
                match value.as_str() {
                    $(Some($text) => Ok($name::$variant),)+
                    Some(other) => Err(D::Error::custom(format!("expected {expected}, got \"{other}\""))),
                    None => Err(D::Error::custom(format!("expected {expected}, got {value}"))),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
    };
}

pub(super) use string_enum;

/// The choices of a string enum as an error message lists them:
/// `"a", "b" or "c"`.
pub(super) fn expected_list(options: &[&str]) -> String {
    let quoted: Vec<String> = options.iter().map(|o| format!("\"{o}\"")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// A duration written as `"250ms"`, `"5s"`, `"1m"`, `"2h"` or `"1d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// A whole number of seconds.
    pub const fn secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }

    /// Parses the configuration spelling of a duration.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("expected a duration such as \"5s\", got \"{text}\""))?;
        let (number, unit) = text.split_at(split);
        let n: u64 = number
            .parse()
            .map_err(|_| format!("expected a duration such as \"5s\", got \"{text}\""))?;
        let ms = match unit {
            "ms" => Some(n),
            "s" => n.checked_mul(1000),
            "m" => n.checked_mul(60_000),
            "h" => n.checked_mul(3_600_000),
            "d" => n.checked_mul(86_400_000),
            _ => {
                return Err(format!(
                    "unknown unit \"{unit}\" in \"{text}\" (use ms, s, m, h or d)"
                ))
            }
        }
        .ok_or_else(|| format!("duration \"{text}\" is too long"))?;
        Ok(HumanDuration(Duration::from_millis(ms)))
    }

    /// Refuses a zero duration, naming `key`.
    pub(super) fn check_positive(self, key: impl Into<String>) -> Result<(), ConfigError> {
        if self.0.is_zero() {
            return Err(ConfigError::invalid(key, "must be longer than zero"));
        }
        Ok(())
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(3_600_000) && ms > 0 {
            write!(f, "{}h", ms / 3_600_000)
        } else if ms.is_multiple_of(60_000) && ms > 0 {
            write!(f, "{}m", ms / 60_000)
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = toml::Value::deserialize(d)?;
        match value.as_str() {
            Some(text) => HumanDuration::parse(text).map_err(de::Error::custom),
            None => Err(de::Error::custom(format!(
                "expected a duration string such as \"5s\", got {value}"
            ))),
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A compiled deny pattern, kept with its source text.
#[derive(Debug, Clone)]
pub struct DenyPattern(pub Regex);

impl<'de> Deserialize<'de> for DenyPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Regex::new(&text)
            .map(DenyPattern)
            .map_err(|e| de::Error::custom(format!("invalid regex \"{text}\": {e}")))
    }
}

impl Serialize for DenyPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

/// Reads a value with `FromStr` from a TOML string, the error naming what
/// was `expected` (`an address such as "127.0.0.1:53"`) and what was given.
pub(super) fn parse_str<'de, D: Deserializer<'de>, T: std::str::FromStr>(
    d: D,
    expected: &str,
) -> Result<T, D::Error> {
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|_| de::Error::custom(format!("expected {expected}, got \"{text}\"")))
}

/// Reads a secret kept in a file (a token, a signing key), trailing line
/// breaks dropped; an unreadable file is an error naming `key`.
pub(super) fn read_secret_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

pub(super) fn deserialize_uri<'de, D: Deserializer<'de>>(d: D) -> Result<http::Uri, D::Error> {
    let text = String::deserialize(d)?;
    text.parse::<http::Uri>()
        .map_err(|e| de::Error::custom(format!("invalid URL \"{text}\": {e}")))
}

pub(super) fn serialize_display<S: Serializer, T: fmt::Display>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::err;

    #[test]
    fn bad_enum_value_names_the_key_and_the_choices() {
        assert_eq!(
            err("[guest]\naccess = \"sometimes\"\n"),
            "guest.access: expected \"allow\" or \"deny\", got \"sometimes\""
        );
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(
            HumanDuration::parse("250ms").unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            HumanDuration::parse("1h").unwrap().0,
            Duration::from_secs(3600)
        );
        assert!(HumanDuration::parse("5").is_err());
        assert!(HumanDuration::parse("5 parsecs").is_err());
        assert_eq!(HumanDuration::secs(90).to_string(), "90s");
        assert_eq!(HumanDuration::secs(120).to_string(), "2m");
        let e = err("[upstream]\nconnect_timeout = \"5x\"\n");
        assert!(e.starts_with("upstream.connect_timeout:"), "{e}");
    }
}

/// A secret read from a file (a token, a signing key): never shown by
/// `Debug`, never written back by `check`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretBytes(pub Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBytes(***)")
    }
}
