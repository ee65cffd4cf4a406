//! Differential username corpus: the gate's username verdict against
//! Synapse's, for a deterministic corpus of more than 10,000 names.
//!
//! Each name is judged by the gate's own [`UsernamePolicy`] (once with the
//! grammar alone, once with the default reserved names and look-alikes) and
//! by a real Synapse, asked directly with a first UIA step
//! `POST /register {"username": NAME, "password": …}`: Synapse checks the
//! username on every round before auth, so `401` means accepted and
//! `400 M_INVALID_USERNAME` rejected. Synapse's `str.lower()` of every name
//! and its character check over every Unicode code point are taken from the
//! installed Synapse in one Python batch, and a sample of accepted names is
//! registered for real to compare the user ID Synapse creates.
//!
//! The gate must never accept a name Synapse refuses; when both accept, the
//! gate's mapped name must be Synapse's localpart. The agreement table and
//! every disagreement go to `target/e2e-report/username-corpus.md`.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use matrix_gatekeeper::config::{UsernameConfig, DEFAULT_RESERVED};
use matrix_gatekeeper::gate::username::{is_grammar_char, map_case, UsernamePolicy, UsernameRule};
use tokio::sync::Semaphore;

use crate::synapse::{self, Synapse, SERVER_NAME};

/// Requests in flight against Synapse.
const CONCURRENCY: usize = 16;
/// Longest wait for one Synapse answer; a hang fails the test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Accepted names registered for real to compare the created user ID.
const COMPLETION_SAMPLE: usize = 200;
/// The password of every probe (Synapse validates and hashes it).
const PASSWORD: &str = "e2e-corpus-password-1";

// === the corpus ===

