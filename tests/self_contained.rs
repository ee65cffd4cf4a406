//! The repository stands alone: no code, test, script or benchmark reads a
//! file outside it. A user's clone has nothing beside it, so a test that
//! reaches for `../something` passes only on the machine where that folder
//! happens to exist.
//!
//! Every relative path written in the sources (`../x`, `../../x/y`) is
//! resolved twice, against the file's own folder and against the repository
//! root (where `CARGO_MANIFEST_DIR`, `cargo test` and `scripts/` resolve
//! paths); if either lands outside the repository on something that exists
//! on this machine, the test fails and names the file and line. A path into
//! a folder named `shared` beside the repository, where reference material
//! is often kept, fails even on a machine where it is absent.

use std::path::{Component, Path, PathBuf};

use regex::Regex;

/// Folders and files whose contents run: everything a build, a test or CI
/// executes.
const CHECKED: &[&str] = &[
    "src",
    "tests",
    "scripts",
    "bench",
    "benches",
    "examples",
    ".ci",
    "Cargo.toml",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .expect("the crate root exists")
}

fn files_below(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .expect("readable folder")
            .map(|entry| entry.expect("readable entry").path())
            .collect();
        entries.sort();
        for entry in entries {
            files_below(&entry, out);
        }
    } else if path.is_file() {
        out.push(path.to_path_buf());
    }
}

/// `base` joined with `relative`, `..` applied lexically (no symlinks are
/// followed, so a missing path resolves too).
fn resolve(base: &Path, relative: &str) -> PathBuf {
    let mut out = base.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

/// Every place in `text` (a file at `file`) whose relative path leaves the
/// repository `root`.
fn escapes(root: &Path, file: &Path, text: &str) -> Vec<String> {
    let relative_path = Regex::new(r"(?:\.\./)+[A-Za-z0-9_.\-/]*").expect("valid regex");
    let sibling = root
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| root.to_path_buf());
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        for m in relative_path.find_iter(line) {
            let path = m.as_str().trim_end_matches('/');
            let bases = [file.parent().unwrap_or(root), root];
            for base in bases {
                let target = resolve(base, path);
                if target.starts_with(root) {
                    continue;
                }
                let names_sibling =
                    target.starts_with(&sibling) && target != sibling && path.contains("shared");
                if target.exists() || names_sibling {
                    found.push(format!(
                        "{}:{}: `{}` resolves to {} outside the repository",
                        file.strip_prefix(root).unwrap_or(file).display(),
                        number + 1,
                        path,
                        target.display()
                    ));
                    break;
                }
            }
        }
    }
    found
}

#[test]
fn no_source_reads_a_path_outside_the_repository() {
    let root = root();
    let mut files = Vec::new();
    for name in CHECKED {
        files_below(&root.join(name), &mut files);
    }
    let mut found = Vec::new();
    let mut read = 0;
    for file in &files {
        // Binary files and build products are not sources.
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        read += 1;
        found.extend(escapes(&root, file, &text));
    }
    assert!(read > 20, "only {read} files were read below {CHECKED:?}");
    assert!(
        found.is_empty(),
        "files refer to paths outside the repository:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_sibling_folder_is_caught_whether_it_exists_or_not() {
    let root = root();
    let file = root.join("tests/e2e/example.rs");
    // Spelled in pieces, so that this file does not name the folder itself.
    let sibling = format!("/..{}shared/spec", '/');
    let text = format!(
        "const SPEC: &str = concat!(env!(\"CARGO_MANIFEST_DIR\"), \"{sibling}\");\n\
         #[path = \"../common/mod.rs\"]\n\
         let corpus = [\"a/../b\", \"../alice\"];\n"
    );
    let found = escapes(&root, &file, &text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].contains("tests/e2e/example.rs:1:"), "{found:?}");
    // A path that climbs out to something that exists is caught too.
    let climbing = format!("let parent = \"{}\";\n", [".."; 4].join("/"));
    let found = escapes(&root, &file, &climbing);
    assert_eq!(found.len(), 1, "{found:?}");
}
