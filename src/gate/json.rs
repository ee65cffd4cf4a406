//! Strict JSON for registration bodies.
//!
//! Homeservers disagree on duplicate keys (Synapse keeps the last one, other
//! parsers the first), so a body with a duplicate key at any depth is
//! refused: the gate and the homeserver could read different values. Numbers
//! keep their exact value (no rounding through `f64`), and object keys their order, so a re-serialization
//! changes nothing the gate did not mean to change.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::MatrixError;

/// Parses a registration body: a JSON object without duplicate keys.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, MatrixError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    if let Err(e) = NoDuplicates.deserialize(&mut de).and_then(|()| de.end()) {
        return Err(if e.to_string().starts_with(DUPLICATE) {
            MatrixError::bad_json(e.to_string())
        } else {
            MatrixError::not_json(format!("Content not JSON: {e}"))
        });
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(MatrixError::bad_json("Content must be a JSON object.")),
        Err(e) => Err(MatrixError::not_json(format!("Content not JSON: {e}"))),
    }
}

const DUPLICATE: &str = "duplicate key";

/// Walks a JSON document and fails on the first duplicate object key.
struct NoDuplicates;

impl<'de> DeserializeSeed<'de> for NoDuplicates {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicates {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(NoDuplicates)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(de::Error::custom(format!(
                    "{DUPLICATE} in JSON object: the homeserver could read another value than the gate"
                )));
            }
            map.next_value_seed(NoDuplicates)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        parse_object(body.as_bytes()).unwrap_err().errcode
    }

    #[test]
    fn duplicate_keys_at_any_depth_are_bad_json() {
        assert_eq!(code(r#"{"username":"a","username":"b"}"#), "M_BAD_JSON");
        assert_eq!(code(r#"{"auth":{"type":"x","type":"y"}}"#), "M_BAD_JSON");
        assert_eq!(code(r#"{"a":[{"k":1,"k":2}]}"#), "M_BAD_JSON");
        // Escapes do not hide a duplicate.
        assert_eq!(
            code(r#"{"username":"a","us\u0065rname":"b"}"#),
            "M_BAD_JSON"
        );
    }

    #[test]
    fn non_json_and_non_objects_are_refused() {
        assert_eq!(code(""), "M_NOT_JSON");
        assert_eq!(code("\u{feff}{}"), "M_NOT_JSON");
        assert_eq!(code(r#"{"a":NaN}"#), "M_NOT_JSON");
        assert_eq!(code("{} x"), "M_NOT_JSON");
        assert_eq!(code("[]"), "M_BAD_JSON");
        assert_eq!(code("\"s\""), "M_BAD_JSON");
        assert_eq!(code("null"), "M_BAD_JSON");
    }

    #[test]
    fn numbers_and_order_survive_a_round_trip() {
        let text = r#"{"z":1,"big":123456789012345678901234567890,"f":1.50,"e":-0.0,"a":{"y":true,"b":null}}"#;
        let map = parse_object(text.as_bytes()).unwrap();
        assert_eq!(serde_json::to_string(&map).unwrap(), text);
    }

    #[test]
    fn whitespace_around_the_object_is_accepted() {
        assert!(parse_object(b" \n{\"a\": 1}\n ").is_ok());
    }
}