/// The names, in a fixed order, each with the category that produced it
/// first.
struct Corpus {
    names: Vec<(String, &'static str)>,
    seen: HashSet<String>,
}

impl Corpus {
    fn add(&mut self, category: &'static str, name: impl Into<String>) {
        let name = name.into();
        if self.seen.insert(name.clone()) {
            self.names.push((name, category));
        }
    }
}

/// Characters whose lower case is ASCII or special, or that imitate ASCII.
const SPECIAL_CHARS: &[char] = &[
    '\u{212A}',   // KELVIN SIGN -> k
    '\u{212B}',   // ANGSTROM SIGN -> å
    '\u{2126}',   // OHM SIGN -> ω
    '\u{0130}',   // LATIN CAPITAL LETTER I WITH DOT ABOVE -> i + U+0307
    '\u{0131}',   // LATIN SMALL LETTER DOTLESS I
    '\u{017F}',   // LATIN SMALL LETTER LONG S
    '\u{00DF}',   // ß
    '\u{1E9E}',   // LATIN CAPITAL LETTER SHARP S -> ß
    '\u{FB00}',   // LATIN SMALL LIGATURE FF
    '\u{FB01}',   // LATIN SMALL LIGATURE FI
    '\u{01C4}',   // DŽ
    '\u{01C5}',   // Dž (titlecase)
    '\u{01C8}',   // Lj (titlecase)
    '\u{01CB}',   // Nj (titlecase)
    '\u{01F2}',   // Dz (titlecase)
    '\u{03A3}',   // GREEK CAPITAL LETTER SIGMA (final-sigma context)
    '\u{03C2}',   // GREEK SMALL LETTER FINAL SIGMA
    '\u{0391}',   // GREEK CAPITAL ALPHA (looks like A)
    '\u{0392}',   // GREEK CAPITAL BETA (B)
    '\u{0395}',   // GREEK CAPITAL EPSILON (E)
    '\u{0397}',   // GREEK CAPITAL ETA (H)
    '\u{0399}',   // GREEK CAPITAL IOTA (I)
    '\u{039A}',   // GREEK CAPITAL KAPPA (K)
    '\u{039C}',   // GREEK CAPITAL MU (M)
    '\u{039D}',   // GREEK CAPITAL NU (N)
    '\u{039F}',   // GREEK CAPITAL OMICRON (O)
    '\u{03A1}',   // GREEK CAPITAL RHO (P)
    '\u{03A4}',   // GREEK CAPITAL TAU (T)
    '\u{03A7}',   // GREEK CAPITAL CHI (X)
    '\u{03BF}',   // GREEK SMALL OMICRON (o)
    '\u{0410}',   // CYRILLIC CAPITAL A
    '\u{0430}',   // CYRILLIC SMALL A
    '\u{0415}',   // CYRILLIC CAPITAL IE (E)
    '\u{0435}',   // CYRILLIC SMALL IE (e)
    '\u{041E}',   // CYRILLIC CAPITAL O
    '\u{043E}',   // CYRILLIC SMALL O
    '\u{0420}',   // CYRILLIC CAPITAL ER (P)
    '\u{0440}',   // CYRILLIC SMALL ER (p)
    '\u{0421}',   // CYRILLIC CAPITAL ES (C)
    '\u{0441}',   // CYRILLIC SMALL ES (c)
    '\u{0406}',   // CYRILLIC CAPITAL BYELORUSSIAN-UKRAINIAN I
    '\u{0456}',   // CYRILLIC SMALL BYELORUSSIAN-UKRAINIAN I
    '\u{0408}',   // CYRILLIC CAPITAL JE (J)
    '\u{04C0}',   // CYRILLIC LETTER PALOCHKA (l) -> U+04CF
    '\u{1C89}',   // CYRILLIC CAPITAL LETTER TJE (Unicode 16)
    '\u{A7CB}',   // LATIN CAPITAL LETTER RAMS HORN (Unicode 16)
    '\u{A7DC}',   // LATIN CAPITAL LETTER LAMBDA WITH STROKE (Unicode 16)
    '\u{0261}',   // LATIN SMALL LETTER SCRIPT G
    '\u{0269}',   // LATIN SMALL LETTER IOTA
    '\u{1D00}',   // LATIN LETTER SMALL CAPITAL A
    '\u{2160}',   // ROMAN NUMERAL ONE -> ⅰ
    '\u{216C}',   // ROMAN NUMERAL FIFTY (L)
    '\u{24B6}',   // CIRCLED LATIN CAPITAL A -> ⓐ
    '\u{0660}',   // ARABIC-INDIC DIGIT ZERO (a Unicode \d)
    '\u{0661}',   // ARABIC-INDIC DIGIT ONE
    '\u{06F1}',   // EXTENDED ARABIC-INDIC DIGIT ONE
    '\u{0967}',   // DEVANAGARI DIGIT ONE
    '\u{FF10}',   // FULLWIDTH DIGIT ZERO
    '\u{FF11}',   // FULLWIDTH DIGIT ONE
    '\u{FF3F}',   // FULLWIDTH LOW LINE
    '\u{FF0E}',   // FULLWIDTH FULL STOP
    '\u{FF0D}',   // FULLWIDTH HYPHEN-MINUS
    '\u{FF1D}',   // FULLWIDTH EQUALS SIGN
    '\u{FF0F}',   // FULLWIDTH SOLIDUS
    '\u{FF0B}',   // FULLWIDTH PLUS SIGN
    '\u{2024}',   // ONE DOT LEADER
    '\u{2010}',   // HYPHEN
    '\u{2011}',   // NON-BREAKING HYPHEN
    '\u{2212}',   // MINUS SIGN
    '\u{2215}',   // DIVISION SLASH
    '\u{2044}',   // FRACTION SLASH
    '\u{02D7}',   // MODIFIER LETTER MINUS SIGN
    '\u{0332}',   // COMBINING LOW LINE
    '\u{00A0}',   // NO-BREAK SPACE
    '\u{00AD}',   // SOFT HYPHEN
    '\u{034F}',   // COMBINING GRAPHEME JOINER
    '\u{115F}',   // HANGUL CHOSEONG FILLER
    '\u{180E}',   // MONGOLIAN VOWEL SEPARATOR
    '\u{2000}',   // EN QUAD
    '\u{200B}',   // ZERO WIDTH SPACE
    '\u{200C}',   // ZERO WIDTH NON-JOINER
    '\u{200D}',   // ZERO WIDTH JOINER
    '\u{200E}',   // LEFT-TO-RIGHT MARK
    '\u{202E}',   // RIGHT-TO-LEFT OVERRIDE
    '\u{2028}',   // LINE SEPARATOR
    '\u{2060}',   // WORD JOINER
    '\u{2066}',   // LEFT-TO-RIGHT ISOLATE
    '\u{3000}',   // IDEOGRAPHIC SPACE
    '\u{3164}',   // HANGUL FILLER
    '\u{FE0F}',   // VARIATION SELECTOR-16
    '\u{FEFF}',   // BYTE ORDER MARK
    '\u{FFFC}',   // OBJECT REPLACEMENT CHARACTER
    '\u{FFFD}',   // REPLACEMENT CHARACTER
    '\u{FFFE}',   // noncharacter
    '\u{FFFF}',   // noncharacter
    '\u{E000}',   // private use
    '\u{10400}',  // DESERET CAPITAL LONG I -> U+10428
    '\u{104B0}',  // OSAGE CAPITAL A
    '\u{10C80}',  // OLD HUNGARIAN CAPITAL A
    '\u{118A0}',  // WARANG CITI CAPITAL NGAA
    '\u{16E40}',  // MEDEFAIDRIN CAPITAL M
    '\u{1E900}',  // ADLAM CAPITAL ALIF
    '\u{10570}',  // VITHKUQI CAPITAL A (Unicode 14)
    '\u{10D50}',  // GARAY CAPITAL A (Unicode 16)
    '\u{1D400}',  // MATHEMATICAL BOLD CAPITAL A
    '\u{1D41A}',  // MATHEMATICAL BOLD SMALL A
    '\u{1D7CE}',  // MATHEMATICAL BOLD DIGIT ZERO
    '\u{1F130}',  // SQUARED LATIN CAPITAL A
    '\u{1F1E6}',  // REGIONAL INDICATOR A
    '\u{1F600}',  // emoji
    '\u{E0041}',  // TAG LATIN CAPITAL LETTER A
    '\u{E0061}',  // TAG LATIN SMALL LETTER A
    '\u{F0000}',  // supplementary private use
    '\u{10FFFF}', // last code point
];

/// The deterministic corpus.
pub(crate) fn corpus() -> Vec<(String, &'static str)> {
    let mut c = Corpus {
        names: Vec::new(),
        seen: HashSet::new(),
    };
    let max_localpart = 255 - 2 - SERVER_NAME.len();

    // ASCII edge cases.
    for name in [
        "a",
        "z",
        "alice",
        "Alice",
        "ALICE",
        "aLiCe",
        "a.b_c=d-e/f+g",
        "0a",
        "a0",
        "0123456789abcdefghijklmnopqrstuvwxyz._=-/+",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "al ice",
        " alice",
        "alice ",
        "al:ice",
        "@alice",
        "@alice:e2e.test",
        "alice:e2e.test",
        "al@ice",
        "al!ce",
        "al#ice",
        "al$ice",
        "al%ice",
        "al%20ice",
        "al&ice",
        "al*ice",
        "al'ice",
        "al\"ice",
        "al\\ice",
        "al`ice",
        "al~ice",
        "al^ice",
        "al|ice",
        "al?ice",
        "al,ice",
        "al;ice",
        "al<ice>",
        "(alice)",
        "[alice]",
        "{alice}",
        "a/../b",
        "../alice",
        "./alice",
        "a//b",
        "alice/",
        "/alice",
        "null",
        "undefined",
        "true",
        "None",
        "NaN",
        "-1",
        "+1",
        "1.0",
        "1e3",
        "1_000",
        "0x1F",
        "--",
        "-a",
        "a-",
        "=a=",
        "+a+",
        ".a.",
        "a..b",
        "\talice",
        "alice\n",
        "ali\rce",
        "ali\u{0}ce",
        "\u{0}",
        "\u{7f}alice",
        "alice\u{1b}[31m",
    ] {
        c.add("ascii-edge", name);
    }

    // Every character U+0000..U+00FF alone and embedded.
    for b in 0u32..=0xFF {
        let ch = char::from_u32(b).unwrap();
        c.add("latin1-single", ch.to_string());
    }
    for b in 0u32..=0xFF {
        let ch = char::from_u32(b).unwrap();
        c.add("latin1-embedded", format!("a{ch}b"));
        c.add("latin1-embedded", format!("{ch}abc"));
        c.add("latin1-embedded", format!("abc{ch}"));
        c.add("latin1-embedded", format!("{ch}{ch}"));
    }

    // Grammar boundaries.
    let symbols = ['.', '_', '=', '-', '/', '+'];
    for s in symbols {
        for name in [
            format!("{s}"),
            format!("{s}{s}"),
            format!("{s}abc"),
            format!("abc{s}"),
            format!("a{s}b"),
            format!("{s}1"),
            format!("1{s}"),
            format!("1{s}2"),
            format!("{s}A"),
            format!("A{s}"),
        ] {
            c.add("grammar-boundary", name);
        }
        for t in symbols {
            c.add("grammar-boundary", format!("{s}{t}"));
            c.add("grammar-boundary", format!("a{s}{t}b"));
        }
    }
    for name in ["_", "__", "_a", "_1", "_A", "a_", "_bridge", "__x", "a__b"] {
        c.add("grammar-boundary", name);
    }
    for d in 0..10 {
        c.add("grammar-boundary", d.to_string());
    }
    for n in 2..=24 {
        let digits: String = (0..n).map(|i| char::from(b'0' + (i % 10) as u8)).collect();
        c.add("grammar-boundary", digits.clone());
        c.add("grammar-boundary", format!("{digits}a"));
        c.add("grammar-boundary", format!("a{digits}"));
        c.add("grammar-boundary", format!("{digits}A"));
    }
    for name in [
        "00",
        "000",
        "0000000000",
        "123",
        "0123456789",
        "9".repeat(30).as_str(),
    ] {
        c.add("grammar-boundary", name);
    }

    // Lengths around the 255-byte user ID (245-byte localpart on e2e.test)
    // and around Synapse's 512-character request limit.
    for n in (1..=12).chain(max_localpart - 12..=max_localpart + 12) {
        c.add("length", "a".repeat(n));
        c.add("length", "A".repeat(n));
        c.add("length", "1".repeat(n));
        c.add("length", format!("{}a", "1".repeat(n - 1)));
        c.add("length", format!("_{}", "a".repeat(n - 1)));
        c.add("length", format!("{}\u{212A}", "a".repeat(n - 1)));
        c.add("length", "\u{212A}".repeat(n));
        c.add("length", format!("{}\u{0130}", "a".repeat(n - 1)));
        c.add("length", format!("{}.", "a".repeat(n - 1)));
    }
    for n in [255, 256, 300, 400, 510, 511, 512, 513, 514, 600, 1000] {
        c.add("length", "a".repeat(n));
        c.add("length", "1".repeat(n));
        c.add("length", "\u{212A}".repeat(n));
        c.add("length", "\u{00E9}".repeat(n));
    }

    // Special Unicode characters alone, as a prefix, suffix and infix, and
    // inside a plain name.
    for &ch in SPECIAL_CHARS {
        for name in [
            ch.to_string(),
            format!("{ch}abc"),
            format!("abc{ch}"),
            format!("a{ch}b"),
            format!("{ch}{ch}"),
            format!("{ch}elvin"),
            format!("ali{ch}e"),
            format!("A{ch}"),
        ] {
            c.add("unicode-special", name);
        }
    }
    for name in [
        "\u{212A}elvin",
        "K\u{212A}elvin",
        "\u{212A}\u{212A}",
        "\u{212A}",
        "\u{0130}van",
        "\u{0130}",
        "\u{017F}am",
        "\u{212B}ngstrom",
        "\u{03A3}",
        "A\u{03A3}",
        "A\u{03A3}B",
        "\u{03A3}\u{03A3}",
        "\u{0391}\u{03A3}",
        "a\u{03A3}.b",
        "\u{1E9E}",
        "STRA\u{1E9E}E",
    ] {
        c.add("unicode-special", name);
    }
    // Fullwidth A-Z, a-z, 0-9 alone and as a prefix.
    for range in [0xFF21u32..=0xFF3A, 0xFF41..=0xFF5A, 0xFF10..=0xFF19] {
        for cp in range {
            let ch = char::from_u32(cp).unwrap();
            c.add("unicode-fullwidth", ch.to_string());
            c.add("unicode-fullwidth", format!("{ch}lice"));
        }
    }
    let fullwidth = |s: &str| -> String {
        s.chars()
            .map(|ch| char::from_u32(ch as u32 - 0x21 + 0xFF01).unwrap())
            .collect()
    };
    c.add("unicode-fullwidth", fullwidth("alice"));
    c.add("unicode-fullwidth", fullwidth("ADMIN"));

    // Combining marks after a letter, alone and stacked.
    for cp in 0x0300u32..=0x036F {
        let mark = char::from_u32(cp).unwrap();
        c.add("combining", format!("a{mark}"));
        c.add("combining", format!("{mark}abc"));
    }
    for cp in (0x1AB0u32..=0x1AFF)
        .chain(0x1DC0..=0x1DFF)
        .chain(0x20D0..=0x20FF)
        .chain(0xFE20..=0xFE2F)
    {
        if let Some(mark) = char::from_u32(cp) {
            c.add("combining", format!("a{mark}b"));
        }
    }
    c.add("combining", "a\u{301}\u{301}\u{301}\u{301}\u{301}\u{301}");
    c.add("combining", "e\u{301}lise");
    c.add("combining", "\u{e9}lise");

    // Reserved names, their look-alikes, and confusable spellings.
    for &reserved in DEFAULT_RESERVED {
        let upper = reserved.to_uppercase();
        let dotted: String = reserved
            .chars()
            .flat_map(|ch| [ch, '.'])
            .collect::<String>()
            .trim_end_matches('.')
            .to_owned();
        let leet: String = reserved
            .chars()
            .map(|ch| match ch {
                'o' => '0',
                'i' => '1',
                'l' => '1',
                'e' => '3',
                'a' => '4',
                's' => '5',
                't' => '7',
                ch => ch,
            })
            .collect();
        let capital_first = {
            let mut chars = reserved.chars();
            let first = chars.next().unwrap().to_ascii_uppercase();
            format!("{first}{}", chars.as_str())
        };
        let cyrillic: String = reserved
            .chars()
            .map(|ch| match ch {
                'a' => '\u{0430}',
                'e' => '\u{0435}',
                'o' => '\u{043E}',
                'p' => '\u{0440}',
                'c' => '\u{0441}',
                ch => ch,
            })
            .collect();
        for name in [
            reserved.to_owned(),
            upper,
            capital_first,
            dotted,
            leet,
            cyrillic,
            reserved.replace('m', "rn"),
            reserved.replace('w', "vv"),
            reserved.replace('k', "\u{212A}"),
            format!("{reserved}_"),
            format!("{reserved}-"),
            format!("{reserved}1"),
            format!("{reserved}s"),
            format!("{reserved}x"),
            format!("x{reserved}"),
            format!("the{reserved}"),
            format!("{reserved}.{reserved}"),
            format!("_{reserved}"),
        ] {
            c.add("reserved-confusable", name);
        }
    }
    for name in [
        "adm1n",
        "adrnin",
        "a.d.m.i.n",
        "support_",
        "r00t",
        "p0stmaster",
        "m0derator",
        "4dmin",
        "adm-in",
        "administrators",
        "admins",
        "rooty",
        "supporter",
        "\u{0430}dmin",
        "\u{0410}DMIN",
        "\u{FF41}dmin",
        "ADM\u{0130}N",
        "adm\u{0131}n",
        "\u{212A}evin",
    ] {
        c.add("reserved-confusable", name);
    }

    // Long strings.
    for n in [2000, 5000, 10000] {
        c.add("long", "a".repeat(n));
        c.add("long", "\u{212A}".repeat(n));
        c.add("long", "\u{1F600}".repeat(n / 4));
        c.add("long", "a\u{301}".repeat(n / 2));
    }

    // Every BMP character that changes when lower-cased (upper-case and
    // title-case letters and more) or is upper-case, as a prefix of "abc".
    for cp in 0u32..=0xFFFF {
        let Some(ch) = char::from_u32(cp) else {
            continue;
        };
        let lower: String = ch.to_lowercase().collect();
        if ch.is_uppercase() || lower != ch.to_string() {
            c.add("bmp-case-sweep", format!("{ch}abc"));
        }
    }
    // The same for the other planes.
    for cp in 0x10000u32..=0x10FFFF {
        let Some(ch) = char::from_u32(cp) else {
            continue;
        };
        let lower: String = ch.to_lowercase().collect();
        if ch.is_uppercase() || lower != ch.to_string() {
            c.add("astral-case-sweep", format!("{ch}abc"));
        }
    }
    // Every 7th BMP code point (surrogates excluded) inside a name.
    for cp in (0x100u32..=0xFFFF).step_by(7) {
        if let Some(ch) = char::from_u32(cp) {
            c.add("bmp-stride", format!("a{ch}b"));
        }
    }
    c.names
}

// === the verdicts ===

/// Synapse's answer to the first registration step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SynapseVerdict {
    /// `401`: the username passed; UIA would continue.
    Accepted,
    /// `400 M_INVALID_USERNAME`, with Synapse's message.
    Invalid(String),
    /// Anything else.
    Other {
        status: u16,
        errcode: String,
        error: String,
    },
}

