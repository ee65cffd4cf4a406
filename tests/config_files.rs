//! The configuration files shipped in `config/` load, and the example
//! documents exactly the real defaults (its rate limits excepted: they are
//! recommendations, since a limit that is absent is no limit).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use matrix_gatekeeper::Config;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn shipped_toml_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(config_dir())
        .expect("config/ exists")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    files
}

fn example_path() -> PathBuf {
    config_dir().join("gatekeeper.example.toml")
}

/// Every dotted key of a TOML table, tables themselves included.
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if let toml::Value::Table(inner) = value {
            keys(inner, &path, out);
        }
        out.insert(path);
    }
}

fn key_set(text: &str) -> BTreeSet<String> {
    let table: toml::Table = text.parse().expect("TOML");
    let mut out = BTreeSet::new();
    keys(&table, "", &mut out);
    out
}

#[test]
fn every_shipped_config_file_loads() {
    let files = shipped_toml_files();
    assert!(!files.is_empty(), "no *.toml in {}", config_dir().display());
    for file in &files {
        if let Err(error) = Config::from_file(file) {
            panic!("{}: {error}", file.display());
        }
    }
}

#[test]
fn example_values_are_the_real_defaults() {
    let mut example = Config::from_file(&example_path()).expect("example loads");
    // The example recommends every limit; the default is none.
    let limits = &mut example.rate_limit;
    for limit in [
        &mut limits.registrations_per_ip,
        &mut limits.attempts_per_ip,
        &mut limits.guests_per_ip,
        &mut limits.availability_checks_per_ip,
        &mut limits.token_requests_per_ip,
        &mut limits.registrations_global,
    ] {
        assert!(limit.is_some(), "the example recommends every limit");
        *limit = None;
    }
    let (example, default) = (example.to_toml(), Config::default().to_toml());
    let only_in = |a: &str, b: &str| -> Vec<String> {
        let b: Vec<&str> = b.lines().collect();
        a.lines()
            .filter(|line| !b.contains(line))
            .map(str::to_owned)
            .collect()
    };
    assert!(
        example == default,
        "the example is not the defaults\n  example only: {:?}\n  default only: {:?}",
        only_in(&example, &default),
        only_in(&default, &example)
    );
}

#[test]
fn example_shows_every_key_that_has_a_default() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    let shown = key_set(&text);
    let real = key_set(&Config::default().to_toml());
    // Unknown keys in the example are already refused by `from_file`;
    // keys whose default is unset are not printed and may stay commented.
    let missing: Vec<_> = real.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "keys missing from the example: {missing:?}"
    );
}

#[test]
fn embedded_example_is_the_shipped_example() {
    let text = std::fs::read_to_string(example_path()).unwrap();
    assert_eq!(matrix_gatekeeper::config::EMBEDDED_EXAMPLE, text);
}

#[test]
fn readme_and_example_list_the_same_restart_only_keys_as_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(example_path()).unwrap();
    let paragraph = |text: &str, marker: &str| -> String {
        let start = text.find(marker).unwrap_or_else(|| panic!("no {marker:?}"));
        text[start..].split("\n\n").next().unwrap().to_owned()
    };
    let readme_list = paragraph(&readme, "Restart-only keys:");
    let example_list = paragraph(&example, "# Restart-only keys:");
    for key in matrix_gatekeeper::config::RESTART_ONLY_KEYS {
        let shown = if key.contains('.') {
            format!("`{key}`")
        } else {
            format!("`[{key}]`")
        };
        assert!(
            readme_list.contains(&shown),
            "README lacks {shown}: {readme_list}"
        );
        let bare = shown.trim_matches('`');
        assert!(
            example_list.contains(bare),
            "example lacks {bare}: {example_list}"
        );
    }
    let count = |text: &str| text.matches("server.").count() + text.matches('[').count();
    assert_eq!(
        count(&readme_list),
        matrix_gatekeeper::config::RESTART_ONLY_KEYS.len(),
        "the README lists a key the code does not: {readme_list}"
    );
    assert_eq!(
        count(&example_list),
        matrix_gatekeeper::config::RESTART_ONLY_KEYS.len(),
        "the example lists a key the code does not: {example_list}"
    );
}
