//! A database record, read into what the gate uses of it: the ASN, its
//! name, and the country. Every field is optional, so one reader serves
//! the ASN and the country databases of each publisher.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use super::{skip, Country};

/// Longest network name kept (published names are far shorter).
const NAME_MAX: usize = 100;

/// What the databases say of one address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Network {
    /// The autonomous system number.
    pub asn: Option<u32>,
    /// The autonomous system's organisation, as the database names it.
    pub as_name: Option<Box<str>>,
    /// The country.
    pub country: Option<Country>,
}

impl Network {
    /// Whether the databases know nothing of the address.
    pub fn is_unknown(&self) -> bool {
        self.asn.is_none() && self.country.is_none()
    }

    /// The ASN part alone (the country comes from the country database).
    pub(super) fn without_country(self) -> Network {
        Network {
            country: None,
            ..self
        }
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RecordVisitor)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Network;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a MaxMind DB record (a map)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Network, A::Error> {
        let mut network = Network::default();
        let mut registered_country = None;
        while let Some(key) = map.next_key::<&'de str>()? {
            match key {
                // 64496 (MaxMind, DB-IP) or "AS64496" (IPinfo).
                "autonomous_system_number" | "asn" => {
                    network.asn = match map.next_value::<Loose<'de>>()? {
                        Loose::Number(n) => u32::try_from(n).ok(),
                        Loose::Text(text) => text.parse::<super::AsNumber>().ok().map(|a| a.0),
                        Loose::Code(_) | Loose::Other => None,
                    };
                }
                "autonomous_system_organization" | "as_name" | "name" => {
                    if let Loose::Text(name) = map.next_value::<Loose<'de>>()? {
                        network.as_name = Some(shown_name(name));
                    }
                }
                // { iso_code = "NL", … } (MaxMind, DB-IP) or "NL" (IPinfo).
                "country" | "country_code" => {
                    network.country = map.next_value::<Loose<'de>>()?.country();
                }
                "registered_country" => {
                    registered_country = map.next_value::<Loose<'de>>()?.country();
                }
                _ => skip(&mut map)?,
            }
        }
        // An address without a geolocated country (an anycast range) is
        // placed where its network is registered.
        network.country = network.country.or(registered_country);
        Ok(network)
    }
}

/// The name as kept: control characters dropped, cut at [`NAME_MAX`]
/// bytes on a character boundary.
fn shown_name(name: &str) -> Box<str> {
    let mut out = String::with_capacity(name.len().min(NAME_MAX));
    for c in name.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > NAME_MAX {
            break;
        }
        out.push(c);
    }
    out.into_boxed_str()
}

/// A field's value as far as the gate reads it: a record of another shape
/// than expected reads as nothing rather than failing the whole record.
enum Loose<'a> {
    Text(&'a str),
    Number(u64),
    /// A map: its `iso_code`, if any.
    Code(Option<&'a str>),
    Other,
}

impl Loose<'_> {
    fn country(&self) -> Option<Country> {
        match self {
            Loose::Text(code) | Loose::Code(Some(code)) => code.parse().ok(),
            _ => None,
        }
    }
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Loose<'de>, E> {
        Ok(Loose::Text(text))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Loose<'de>, E> {
        Ok(Loose::Number(n))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Loose<'de>, E> {
        Ok(u64::try_from(n).map_or(Loose::Other, Loose::Number))
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_borrowed_bytes<E: de::Error>(self, _: &'de [u8]) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Loose<'de>, E> {
        Ok(Loose::Other)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Loose::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose<'de>, A::Error> {
        let mut code = None;
        while let Some(key) = map.next_key::<&'de str>()? {
            if key == "iso_code" {
                if let Loose::Text(text) = map.next_value::<Loose<'de>>()? {
                    code = Some(text);
                }
            } else {
                skip(&mut map)?;
            }
        }
        Ok(Loose::Code(code))
    }
}
