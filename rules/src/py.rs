//! Small emulations of the Python behaviours that leak into upstream's user-visible strings.
//!
//! dom0 validates rules with Python built-ins (`int()`, `str.strip()`, `str.isdigit()`), so the
//! error text a user sees is Python's. Byte compatibility means reproducing those texts, not just
//! the accept/reject decision.

/// Characters `str.strip()` / `int()` treat as white space, restricted to ASCII.
///
/// Python's `str.isspace()` is true for `\t\n\x0b\x0c\r`, space and the four information
/// separators `\x1c`-`\x1f`.
pub fn is_space(c: char) -> bool {
    matches!(
        c,
        '\t' | '\n' | '\x0b' | '\x0c' | '\r' | '\x1c'..='\x1f' | ' '
    )
}

/// Python `str.strip()` with no argument (ASCII white space; the callers reject non-ASCII).
pub fn strip(s: &str) -> &str {
    s.trim_matches(is_space)
}

/// Python `str.isdigit()` for ASCII text: non-empty and all decimal digits.
pub fn is_digit(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// The value of a Python `int(s)` call in base 10.
///
/// `magnitude` saturates at `u128::MAX`; every caller only compares it against small bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PyInt {
    pub negative: bool,
    pub magnitude: u128,
}

impl PyInt {
    /// The value if it lies in `0..=max`.
    pub fn in_range(self, max: u128) -> Option<u128> {
        if self.negative && self.magnitude != 0 {
            None
        } else if self.magnitude <= max {
            Some(self.magnitude)
        } else {
            None
        }
    }
}

/// Python's `int(s)` (base 10): surrounding white space, an optional sign, digits with single
/// underscores between them. On failure returns the exact `ValueError` text.
pub fn int(s: &str) -> Result<PyInt, String> {
    let err = || {
        format!(
            "invalid literal for int() with base 10: {}",
            repr_truncated(s, 200)
        )
    };
    let t = s.trim_matches(is_space);
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() {
        return Err(err());
    }
    let mut magnitude: u128 = 0;
    let mut prev_underscore = true; // a leading underscore is invalid
    for b in digits.bytes() {
        match b {
            b'0'..=b'9' => {
                magnitude = magnitude
                    .saturating_mul(10)
                    .saturating_add(u128::from(b - b'0'));
                prev_underscore = false;
            }
            b'_' if !prev_underscore => prev_underscore = true,
            _ => return Err(err()),
        }
    }
    if prev_underscore {
        return Err(err());
    }
    Ok(PyInt {
        negative,
        magnitude,
    })
}

/// Python `repr()` of a `str`, as `%.200R` prints it in CPython error messages.
pub fn repr_truncated(s: &str, max_chars: usize) -> String {
    repr(s).chars().take(max_chars).collect()
}

/// Python `repr()` of a `str`.
pub fn repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if (0x80..0xa0).contains(&(c as u32)) => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_accepts_what_python_accepts() {
        for (s, v) in [
            ("80", 80),
            ("080", 80),
            ("+80", 80),
            (" 80\t", 80),
            ("1_000", 1000),
            ("0", 0),
        ] {
            assert_eq!(int(s).map(|i| i.magnitude), Ok(v), "{s:?}");
        }
        assert!(int("-5").expect("valid").negative);
    }

    #[test]
    fn int_rejects_with_python_message() {
        assert_eq!(
            int("http"),
            Err("invalid literal for int() with base 10: 'http'".into())
        );
        assert_eq!(
            int(""),
            Err("invalid literal for int() with base 10: ''".into())
        );
        for s in ["_1", "1_", "1__0", "0x50", "+", "1.5", "--1"] {
            assert!(int(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn repr_picks_quotes_like_python() {
        assert_eq!(repr("a'b"), "\"a'b\"");
        assert_eq!(repr("a'b\""), "'a\\'b\"'");
        assert_eq!(repr("a\tb\\"), "'a\\tb\\\\'");
        assert_eq!(repr("\x01"), "'\\x01'");
    }

    #[test]
    fn huge_numbers_saturate_instead_of_wrapping() {
        let big = int("1000000000000000000000000000000000000000000000").expect("valid");
        assert_eq!(big.magnitude, u128::MAX);
        assert_eq!(big.in_range(65535), None);
    }
}