impl SynapseVerdict {
    fn accepted(&self) -> bool {
        matches!(self, SynapseVerdict::Accepted)
    }

    /// A short label for tables.
    fn label(&self) -> String {
        match self {
            SynapseVerdict::Accepted => "401 (accepted)".into(),
            SynapseVerdict::Invalid(message) => {
                format!("400 M_INVALID_USERNAME ({})", synapse_rule(message))
            }
            SynapseVerdict::Other {
                status,
                errcode,
                error,
            } => format!("{status} {errcode} \"{error}\""),
        }
    }
}

/// Which of Synapse's checks produced an `M_INVALID_USERNAME` message.
pub(crate) fn synapse_rule(message: &str) -> &'static str {
    if message.starts_with("User ID can only contain") {
        "characters"
    } else if message.starts_with("User ID cannot be empty") {
        "empty"
    } else if message.starts_with("User ID may not begin with _") {
        "leading underscore"
    } else if message.starts_with("User ID may not be longer") {
        "too long"
    } else if message.starts_with("Numeric user IDs") {
        "numeric"
    } else {
        "other message"
    }
}

pub(crate) type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn post(client: &HttpClient, url: &str, body: String) -> (u16, serde_json::Value) {
    let request = http::Request::builder()
        .method(http::Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let exchange = async {
        let response = client.request(request).await.expect("synapse answered");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    };
    let (status, body) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("synapse did not answer within {REQUEST_TIMEOUT:?}"));
    let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// Synapse's verdict on every name, `CONCURRENCY` requests in flight.
async fn synapse_verdicts(synapse: &Synapse, names: &[String]) -> Vec<SynapseVerdict> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http();
    let url = Arc::new(format!("{}/_matrix/client/v3/register", synapse.url()));
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, name) in names.iter().enumerate() {
        let body = serde_json::json!({ "username": name, "password": PASSWORD }).to_string();
        let (client, url, permits) = (client.clone(), url.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let (status, json) = post(&client, &url, body).await;
            let field = |key: &str| json[key].as_str().unwrap_or("").to_owned();
            let verdict = match (status, field("errcode").as_str()) {
                (401, _) if json["flows"].is_array() => SynapseVerdict::Accepted,
                (400, "M_INVALID_USERNAME") => SynapseVerdict::Invalid(field("error")),
                _ => SynapseVerdict::Other {
                    status,
                    errcode: field("errcode"),
                    error: field("error"),
                },
            };
            (index, verdict)
        });
    }
    let mut verdicts = vec![None; names.len()];
    while let Some(done) = tasks.join_next().await {
        let (index, verdict) = done.unwrap();
        verdicts[index] = Some(verdict);
    }
    verdicts.into_iter().map(Option::unwrap).collect()
}

