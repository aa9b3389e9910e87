//! Size and duration strings: `"256MiB"`, `"1.5GiB"`, `"4096"`, `"10s"`,
//! `"500ms"`, `"1m30s"`.
//!
//! Both parsers are exact: a fraction is accepted only when it comes out as a
//! whole number of bytes (or nanoseconds), so `"1.5KiB"` is 1536 bytes while
//! `"1.3KiB"` (1331.2 bytes) is rejected rather than silently rounded.
//! Arithmetic is done in `u128` and bounded, so no input can overflow.

use std::time::Duration;

/// Binary size units (case-insensitive). Decimal units (`KB`, `MB`) are
/// rejected on purpose: a block device is sized in powers of two and a
/// silent factor of 1.024 per step is exactly the kind of mistake that makes
/// two nodes disagree about a device size.
const SIZE_UNITS: &[(&str, u64)] = &[
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
];

/// Duration units, in nanoseconds. Matched case-sensitively so that `m`
/// (minute) and `M` cannot be confused with milli/mega.
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("sec", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// More fractional digits than this cannot be meant seriously; bounding them
/// keeps `10^digits` inside `u128`.
const MAX_FRACTION_DIGITS: usize = 18;
/// Integer parts longer than this overflow `u64` anyway.
const MAX_INTEGER_DIGITS: usize = 20;

/// Splits `"1.5"` into its integer and fractional digit strings, checking
/// that both are plain ASCII digits.
fn split_number(num: &str) -> Result<(&str, &str), String> {
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() {
        return Err("a number must start with a digit".into());
    }
    if num.contains('.') && frac.is_empty() {
        return Err("a decimal point must be followed by digits".into());
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a number".into());
    }
    if int.len() > MAX_INTEGER_DIGITS {
        return Err("number too large".into());
    }
    if frac.len() > MAX_FRACTION_DIGITS {
        return Err(format!("at most {MAX_FRACTION_DIGITS} fractional digits"));
    }
    Ok((int, frac))
}

/// `int.frac * mult`, exactly, or an error when the result is not whole or
/// exceeds `u64`.
fn scale(int: &str, frac: &str, mult: u64, what: &str) -> Result<u64, String> {
    let int_v: u128 = int.parse().map_err(|_| "number too large".to_string())?;
    let mut total = int_v
        .checked_mul(u128::from(mult))
        .ok_or_else(|| "number too large".to_string())?;
    if !frac.is_empty() {
        let frac_v: u128 = frac.parse().map_err(|_| "not a number".to_string())?;
        let denom = 10u128.pow(frac.len() as u32);
        let num = frac_v * u128::from(mult);
        if !num.is_multiple_of(denom) {
            return Err(format!("the fraction is not a whole number of {what}"));
        }
        total = total
            .checked_add(num / denom)
            .ok_or_else(|| "number too large".to_string())?;
    }
    u64::try_from(total).map_err(|_| "number too large".to_string())
}

/// Parses a size string (`"256MiB"`, `"1GiB"`, `"4096"`, `"64K"`, `"1.5GiB"`)
/// into bytes. Units are binary and case-insensitive: none or `B` (bytes),
/// `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`; one space may separate number
/// and unit. Fractions must give a whole number of bytes. The error is a
/// short reason (the caller adds the key and the string).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();
    let lower = unit.to_ascii_lowercase();
    let mult = SIZE_UNITS
        .iter()
        .find(|(u, _)| *u == lower)
        .map(|(_, m)| *m)
        .ok_or_else(|| {
            if matches!(lower.as_str(), "kb" | "mb" | "gb" | "tb") {
                format!(
                    "decimal unit `{unit}` is not accepted; use binary units (KiB, MiB, GiB, TiB)"
                )
            } else {
                format!("unknown unit `{unit}`; expected B, K/KiB, M/MiB, G/GiB or T/TiB")
            }
        })?;
    let (int, frac) = split_number(num)?;
    scale(int, frac, mult, "bytes")
}

/// Parses a duration string: one or more `<number><unit>` groups
/// (`"10s"`, `"500ms"`, `"1m30s"`, `"1.5s"`), units `ns`, `us`, `ms`, `s`/`sec`,
/// `m`/`min`, `h`. A bare number is rejected: the unit is never guessed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut rest = t;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_end);
        let after = after.trim_start();
        let unit_end = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        if unit.is_empty() {
            return Err(format!(
                "`{num}` has no unit; expected one of ns, us, ms, s, m, h (e.g. \"10s\")"
            ));
        }
        let mult = DURATION_UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(|| format!("unknown unit `{unit}`; expected one of ns, us, ms, s, m, h"))?;
        let (int, frac) = split_number(num)?;
        let part = scale(int, frac, mult, "nanoseconds")?;
        total = total
            .checked_add(u128::from(part))
            .ok_or_else(|| "duration too large".to_string())?;
        rest = next.trim_start();
    }
    let secs =
        u64::try_from(total / 1_000_000_000).map_err(|_| "duration too large".to_string())?;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a byte count the way the config file accepts it, with the largest
/// binary unit that divides it exactly (`65536` → `"64KiB"`).
pub fn format_size(bytes: u64) -> String {
    for (unit, mult) in [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ] {
        if bytes != 0 && bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    bytes.to_string()
}

/// Formats a duration the way the config file accepts it (`"10s"`,
/// `"500ms"`, or nanoseconds when nothing coarser is exact).
pub fn format_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    for (unit, mult) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        if ns != 0 && ns.is_multiple_of(mult) {
            return format!("{}{unit}", ns / mult);
        }
    }
    format!("{ns}ns")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1.3KiB").unwrap_err().contains("whole number"));
        assert!(parse_size("10MB").unwrap_err().contains("decimal unit"));
        assert!(parse_size("10XB")
            .unwrap_err()
            .contains("unknown unit `XB`"));
        assert!(parse_size("").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.MiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("1.2.3").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10d")
            .unwrap_err()
            .contains("unknown unit `d`"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("0.5ns").is_err());
    }

    #[test]
    fn format_round_trips() {
        for b in [0u64, 1, 512, 4096, 65536, 3 << 29, 1 << 40, 12345] {
            assert_eq!(parse_size(&format_size(b)), Ok(b));
        }
        for d in [
            Duration::from_secs(10),
            Duration::from_millis(500),
            Duration::from_nanos(7),
            Duration::from_secs(90),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
