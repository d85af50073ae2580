//! Human-friendly durations and sizes, the one convention for every config key:
//! durations are strings such as `"90s"`, `"1m 30s"`, `"250ms"` (humantime syntax) and sizes
//! are strings such as `"512B"`, `"64KiB"`, `"4MiB"`, `"1GiB"` (binary) or `"10kB"`, `"5MB"`
//! (decimal).

use std::time::Duration;

/// Parses a duration string (`"90s"`, `"2m"`, `"500ms"`).
///
/// # Errors
/// A message suitable for a config diagnostic.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        format!("invalid duration `{text}`: {e} (write e.g. \"90s\", \"5m\", \"250ms\")")
    })
}

/// Parses a size string into bytes (`"4MiB"`, `"512B"`, `"10kB"`).
///
/// # Errors
/// A message suitable for a config diagnostic.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let hint = "(write e.g. \"512B\", \"64KiB\", \"4MiB\", \"1GiB\")";
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size `{text}`: expected a whole number and a unit {hint}"))?;
    let multiplier: u64 = match unit.trim() {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "" => return Err(format!("invalid size `{text}`: missing unit {hint}")),
        other => {
            return Err(format!(
                "invalid size `{text}`: unknown unit `{other}` {hint}"
            ));
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size `{text}`: too large"))
}

/// The binary size units, largest first, as the config writes them.
pub const SIZE_UNITS: [(u64, &str); 4] = [
    (1 << 40, "TiB"),
    (1 << 30, "GiB"),
    (1 << 20, "MiB"),
    (1 << 10, "KiB"),
];

/// Formats a byte count the way the config writes it (for summaries).
pub fn format_size(bytes: u64) -> String {
    for (factor, unit) in SIZE_UNITS {
        if bytes >= factor && bytes.is_multiple_of(factor) {
            return format!("{}{unit}", bytes / factor);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("10kB"), Ok(10_000));
        assert_eq!(parse_size(" 1 GiB "), Ok(1 << 30));
        assert!(parse_size("4").unwrap_err().contains("missing unit"));
        assert!(parse_size("4mb").unwrap_err().contains("unknown unit"));
        assert!(parse_size("x").is_err());
        assert!(
            parse_size("99999999999TiB")
                .unwrap_err()
                .contains("too large")
        );
        assert_eq!(format_size(4 << 20), "4MiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn durations_parse_humantime() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("90").is_err());
    }
}
