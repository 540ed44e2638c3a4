//! A runtime virtual address: a number in the model, `"0x…"` hex in files,
//! so that snapshots stay readable and JSON stays what the contract shows.
use std::{fmt, str::FromStr};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A runtime virtual address (or a file offset, in [`super::MappingInfo`]).
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address(pub u64);

impl fmt::Display for Address {
    /// `0x401136`, as in the JSON.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Address {
    /// As `u64`'s, so `{:#x}` is `0x401136` and `{:x}` is `401136`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({:#x})", self.0)
    }
}

impl From<u64> for Address {
    fn from(v: u64) -> Self {
        Address(v)
    }
}

/// Why text is not an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseAddressError;

impl fmt::Display for ParseAddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED)
    }
}

impl std::error::Error for ParseAddressError {}

const EXPECTED: &str = "an address as a \"0x\"-prefixed hex string of at most 64 bits";

impl FromStr for Address {
    type Err = ParseAddressError;

    /// Only `0x` followed by hex digits: no sign, no bare decimal.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0x").ok_or(ParseAddressError)?;
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseAddressError);
        }
        u64::from_str_radix(digits, 16)
            .map(Address)
            .map_err(|_| ParseAddressError)
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Address;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Address, E> {
                v.parse()
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_reads_hex_strings() {
        for v in [0, 1, 0x401136, 0x7f1234567890, u64::MAX] {
            let a = Address(v);
            let text = serde_json::to_string(&a).unwrap();
            assert_eq!(text, format!("\"{v:#x}\""));
            assert_eq!(serde_json::from_str::<Address>(&text).unwrap(), a);
        }
        assert_eq!(Address(0x401136).to_string(), "0x401136");
        assert_eq!(format!("{:#x} {:x}", Address(255), Address(255)), "0xff ff");
        assert_eq!("0x00FF".parse(), Ok(Address(255)));
    }

    #[test]
    fn refuses_what_is_not_a_hex_string() {
        for bad in [
            r#""12""#,
            r#""0xzz""#,
            r#""0x""#,
            r#""""#,
            r#""0x+1""#,
            r#""-0x1""#,
            r#"" 0x1""#,
            r#""0x1ffffffffffffffff""#,
            "12",
            "4198710",
            "-1",
            "1.5",
            "null",
            "true",
            "[]",
        ] {
            let err = serde_json::from_str::<Address>(bad).unwrap_err();
            assert!(err.to_string().contains("hex"), "{bad}: {err}");
        }
    }
}
