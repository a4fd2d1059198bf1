//! Byte sizes on the command line (`--memory 512M`).

use core::fmt;
use core::str::FromStr;

use thiserror::Error;

const UNITS: [(&str, u32); 5] = [("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40)];

/// A size in bytes, written as a whole number with an optional binary suffix: `K`, `M`, `G` or
/// `T` (also `KiB`, `MB`, …; all mean powers of 1024), e.g. `4096`, `512M`, `16G`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(u64);

/// Why a size did not parse.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("'{value}' is not a size: {rule}")]
pub struct SizeError {
    /// The text given.
    pub value: String,
    /// The rule it broke.
    pub rule: &'static str,
}

impl ByteSize {
    /// A size of `bytes`.
    pub const fn new(bytes: u64) -> Self {
        Self(bytes)
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |rule| SizeError {
            value: s.to_owned(),
            rule,
        };
        let t = s.trim();
        let digits = t.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err("it must start with a whole number (e.g. 512M, 16G)"));
        }
        let (num, suffix) = t.split_at(digits);
        // One optional B after one optional i: "1KiBiB" and "1Kbb" are not sizes.
        let unit = suffix.strip_suffix(['B', 'b']).unwrap_or(suffix);
        let unit = unit.strip_suffix(['i', 'I']).unwrap_or(unit).to_ascii_uppercase();
        let shift = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, s)| *s)
            .ok_or_else(|| err("the suffix must be K, M, G or T (powers of 1024)"))?;
        if !suffix.is_empty() && unit.is_empty() && !suffix.eq_ignore_ascii_case("b") {
            return Err(err("the suffix must be K, M, G or T (powers of 1024)"));
        }
        let n: u64 = num.parse().map_err(|_| err("the number is too large"))?;
        n.checked_mul(1u64 << shift)
            .map(Self)
            .ok_or_else(|| err("it does not fit in 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (name, shift) = UNITS
            .iter()
            .rev()
            .find(|(_, s)| self.0 != 0 && self.0.is_multiple_of(1u64 << s))
            .copied()
            .unwrap_or(("", 0));
        write!(
            f,
            "{}{}",
            self.0 >> shift,
            if name.is_empty() { "" } else { name }
        )?;
        if !name.is_empty() {
            f.write_str("iB")?;
        } else {
            f.write_str(" bytes")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_suffixes() {
        for (s, v) in [
            ("4096", 4096),
            ("4K", 4096),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("16g", 16 << 30),
            ("1T", 1 << 40),
            ("2GB", 2 << 30),
            ("10b", 10),
        ] {
            assert_eq!(s.parse::<ByteSize>().unwrap().bytes(), v, "{s}");
        }
    }

    #[test]
    fn rejects_with_the_rule() {
        for (s, rule) in [
            ("", "whole number"),
            ("G", "whole number"),
            ("12X", "suffix"),
            ("1.5G", "suffix"),
            ("1Kbb", "suffix"),
            ("1Mii", "suffix"),
            ("1iB", "suffix"),
            ("-1G", "whole number"),
            ("99999999999999999999", "too large"),
            ("20000000T", "64 bits"),
        ] {
            let e = s.parse::<ByteSize>().unwrap_err();
            assert!(e.to_string().contains(rule), "{s}: {e}");
            assert!(e.to_string().contains(&format!("'{s}'")), "{e}");
        }
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::new(16 << 30).to_string(), "16GiB");
        assert_eq!(ByteSize::new(1536 << 20).to_string(), "1536MiB");
        assert_eq!(ByteSize::new(100).to_string(), "100 bytes");
    }
}