/// Registers each name with dummy auth; returns the created user IDs (or
/// the failure).
async fn complete_registrations(
    synapse: &Synapse,
    names: &[String],
) -> Vec<Result<String, String>> {
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(CONCURRENCY)
        .build_http();
    let url = Arc::new(format!("{}/_matrix/client/v3/register", synapse.url()));
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (index, name) in names.iter().enumerate() {
        let body = serde_json::json!({
            "username": name,
            "password": PASSWORD,
            "auth": { "type": "m.login.dummy" },
            "inhibit_login": true,
        })
        .to_string();
        let (client, url, permits) = (client.clone(), url.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let (status, json) = post(&client, &url, body).await;
            let result = match json["user_id"].as_str() {
                Some(user_id) if status == 200 => Ok(user_id.to_owned()),
                _ => Err(format!("{status} {json}")),
            };
            (index, result)
        });
    }
    let mut results = vec![None; names.len()];
    while let Some(done) = tasks.join_next().await {
        let (index, result) = done.unwrap();
        results[index] = Some(result);
    }
    results.into_iter().map(Option::unwrap).collect()
}

/// What the installed Synapse's Python says, in one batch.
struct Oracle {
    lower: Vec<String>,
    accepted_codepoints: HashSet<u32>,
    changed: BTreeMap<u32, String>,
    unicode_version: String,
    python: String,
}

