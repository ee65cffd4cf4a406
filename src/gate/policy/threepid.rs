//! `requestToken` bodies: the field types the spec gives them, and an
//! e-mail address read the way the homeserver reads it before mailing it.

use serde_json::{Map, Value};

use super::Refusal;
use crate::error::MatrixError;
use crate::gate::routes::Medium;

/// An e-mail address as the homeserver reads it before mailing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::gate) struct CanonicalEmail {
    /// The address forwarded: the local part as sent, `@`, the domain.
    pub(in crate::gate) address: String,
    /// Where the domain starts in `address`.
    at: usize,
}

impl CanonicalEmail {
    /// The domain, lower-cased, printable ASCII only.
    pub(in crate::gate) fn domain(&self) -> &str {
        &self.address[self.at..]
    }
}

/// Whether Python's `str.isspace()` holds for `c`: Unicode white space and
/// the four separators U+001C–U+001F, which `str.strip()` also removes.
fn python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Reads an address the way Synapse does before it sends mail: white space
/// by Python's definition stripped from both ends, exactly one `@`, the
/// domain lower-cased with Unicode case mapping (`fa\u{212A}einbox.com`, with
/// a KELVIN SIGN, is `fakeinbox.com`). Domain rules are matched on what
/// comes out, and it is what the homeserver receives, so the two cannot
/// read different domains. A domain that is still not printable ASCII
/// afterwards (control characters, spaces, Unicode letters a mail library
/// may map onto other ASCII names) is refused: it is to be sent in its
/// ASCII (punycode) form.
pub(in crate::gate) fn canonical_email(address: &str) -> Result<CanonicalEmail, Refusal> {
    let unusable = |why: &str| {
        Refusal::new(
            "email_address",
            MatrixError::threepid_denied(format!("The e-mail address cannot be used: {why}.")),
        )
    };
    let stripped = address.trim_matches(python_space);
    let Some((local, domain)) = stripped.split_once('@') else {
        return Err(unusable("it has no @"));
    };
    if domain.contains('@') {
        return Err(unusable("it has more than one @"));
    }
    let domain = domain.to_lowercase();
    if !domain.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(unusable(
            "write its domain in ASCII, without spaces or control characters (an international domain in its xn-- form)",
        ));
    }
    Ok(CanonicalEmail {
        at: local.len() + 1,
        address: format!("{local}@{domain}"),
    })
}

/// The field types the spec gives a `requestToken` body. Homeservers do not
/// all check them (Synapse answers 500 to a non-string `phone_number`), so
/// the gate does: required fields present, every known field well typed.
pub(in crate::gate) fn check_request_token(
    medium: Medium,
    object: &Map<String, Value>,
) -> Result<(), Refusal> {
    let (required, strings): (&[&str], &[&str]) = match medium {
        Medium::Email => (
            &["client_secret", "email", "send_attempt"],
            &[
                "client_secret",
                "email",
                "next_link",
                "id_server",
                "id_access_token",
            ],
        ),
        Medium::Msisdn => (
            &["client_secret", "country", "phone_number", "send_attempt"],
            &[
                "client_secret",
                "country",
                "phone_number",
                "next_link",
                "id_server",
                "id_access_token",
            ],
        ),
    };
    for field in required {
        if !object.contains_key(*field) {
            return Err(Refusal::new(
                "missing_param",
                MatrixError::missing_param(format!("Missing parameter: {field}")),
            ));
        }
    }
    for field in strings {
        if object.get(*field).is_some_and(|v| !v.is_string()) {
            return Err(Refusal::new(
                "bad_json",
                MatrixError::bad_json(format!("{field} must be a string.")),
            ));
        }
    }
    if object
        .get("send_attempt")
        .is_some_and(|v| !(v.is_u64() || v.is_i64()))
    {
        return Err(Refusal::new(
            "bad_json",
            MatrixError::bad_json("send_attempt must be an integer."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn email_addresses_are_read_as_synapse_reads_them() {
        let read = |address: &str| canonical_email(address).map(|c| c.address);
        assert_eq!(read("x@mailinator.com\u{1f}").unwrap(), "x@mailinator.com");
        assert_eq!(read("\u{1c}\t x@M.com\u{85}").unwrap(), "x@m.com");
        assert_eq!(read("x@fa\u{212A}einbox.com").unwrap(), "x@fakeinbox.com");
        assert_eq!(read("Ab.C@Example.ORG").unwrap(), "Ab.C@example.org");
        let canonical = canonical_email(" Ab@X.Org ").unwrap();
        assert_eq!(canonical.domain(), "x.org");
        for bad in [
            "nodomain",
            "a@b@c.org",
            "x@b\u{1f}.org",
            "x@b .org",
            "x@\u{e9}t\u{e9}.fr",
            "x@\u{ff4d}.org",
        ] {
            let refusal = read(bad).unwrap_err();
            assert_eq!(
                (refusal.rule, refusal.error.errcode),
                ("email_address", "M_THREEPID_DENIED"),
                "{bad:?}"
            );
        }
    }
}
