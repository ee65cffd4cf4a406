//! How the corpus reports show names, time their stages and collect their
//! failures.

use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant};

/// A string quoted with every character outside printable ASCII escaped
/// (`"\u{212a}elvin"`: KELVIN SIGN would read as a `K`).
pub(super) fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            ' '..='~' => quoted.push(c),
            _ => {
                let _ = write!(quoted, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    quoted.push('"');
    quoted
}

/// A name as it can be read in a report: escaped; a long one as its runs
/// of one character (`"a"×244 + "\u{212a}"`), or shortened.
pub(crate) fn show(name: &str) -> String {
    let chars = name.chars().count();
    if chars <= 40 {
        return quote(name);
    }
    let mut runs: Vec<(char, usize)> = Vec::new();
    for c in name.chars() {
        match runs.last_mut() {
            Some((last, count)) if *last == c => *count += 1,
            _ => runs.push((c, 1)),
        }
    }
    let size = format!("{chars} chars, {} bytes", name.len());
    if runs.len() > 4 {
        let head: String = name.chars().take(24).collect();
        return format!("{}… ({size})", quote(&head));
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|&(c, count)| match count {
            1 => quote(&c.to_string()),
            _ => format!("{}×{count}", quote(&c.to_string())),
        })
        .collect();
    format!("{} ({size})", parts.join(" + "))
}

/// Runs `work`, and says how long it took.
pub(super) async fn timed<T>(work: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    (work.await, started.elapsed())
}

/// Failure sections: a title and its lines, written to the report and
/// collected for the assertion.
#[derive(Default)]
pub(super) struct Sections {
    pub(super) report: String,
    pub(super) failures: Vec<String>,
}

impl Sections {
    pub(super) fn add(&mut self, title: &str, lines: Vec<String>) {
        let _ = writeln!(self.report, "### {title}: {}\n", lines.len());
        for line in lines.iter().take(200) {
            let _ = writeln!(self.report, "- {line}");
        }
        let _ = writeln!(self.report);
        if !lines.is_empty() {
            let head: Vec<String> = lines.iter().take(20).cloned().collect();
            self.failures
                .push(format!("{title}: {}\n  {}", lines.len(), head.join("\n  ")));
        }
    }
}