fn oracle(names: &[String]) -> Oracle {
    let dir = synapse::target_dir().join("e2e-report");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("username-corpus-names.json");
    let output = dir.join("username-corpus-oracle.json");
    std::fs::write(&input, serde_json::to_vec(names).unwrap()).unwrap();
    let result = std::process::Command::new(synapse::python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/e2e/py/username_oracle.py"
        ))
        .arg(&input)
        .arg(&output)
        .output()
        .expect("run username_oracle.py");
    assert!(
        result.status.success(),
        "username_oracle.py failed: {}",
        String::from_utf8_lossy(&result.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&output).unwrap()).unwrap();
    let _ = std::fs::remove_file(&input);
    let _ = std::fs::remove_file(&output);
    Oracle {
        lower: json["lower"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect(),
        accepted_codepoints: json["accepted_codepoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect(),
        changed: json["changed"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.as_str().unwrap().to_owned()))
            .collect(),
        unicode_version: json["unicode_version"].as_str().unwrap().to_owned(),
        python: json["python"].as_str().unwrap().to_owned(),
    }
}

// === the report ===

/// A name as it can be read in a report: escaped, long ones shortened.
pub(crate) fn show(name: &str) -> String {
    let chars = name.chars().count();
    if chars > 40 {
        let head: String = name.chars().take(24).collect();
        format!("{head:?}… ({chars} chars, {} bytes)", name.len())
    } else {
        format!("{name:?}")
    }
}

fn gate_label(verdict: &Result<String, UsernameRule>) -> String {
    match verdict {
        Ok(_) => "accept".into(),
        Err(rule) => format!("reject: {}", rule.name()),
    }
}

