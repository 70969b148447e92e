//! Sizes as people write them, for flags and config keys: plain bytes (`1073741824`) or a whole
//! number with a binary unit, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB` (1024-based, the
//! one-letter forms in either case; a space before the unit is allowed): `4k`, `4KiB`, `512M`,
//! `1GiB`, `2 TiB`. The decimal-looking `kB`/`KB`/`MB`/`GB`/`TB` are refused with a hint (use
//! `MiB` or `GiB`), since whether they mean 1000 or 1024 is a guess either way.
//!
//! [`parse_size`] and its variants are clap value parsers (the error names the flag and the
//! value given); [`deserialize_size`] does the same for a TOML key, which may be an integer or a
//! string (`size_bytes = "1GiB"`).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// The block size a block group's size must be a multiple of.
pub const BLOCK_BYTES: u64 = 4096;

/// What a size setting accepts besides a well-formed value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeRule {
    /// Above 0.
    Positive,
    /// 0 too (for settings where 0 means "none" or "no limit").
    ZeroAllowed,
    /// Above 0 and a multiple of [`BLOCK_BYTES`].
    Blocks,
}

/// Binary units and their multipliers, matched without regard to case.
const UNITS: [(&str, u64); 13] = [
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tib", 1 << 40),
    ("p", 1 << 50),
    ("pib", 1 << 50),
    ("bytes", 1),
];

/// What to write instead of a decimal unit.
const DECIMAL_UNITS: [(&str, &str); 5] = [
    ("kb", "KiB"),
    ("mb", "MiB"),
    ("gb", "GiB"),
    ("tb", "TiB"),
    ("pb", "PiB"),
];

const FORMS: &str = "bytes (e.g. 4096) or a whole number with a unit K/KiB, M/MiB, G/GiB or T/TiB \
                     (powers of 1024), e.g. 4KiB, 512M, 1GiB";

/// A size above 0: bytes or a number with a binary unit (see the module docs).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size_with(s, SizeRule::Positive)
}

/// A size, 0 allowed.
pub fn parse_size_or_zero(s: &str) -> Result<u64, String> {
    parse_size_with(s, SizeRule::ZeroAllowed)
}

/// A size above 0 that is a multiple of [`BLOCK_BYTES`] (a block group's size).
pub fn parse_block_size(s: &str) -> Result<u64, String> {
    parse_size_with(s, SizeRule::Blocks)
}

/// A clap value parser for a size of type `T` (`usize`, `u32`, ...) under `rule`.
pub fn size_parser<T: TryFrom<u64>>(
    rule: SizeRule,
) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| {
        let v = parse_size_with(s, rule)?;
        narrow(v)
    }
}

/// `v` as a `T`, or an error that gives the largest `T`.
fn narrow<T: TryFrom<u64>>(v: u64) -> Result<T, String> {
    T::try_from(v).map_err(|_| {
        let mut max = u64::MAX;
        while T::try_from(max).is_err() {
            max >>= 1;
        }
        format!("{v} bytes is too large for this setting (at most {max})")
    })
}

/// Parses `s` (see the module docs) and applies `rule`. The message does not repeat `s`: clap
/// and [`deserialize_size`] name the flag or key and the value given.
pub fn parse_size_with(s: &str, rule: SizeRule) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err(format!("no size given; give {FORMS}"));
    }
    if t.starts_with('-') {
        return Err("a size cannot be negative".into());
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(format!("not a size; give {FORMS}"));
    }
    let (num, rest) = t.split_at(digits);
    if rest.starts_with(['.', ',']) {
        return Err(format!(
            "only whole numbers (e.g. 1536MiB rather than 1.5GiB); give {FORMS}"
        ));
    }
    let unit = rest.trim_start();
    let lower = unit.to_ascii_lowercase();
    let mult = match UNITS.iter().find(|(u, _)| *u == lower) {
        Some((_, m)) => *m,
        None => {
            return Err(match DECIMAL_UNITS.iter().find(|(d, _)| *d == lower) {
                Some((_, bin)) => format!(
                    "unit `{unit}` is ambiguous (1000 or 1024?) and not accepted: write {num}{bin} \
                     (powers of 1024)"
                ),
                None => format!("unknown unit `{unit}`; give {FORMS}"),
            })
        }
    };
    let too_large = || format!("too large (at most {} bytes)", u64::MAX);
    let n: u64 = num.parse().map_err(|_| too_large())?;
    let v = n.checked_mul(mult).ok_or_else(too_large)?;
    check_size(v, rule)
}

/// Applies `rule` to a size in bytes.
pub fn check_size(v: u64, rule: SizeRule) -> Result<u64, String> {
    if v == 0 && rule != SizeRule::ZeroAllowed {
        return Err("must be above 0".into());
    }
    if rule == SizeRule::Blocks && !v.is_multiple_of(BLOCK_BYTES) {
        let down = v / BLOCK_BYTES * BLOCK_BYTES;
        let near = match down.checked_add(BLOCK_BYTES) {
            Some(up) if down > 0 => format!("{down} or {up}"),
            Some(up) => format!("{up}"),
            None => format!("{down}"),
        };
        return Err(format!(
            "{v} bytes is not a multiple of {BLOCK_BYTES} (whole 4 KiB blocks); the nearest are \
             {near}"
        ));
    }
    Ok(v)
}

/// Deserializes a size setting `key` of type `T` under `rule` from an integer or a string with
/// a unit; the error names the key and the value given. For `#[serde(deserialize_with)]`
/// through a small function per key (see `config.rs`).
pub fn deserialize_size<'de, D, T>(d: D, key: &'static str, rule: SizeRule) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let v = d.deserialize_any(SizeVisitor { key, rule })?;
    narrow(v).map_err(|m| de::Error::custom(format!("{key} = {v}: {m}")))
}

