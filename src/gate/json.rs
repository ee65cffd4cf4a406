//! Strict JSON for registration bodies (and the admin API's).
//!
//! Homeservers disagree on duplicate keys (Synapse keeps the last one, other
//! parsers the first), so a body with a duplicate key at any depth is
//! refused: the gate and the homeserver could read different values. The
//! body is parsed once, and what is forwarded is the gate's re-serialization
//! of that parse, so the homeserver reads exactly what the gate decided on.
//! Integers within 64 bits and floats keep their value (larger integers are
//! carried as the nearest float); object keys are written in sorted order.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::MatrixError;

/// Parses a body that must be a JSON object without duplicate keys: a
/// registration body, or an admin API request.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, MatrixError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = StrictValue.deserialize(&mut de).and_then(|value| {
        de.end()?;
        Ok(value)
    });
    match value {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(MatrixError::bad_json("Content must be a JSON object.")),
        Err(e) if e.to_string().starts_with(DUPLICATE) => Err(MatrixError::bad_json(e.to_string())),
        Err(e) => Err(MatrixError::not_json(format!("Content not JSON: {e}"))),
    }
}

const DUPLICATE: &str = "duplicate key";

/// Builds a [`Value`] in one pass, failing on the first duplicate key.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(StrictValue)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "{DUPLICATE} {key:?} in JSON object: parsers disagree on which value counts"
                )));
            }
            let value = access.next_value_seed(StrictValue)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
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
    fn numbers_survive_a_round_trip_and_keys_come_out_sorted() {
        let text = r#"{"z":1,"max":18446744073709551615,"min":-9223372036854775808,"f":1.5,"e":-0.0,"a":{"y":true,"b":null}}"#;
        let map = parse_object(text.as_bytes()).unwrap();
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            r#"{"a":{"b":null,"y":true},"e":-0.0,"f":1.5,"max":18446744073709551615,"min":-9223372036854775808,"z":1}"#
        );
        // Out of float range is not JSON a homeserver could read either.
        assert_eq!(code(r#"{"e":1e400}"#), "M_NOT_JSON");
    }

    #[test]
    fn whitespace_around_the_object_is_accepted() {
        assert!(parse_object(b" \n{\"a\": 1}\n ").is_ok());
    }
}