/// Why the default policy refuses a name Synapse accepts.
fn explain_rule(rule: UsernameRule) -> &'static str {
    match rule {
        UsernameRule::Reserved => {
            "the operator's reserved list (`username.reserved`): answered as taken"
        }
        UsernameRule::Lookalike => {
            "a look-alike of a reserved name (`username.reserved_lookalikes`): same skeleton"
        }
        UsernameRule::DenyPattern => "an operator deny pattern",
        _ => "UNEXPLAINED: a grammar rule Synapse does not apply",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_username_verdicts_agree_with_synapse() {
    let started = Instant::now();
    let corpus = corpus();
    let names: Vec<String> = corpus.iter().map(|(n, _)| n.clone()).collect();
    assert!(names.len() >= 10_000, "corpus has {} names", names.len());

    let grammar_only = UsernamePolicy::new(
        &UsernameConfig {
            reserved: Vec::new(),
            reserved_lookalikes: false,
            deny_patterns: Vec::new(),
            ..UsernameConfig::default()
        },
        SERVER_NAME,
    );
    let default_policy = UsernamePolicy::new(&UsernameConfig::default(), SERVER_NAME);
    let gate: Vec<Result<String, UsernameRule>> =
        names.iter().map(|n| grammar_only.check(n, false)).collect();
    let gate_default: Vec<Result<String, UsernameRule>> = names
        .iter()
        .map(|n| default_policy.check(n, false))
        .collect();

    // Synapse's own functions, in one batch.
    let oracle_started = Instant::now();
    let oracle = oracle(&names);
    assert_eq!(oracle.lower.len(), names.len());
    let oracle_time = oracle_started.elapsed();

    // Every code point, offline: the gate accepts "x" + c exactly when
    // Synapse's character check accepts ("x" + c).lower().
    let mut codepoint_gate_only = Vec::new();
    let mut codepoint_synapse_only = Vec::new();
    let mut codepoints = 0usize;
    let mut lower_diffs = Vec::new();
    for cp in 0u32..=0x10FFFF {
        let Some(ch) = char::from_u32(cp) else {
            continue;
        };
        codepoints += 1;
        let gate_ok = grammar_only.check(&format!("x{ch}"), false).is_ok();
        let synapse_ok = oracle.accepted_codepoints.contains(&cp);
        match (gate_ok, synapse_ok) {
            (true, false) => codepoint_gate_only.push(cp),
            (false, true) => codepoint_synapse_only.push(cp),
            _ => {}
        }
        let ours = map_case(&ch.to_string());
        let theirs = oracle
            .changed
            .get(&cp)
            .cloned()
            .unwrap_or_else(|| ch.to_string());
        if ours != theirs {
            lower_diffs.push((cp, ours, theirs));
        }
    }

    // Synapse over HTTP.
    let synapse = Synapse::start("").await;
    let http_started = Instant::now();
    let verdicts = synapse_verdicts(&synapse, &names).await;
    let http_time = http_started.elapsed();

    // Compare.
    let mut bugs = Vec::new(); // gate accepts, Synapse does not
    let mut mapping_bugs = Vec::new(); // both accept, different localpart
    let mut unexplained_gate_only = Vec::new(); // grammar-only gate refuses, Synapse accepts
    let mut both_accept = 0usize;
    let mut both_reject: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut synapse_other: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut by_category: BTreeMap<&str, [usize; 4]> = BTreeMap::new();
    let mut name_lower_diffs = 0usize;
    let mut name_lower_diffs_accepted = 0usize;
    for (i, name) in names.iter().enumerate() {
        let row = by_category.entry(corpus[i].1).or_default();
        if map_case(name) != oracle.lower[i] {
            name_lower_diffs += 1;
            if gate[i].is_ok() || verdicts[i].accepted() {
                name_lower_diffs_accepted += 1;
            }
        }
        if let SynapseVerdict::Other { .. } = &verdicts[i] {
            synapse_other
                .entry(verdicts[i].label())
                .or_default()
                .push(i);
        }
        match (&gate[i], verdicts[i].accepted()) {
            (Ok(mapped), true) => {
                both_accept += 1;
                row[0] += 1;
                if *mapped != oracle.lower[i] {
                    mapping_bugs.push(i);
                }
            }
            (Ok(_), false) => {
                bugs.push(i);
                row[3] += 1;
            }
            (Err(rule), false) => {
                row[1] += 1;
                *both_reject
                    .entry((rule.name().to_owned(), verdicts[i].label()))
                    .or_default() += 1;
            }
            (Err(_), true) => {
                unexplained_gate_only.push(i);
                row[2] += 1;
            }
        }
    }
    // The default policy: every extra refusal must be an operator rule.
    let mut default_only: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
    let mut default_bugs = Vec::new();
    for i in 0..names.len() {
        match (&gate_default[i], verdicts[i].accepted()) {
            (Ok(_), false) => default_bugs.push(i),
            (Err(rule), true) if gate[i].is_ok() => {
                default_only.entry(rule.name()).or_default().push(i)
            }
            _ => {}
        }
    }
    let unexplained_default: Vec<usize> = default_only
        .iter()
        .filter(|(rule, _)| !matches!(**rule, "reserved" | "lookalike"))
        .flat_map(|(_, v)| v.iter().copied())
        .collect();

    // A sample of accepted names registered for real: the user ID Synapse
    // creates must be the gate's mapped name. Non-ASCII and upper-case
    // inputs first, then the longest, then every n-th.
    let mut accepted: Vec<usize> = (0..names.len())
        .filter(|&i| gate[i].is_ok() && verdicts[i].accepted())
        .collect();
    accepted.sort_by_key(|&i| {
        let name = &names[i];
        let class = if !name.is_ascii() {
            0
        } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
            1
        } else {
            2
        };
        (class, std::cmp::Reverse(name.len()), i)
    });
    let mut sample = Vec::new();
    let mut sample_mapped = HashSet::new();
    let stride = (accepted.len() / COMPLETION_SAMPLE).max(1);
    for (rank, &i) in accepted.iter().enumerate() {
        if sample.len() >= COMPLETION_SAMPLE {
            break;
        }
        let interesting = rank < COMPLETION_SAMPLE / 2 && names[i] != *gate[i].as_ref().unwrap();
        if (interesting || rank % stride == 0)
            && sample_mapped.insert(gate[i].as_ref().unwrap().clone())
        {
            sample.push(i);
        }
    }
    let sample_names: Vec<String> = sample.iter().map(|&i| names[i].clone()).collect();
    let completion_started = Instant::now();
    let created = complete_registrations(&synapse, &sample_names).await;
    let completion_time = completion_started.elapsed();
    let mut completion_failures = Vec::new();
    for (k, &i) in sample.iter().enumerate() {
        let expected = format!("@{}:{SERVER_NAME}", gate[i].as_ref().unwrap());
        if created[k].as_deref() != Ok(expected.as_str()) {
            completion_failures.push(format!(
                "{} -> gate {expected}, Synapse {:?}",
                show(&names[i]),
                created[k]
            ));
        }
    }
    drop(synapse);

    // The report.
    let mut report = String::new();
    let total = names.len();
    let _ = writeln!(report, "# Username corpus: gate vs Synapse\n");
    let _ = writeln!(
        report,
        "Synapse {} (Python {}, Unicode {}), server name `{SERVER_NAME}`; the gate's \
         `UsernamePolicy` built with `reserved = []`, `reserved_lookalikes = false`, \
         `deny_patterns = []` (grammar only), and separately with the default configuration.\n",
        synapse::PACKAGES[0].trim_start_matches("matrix-synapse=="),
        oracle.python,
        oracle.unicode_version
    );
    let _ = writeln!(
        report,
        "- corpus: {total} names; Synapse asked over HTTP with {CONCURRENCY} in flight in {:.1?}\n\
         - offline sweep: {codepoints} code points, `\"x\" + c` through the gate vs Synapse's \
         `contains_invalid_mxid_characters((\"x\" + c).lower())`\n\
         - completed registrations: {} accepted names registered with dummy auth in {:.1?}\n",
        http_time,
        sample.len(),
        completion_time
    );
    let _ = writeln!(report, "## Agreement (grammar-only policy)\n");
    let _ = writeln!(report, "| outcome | names |\n|---|---|");
    let _ = writeln!(report, "| both accept | {both_accept} |");
    let _ = writeln!(
        report,
        "| both reject | {} |",
        both_reject.values().sum::<usize>()
    );
    let _ = writeln!(
        report,
        "| gate-only reject | {} |",
        unexplained_gate_only.len()
    );
    let _ = writeln!(
        report,
        "| Synapse-only reject (gate accepts: a gate bug) | {} |\n",
        bugs.len()
    );
    let _ = writeln!(
        report,
        "Both reject, by the gate's rule and Synapse's answer (the two check in a different \
         order, so an all-digit name over the length limit is `numeric` for one and `too long` \
         for the other):\n"
    );
    let _ = writeln!(report, "| gate rule | Synapse | names |\n|---|---|---|");
    for ((rule, answer), n) in &both_reject {
        let _ = writeln!(report, "| {rule} | {answer} | {n} |");
    }
    let _ = writeln!(
        report,
        "\nBy corpus category (both accept / both reject / gate-only reject / Synapse-only reject):\n"
    );
    let _ = writeln!(
        report,
        "| category | both accept | both reject | gate-only | Synapse-only |\n|---|---|---|---|---|"
    );
    for (category, [a, r, g, s]) in &by_category {
        let _ = writeln!(report, "| {category} | {a} | {r} | {g} | {s} |");
    }
    let _ = writeln!(
        report,
        "\n## Synapse answers other than 401 / 400 M_INVALID_USERNAME\n"
    );
    if synapse_other.is_empty() {
        let _ = writeln!(report, "None.");
    }
    for (label, indices) in &synapse_other {
        let gate_accepts = indices.iter().filter(|&&i| gate[i].is_ok()).count();
        let over_512 = indices
            .iter()
            .filter(|&&i| names[i].chars().count() > 512)
            .count();
        let why = if label.contains("Invalid username") && over_512 == indices.len() {
            "Synapse refuses a `username` longer than 512 characters, before lower-casing it, \
             with `M_UNKNOWN`; the gate refuses these as well (the user ID would exceed 255 bytes)."
        } else {
            "UNEXPECTED: not explained by Synapse's 512-character limit."
        };
        let _ = writeln!(
            report,
            "- `{label}`: {} names (gate accepts {gate_accepts}), e.g. {}. {why}",
            indices.len(),
            indices
                .iter()
                .take(3)
                .map(|&i| show(&names[i]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let _ = writeln!(report, "\n## Intentional differences (default policy)\n");
    let _ = writeln!(
        report,
        "Names Synapse and the grammar-only gate accept that the default configuration refuses:\n"
    );
    let _ = writeln!(
        report,
        "| rule | names | reason | examples |\n|---|---|---|---|"
    );
    for (rule_name, indices) in &default_only {
        let rule = gate_default[indices[0]].clone().unwrap_err();
        let _ = writeln!(
            report,
            "| {rule_name} | {} | {} | {} |",
            indices.len(),
            explain_rule(rule),
            indices
                .iter()
                .take(8)
                .map(|&i| show(&names[i]).replace('|', "\\|"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let lower_diffs_grammar: Vec<u32> = lower_diffs
        .iter()
        .filter(|(_, ours, theirs)| {
            ours.chars().all(is_grammar_char) || theirs.chars().all(is_grammar_char)
        })
        .map(|(cp, _, _)| *cp)
        .collect();
    let _ = writeln!(report, "\n## Case mapping\n");
    let _ = writeln!(
        report,
        "- corpus names whose `map_case` differs from Python's `str.lower()`: {name_lower_diffs}, \
         of which either side accepts {name_lower_diffs_accepted}\n\
         - code points whose lower case differs between Rust (std `char::to_lowercase`) and Python {} (Unicode {}): {}, \
         of which {} lower-case into the localpart grammar on either side. These are \
         characters that got a case mapping in a Unicode version newer than Python's; Rust maps \
         them to another non-ASCII letter, Python leaves them, and both refuse them.",
        oracle.python,
        oracle.unicode_version,
        lower_diffs.len(),
        lower_diffs_grammar.len()
    );
    for (cp, ours, theirs) in lower_diffs.iter().take(60) {
        let _ = writeln!(report, "  - U+{cp:04X}: Rust {ours:?}, Python {theirs:?}");
    }
    let _ = writeln!(report, "\n## Disagreements\n");
    let mut failures = Vec::new();
    let mut section = |title: &str, lines: Vec<String>| {
        let _ = writeln!(report, "### {title}: {}\n", lines.len());
        for line in lines.iter().take(200) {
            let _ = writeln!(report, "- {line}");
        }
        let _ = writeln!(report);
        if !lines.is_empty() {
            failures.push(format!(
                "{title}: {}\n  {}",
                lines.len(),
                lines
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
        }
    };
    section(
        "GATE BUG: the gate accepts, Synapse refuses",
        bugs.iter()
            .map(|&i| {
                format!(
                    "{} -> gate accepts as {:?}, Synapse {}",
                    show(&names[i]),
                    gate[i].as_ref().unwrap(),
                    verdicts[i].label()
                )
            })
            .collect(),
    );
    section(
        "GATE BUG (default policy): the gate accepts, Synapse refuses",
        default_bugs
            .iter()
            .map(|&i| format!("{} -> Synapse {}", show(&names[i]), verdicts[i].label()))
            .collect(),
    );
    section(
        "GATE BUG: both accept, mapped name differs from Synapse's lower()",
        mapping_bugs
            .iter()
            .map(|&i| {
                format!(
                    "{} -> gate {:?}, Synapse {:?}",
                    show(&names[i]),
                    gate[i].as_ref().unwrap(),
                    oracle.lower[i]
                )
            })
            .collect(),
    );
    section(
        "GATE BUG: a completed registration created another user ID",
        completion_failures,
    );
    section(
        "Unexplained: the grammar-only gate refuses, Synapse accepts",
        unexplained_gate_only
            .iter()
            .map(|&i| format!("{} -> gate {}", show(&names[i]), gate_label(&gate[i])))
            .collect(),
    );
    section(
        "Unexplained: the default policy refuses by a rule other than reserved/look-alike",
        unexplained_default
            .iter()
            .map(|&i| {
                format!(
                    "{} -> gate {}",
                    show(&names[i]),
                    gate_label(&gate_default[i])
                )
            })
            .collect(),
    );
    section(
        "GATE BUG: code points the gate accepts and Synapse's character check refuses",
        codepoint_gate_only
            .iter()
            .map(|cp| format!("U+{cp:04X}"))
            .collect(),
    );
    section(
        "GATE BUG: code points whose lower case differs between Rust and Python and is in the grammar",
        lower_diffs_grammar
            .iter()
            .map(|cp| format!("U+{cp:04X}"))
            .collect(),
    );
    section(
        "Unexplained: Synapse answers not explained by its 512-character limit",
        synapse_other
            .iter()
            .flat_map(|(label, v)| v.iter().map(move |&i| (label, i)))
            .filter(|(label, i)| {
                !(label.contains("Invalid username") && names[*i].chars().count() > 512)
            })
            .map(|(label, i)| {
                format!(
                    "{} -> Synapse {label}, gate {}",
                    show(&names[i]),
                    gate_label(&gate[i])
                )
            })
            .collect(),
    );
    section(
        "Unexplained: code points Synapse's character check accepts and the gate refuses",
        codepoint_synapse_only
            .iter()
            .map(|cp| format!("U+{cp:04X}"))
            .collect(),
    );
    let dir = synapse::target_dir().join("e2e-report");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("username-corpus.md");
    std::fs::write(&path, &report).unwrap();

    eprintln!(
        "username corpus: {total} names ({codepoints} code points offline); both accept \
         {both_accept}, both reject {}, gate-only reject {} (default policy adds {}: {}), \
         Synapse-only reject {}; Synapse other answers {}; {} registrations completed; \
         oracle {oracle_time:.1?}, HTTP {http_time:.1?}, completions {completion_time:.1?}, \
         total {:.1?}; report {}",
        both_reject.values().sum::<usize>(),
        unexplained_gate_only.len(),
        default_only.values().map(Vec::len).sum::<usize>(),
        default_only
            .iter()
            .map(|(rule, v)| format!("{rule} {}", v.len()))
            .collect::<Vec<_>>()
            .join(", "),
        bugs.len(),
        synapse_other.values().map(Vec::len).sum::<usize>(),
        sample.len(),
        started.elapsed(),
        path.display()
    );
    assert!(
        failures.is_empty(),
        "gate and Synapse disagree (see {}):\n{}",
        path.display(),
        failures.join("\n")
    );
}
