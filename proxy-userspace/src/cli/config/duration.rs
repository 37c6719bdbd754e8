//! Go duration strings (`time.ParseDuration`), the form of every duration in kube-proxy's
//! configuration file: "15m0s", "1h", "2h30m", "300ms", "1.5h", "0".
//!
//! Written here rather than taken from a crate: humantime (the usual choice, not a dependency
//! yet) reads "2h 30m" but no fractions ("1.5h") and has units Go lacks ("d", "w"), so it
//! would accept files kube-proxy refuses and refuse some it accepts.

use std::time::Duration;

/// Longest duration Go represents: `math.MaxInt64` nanoseconds (about 292 years).
const MAX_NANOS: u128 = i64::MAX as u128;

/// Formats a duration as Go's `time.Duration.String` does for whole seconds and longer
/// ("24h0m0s", "2m0s", "30s"; "0s"), shorter ones in milliseconds ("300ms"): the form kube-proxy
/// shows its durations in.
pub fn format_go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return match d.subsec_millis() {
            0 => "0s".to_string(),
            ms => format!("{ms}ms"),
        };
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let frac = match d.subsec_nanos() {
        0 => String::new(),
        n => format!(".{:09}", n).trim_end_matches('0').to_string(),
    };
    if h > 0 {
        format!("{h}h{m}m{s}{frac}s")
    } else if m > 0 {
        format!("{m}m{s}{frac}s")
    } else {
        format!("{s}{frac}s")
    }
}

/// Parses a Go duration: an optional `+`, then one or more decimal numbers (with an optional
/// fraction) each followed by a unit (`ns`, `us`, `µs`, `μs`, `ms`, `s`, `m`, `h`); a lone `0`
/// needs no unit. Negative durations are refused: no duration in the file may be negative.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let fail = |why: &str| format!("{s:?} is not a duration such as \"15m0s\" or \"300ms\": {why}");
    let mut rest = s;
    if let Some(r) = rest.strip_prefix('+') {
        rest = r;
    } else if rest.starts_with('-') {
        return Err(format!("{s:?}: a duration here must not be negative"));
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(fail("empty"));
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (whole, after) = rest.split_at(digits);
        let (fraction, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(n)
            }
            None => ("", after),
        };
        if whole.is_empty() && fraction.is_empty() {
            return Err(fail("expected a number"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            "" => return Err(fail("missing unit (ns, us, ms, s, m, h)")),
            other => return Err(fail(&format!("unknown unit {other:?}"))),
        };
        let too_long = || fail("too long (at most about 292 years)");
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            // More digits than any u128 holds is too long anyway.
            whole.parse().map_err(|_| too_long())?
        };
        let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(too_long)?;
        // The fraction, truncated to the nanosecond as Go does; digits past the 18th cannot add
        // a nanosecond to any unit up to an hour (and 18 keep the product inside u128).
        let mut scale: u128 = 1;
        let mut part: u128 = 0;
        for d in fraction.bytes().take(18) {
            part = part * 10 + u128::from(d - b'0');
            scale *= 10;
        }
        nanos += part * unit_nanos / scale;
        total = total.checked_add(nanos).ok_or_else(too_long)?;
        if total > MAX_NANOS {
            return Err(too_long());
        }
        rest = after;
    }
    let secs = (total / 1_000_000_000) as u64;
    Ok(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_format_as_go_prints_them() {
        for (secs, text) in [
            (0, "0s"),
            (30, "30s"),
            (120, "2m0s"),
            (3600, "1h0m0s"),
            (86400, "24h0m0s"),
            (5430, "1h30m30s"),
        ] {
            assert_eq!(format_go_duration(Duration::from_secs(secs)), text);
        }
        assert_eq!(format_go_duration(Duration::from_millis(300)), "300ms");
        assert_eq!(format_go_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn go_durations_parse_as_go_reads_them() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        for (text, want) in [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("5s", s(5)),
            ("15m0s", s(900)),
            ("1h", s(3600)),
            ("2h30m", s(9000)),
            ("300ms", ms(300)),
            ("1.5h", s(5400)),
            (".5s", ms(500)),
            ("5.s", s(5)),
            ("1h2m3s4ms5us6ns", Duration::new(3723, 4_005_006)),
            ("10µs", Duration::from_micros(10)),
            ("10μs", Duration::from_micros(10)),
            ("10us", Duration::from_micros(10)),
            ("1.0000000001s", s(1)),
            ("24h0m0s", s(86400)),
        ] {
            assert_eq!(parse_go_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn go_durations_refuse_what_go_refuses() {
        for text in [
            "", "s", "5", "1d", "5 s", "1h 30m", ".s", "1..5s", "-5s", "--5s", "5sec", "0x5s",
            "1e3s", "h1",
        ] {
            assert!(parse_go_duration(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn go_durations_stop_at_292_years() {
        assert!(parse_go_duration("2562047h").is_ok());
        assert!(parse_go_duration("2562048h").is_err());
        assert!(parse_go_duration("99999999999999999999999999999999999999999h").is_err());
        assert!(parse_go_duration("2562047h2562047h").is_err());
    }
}