struct SizeVisitor {
    key: &'static str,
    rule: SizeRule,
}

impl<'de> Visitor<'de> for SizeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "{}: a size, as an integer (bytes) or a string with a unit such as \"64MiB\" or \
             \"1GiB\"",
            self.key
        )
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        check_size(v, self.rule).map_err(|m| E::custom(format!("{} = {v}: {m}", self.key)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "{} = {v}: a size cannot be negative",
                self.key
            ))),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<u64, E> {
        parse_size_with(s, self.rule).map_err(|m| E::custom(format!("{} = \"{s}\": {m}", self.key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_and_binary_units_parse() {
        for (s, v) in [
            ("4096", 4096),
            (" 4096 ", 4096),
            ("4096B", 4096),
            ("4k", 4 << 10),
            ("4K", 4 << 10),
            ("4KiB", 4 << 10),
            ("4kib", 4 << 10),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("512 MiB", 512 << 20),
            ("1G", 1 << 30),
            ("1g", 1 << 30),
            ("1GiB", 1 << 30),
            ("1T", 1 << 40),
            ("1TiB", 1 << 40),
            ("16383P", 16383 << 50),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s:?}");
        }
        assert_eq!(parse_block_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_block_size("4k"), Ok(4096));
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("0MiB"), Ok(0));
    }

    #[test]
    fn bad_sizes_say_what_is_wrong() {
        for (s, rule, says) in [
            ("", SizeRule::Positive, "no size given"),
            ("   ", SizeRule::Positive, "no size given"),
            ("abc", SizeRule::Positive, "not a size"),
            ("MiB", SizeRule::Positive, "not a size"),
            ("-1", SizeRule::Positive, "negative"),
            ("1.5G", SizeRule::Positive, "whole numbers"),
            ("1,5G", SizeRule::Positive, "whole numbers"),
            ("0", SizeRule::Positive, "above 0"),
            ("0GiB", SizeRule::Blocks, "above 0"),
            ("1kB", SizeRule::Positive, "write 1KiB"),
            ("512MB", SizeRule::Positive, "write 512MiB"),
            ("1GB", SizeRule::Positive, "write 1GiB"),
            ("1gb", SizeRule::Positive, "write 1GiB"),
            ("2TB", SizeRule::Positive, "write 2TiB"),
            ("1X", SizeRule::Positive, "unknown unit `X`"),
            (
                "1 Gibibytes",
                SizeRule::Positive,
                "unknown unit `Gibibytes`",
            ),
            ("12ab34", SizeRule::Positive, "unknown unit `ab34`"),
            ("16384P", SizeRule::Positive, "too large"),
            ("18446744073709551616", SizeRule::Positive, "too large"),
            (
                "99999999999999999999999",
                SizeRule::ZeroAllowed,
                "too large",
            ),
            ("1000000", SizeRule::Blocks, "nearest are 999424 or 1003520"),
            ("100", SizeRule::Blocks, "nearest are 4096"),
            ("4097", SizeRule::Blocks, "not a multiple of 4096"),
        ] {
            let e = parse_size_with(s, rule).unwrap_err();
            assert!(e.contains(says), "{s:?}: {e}");
        }
        // The unit hint repeats the unit as written; the suggestion is always 1024-based.
        let e = parse_size("64 MB").unwrap_err();
        assert!(e.contains("`MB`") && e.contains("64MiB"), "{e}");
    }

    #[test]
    fn narrowing_names_the_largest_value() {
        let p = size_parser::<u16>(SizeRule::Positive);
        assert_eq!(p("63K"), Ok(63 << 10));
        let e = p("64K").unwrap_err();
        assert!(e.contains("at most 65535"), "{e}");
        let p = size_parser::<usize>(SizeRule::ZeroAllowed);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("1GiB"), Ok(1 << 30));
    }

    #[derive(Debug, serde::Deserialize)]
    struct One {
        #[serde(deserialize_with = "de_size_bytes")]
        size_bytes: u64,
        #[serde(default, deserialize_with = "de_small")]
        small: u16,
    }

    fn de_size_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        deserialize_size(d, "size_bytes", SizeRule::Blocks)
    }

    fn de_small<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        deserialize_size(d, "small", SizeRule::ZeroAllowed)
    }

    #[test]
    fn toml_takes_integers_and_strings_and_errors_name_key_and_value() {
        let one = |t: &str| toml::from_str::<One>(t);
        assert_eq!(one("size_bytes = 1073741824").unwrap().size_bytes, 1 << 30);
        assert_eq!(one("size_bytes = \"1GiB\"").unwrap().size_bytes, 1 << 30);
        assert_eq!(one("size_bytes = \"64 M\"").unwrap().size_bytes, 64 << 20);
        let o = one("size_bytes = \"4k\"\nsmall = \"1K\"").unwrap();
        assert_eq!((o.size_bytes, o.small), (4096, 1024));
        for (t, says) in [
            ("size_bytes = 0", "size_bytes = 0: must be above 0"),
            (
                "size_bytes = -4096",
                "size_bytes = -4096: a size cannot be negative",
            ),
            (
                "size_bytes = 1000",
                "size_bytes = 1000: 1000 bytes is not a multiple of 4096",
            ),
            ("size_bytes = \"1GB\"", "size_bytes = \"1GB\": unit `GB`"),
            ("size_bytes = \"lots\"", "size_bytes = \"lots\": not a size"),
            ("size_bytes = true", "size_bytes: a size"),
            (
                "size_bytes = 4096\nsmall = \"1M\"",
                "small = 1048576: 1048576 bytes is too large",
            ),
        ] {
            let e = one(t).unwrap_err().to_string();
            assert!(e.contains(says), "{t:?}: {e}");
        }
    }
}
