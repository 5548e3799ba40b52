//! Dates and timestamps: PostgreSQL text forms in, RFC 3339 / ISO dates out.
//!
//! Internally a date is days since 1970-01-01 and a timestamp microseconds
//! since 1970-01-01 00:00 (UTC for `timestamptz`, wall clock for
//! `timestamp`). `i32::MAX`/`i64::MAX` and `MIN` stand for `±infinity`.
//! Output is only produced for years 1..=9999, the range RFC 3339 can say.

use chrono::{DateTime, Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike};
use chrono_tz::Tz;

const MICROS_PER_SEC: i64 = 1_000_000;
const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SEC;

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")
}

/// Days since 1970-01-01 → `YYYY-MM-DD`; `None` for infinities and years
/// outside 1..=9999.
pub fn format_date(days: i32) -> Option<String> {
    if days == i32::MAX || days == i32::MIN {
        return None;
    }
    let d = epoch().checked_add_signed(chrono::Duration::days(days as i64))?;
    if !(1..=9999).contains(&d.year()) {
        return None;
    }
    let mut out = String::with_capacity(10);
    push_date(&mut out, d.year() as u32, d.month(), d.day());
    Some(out)
}

/// Appends `v`'s last `width` decimal digits, zero-padded. A timestamp is
/// formatted for every such field of every record: written digit by digit,
/// not through `format!` (~4 % of an initial sync's CPU).
fn push_digits(out: &mut String, v: u32, width: u32) {
    for i in (0..width).rev() {
        let d = (v / 10u32.pow(i)) % 10;
        out.push(char::from(b'0' + d as u8));
    }
}

/// Appends `YYYY-MM-DD`.
fn push_date(out: &mut String, year: u32, month: u32, day: u32) {
    push_digits(out, year, 4);
    out.push('-');
    push_digits(out, month, 2);
    out.push('-');
    push_digits(out, day, 2);
}

/// `YYYY-MM-DD{sep}HH:MM:SS.ffffff{zone}`.
fn stamp(dt: NaiveDateTime, sep: char, zone: &str) -> String {
    let mut out = String::with_capacity(26 + zone.len());
    push_date(&mut out, dt.year() as u32, dt.month(), dt.day());
    out.push(sep);
    push_digits(&mut out, dt.hour(), 2);
    out.push(':');
    push_digits(&mut out, dt.minute(), 2);
    out.push(':');
    push_digits(&mut out, dt.second(), 2);
    out.push('.');
    push_digits(&mut out, dt.nanosecond() / 1000, 6);
    out.push_str(zone);
    out
}

fn naive_from_micros(micros: i64) -> Option<NaiveDateTime> {
    if micros == i64::MAX || micros == i64::MIN {
        return None;
    }
    let secs = micros.div_euclid(MICROS_PER_SEC);
    let sub = micros.rem_euclid(MICROS_PER_SEC) as u32;
    let dt = DateTime::from_timestamp(secs, sub * 1000)?.naive_utc();
    if !(1..=9999).contains(&dt.year()) {
        return None;
    }
    Some(dt)
}

/// UTC microseconds → `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_rfc3339(micros: i64) -> Option<String> {
    Some(stamp(naive_from_micros(micros)?, 'T', "Z"))
}

/// Wall-clock microseconds → `YYYY-MM-DD HH:MM:SS.ffffff` (no zone).
pub fn format_naive(micros: i64) -> Option<String> {
    Some(stamp(naive_from_micros(micros)?, ' ', ""))
}

/// Reads a wall-clock time in `tz` and returns UTC microseconds, exactly
/// as PostgreSQL's `AT TIME ZONE` does: a time in the repeated hour of a
/// fall-back takes the offset in force just after the transition (standard
/// time, the later instant); a time inside a spring-forward gap takes the
/// offset in force just before it (so it moves forward by the gap).
pub fn naive_to_utc(micros: i64, tz: Tz) -> Option<i64> {
    if micros == i64::MAX || micros == i64::MIN {
        return Some(micros);
    }
    let secs = micros.div_euclid(MICROS_PER_SEC);
    let sub = micros.rem_euclid(MICROS_PER_SEC) as u32;
    let naive = DateTime::from_timestamp(secs, sub * 1000)?.naive_utc();
    let local = match tz.from_local_datetime(&naive) {
        LocalResult::Single(t) => t,
        LocalResult::Ambiguous(_, later) => later,
        LocalResult::None => {
            // Inside a spring-forward gap: shift by one hour like PostgreSQL.
            let shifted = naive + chrono::Duration::hours(1);
            match tz.from_local_datetime(&shifted) {
                LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t,
                LocalResult::None => return None,
            }
        }
    };
    let utc = local.naive_utc().and_utc();
    Some(utc.timestamp() * MICROS_PER_SEC + utc.timestamp_subsec_micros() as i64)
}

/// Midnight of `days` in `tz`, as UTC microseconds.
pub fn date_to_utc(days: i32, tz: Tz) -> Option<i64> {
    if days == i32::MAX {
        return Some(i64::MAX);
    }
    if days == i32::MIN {
        return Some(i64::MIN);
    }
    naive_to_utc((days as i64).checked_mul(MICROS_PER_DAY)?, tz)
}

/// The calendar date of a UTC instant seen in `tz`.
pub fn utc_to_date(micros: i64, tz: Tz) -> Option<i32> {
    if micros == i64::MAX {
        return Some(i32::MAX);
    }
    if micros == i64::MIN {
        return Some(i32::MIN);
    }
    let secs = micros.div_euclid(MICROS_PER_SEC);
    let utc = DateTime::from_timestamp(secs, 0)?;
    let local = utc.with_timezone(&tz).date_naive();
    Some((local - epoch()).num_days() as i32)
}

/// The calendar date of a wall-clock timestamp.
pub fn naive_to_date(micros: i64) -> i32 {
    if micros == i64::MAX {
        return i32::MAX;
    }
    if micros == i64::MIN {
        return i32::MIN;
    }
    micros.div_euclid(MICROS_PER_DAY) as i32
}

/// Parses PostgreSQL's ISO date output (`2024-02-29`, `0044-03-15 BC`,
/// `infinity`).
pub fn parse_pg_date(s: &str) -> Option<i32> {
    match s {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (body, bc) = strip_bc(s);
    let date = parse_ymd(body, bc)?;
    Some((date - epoch()).num_days() as i32)
}

fn strip_bc(s: &str) -> (&str, bool) {
    match s.strip_suffix(" BC") {
        Some(b) => (b, true),
        None => (s, false),
    }
}

fn parse_ymd(s: &str, bc: bool) -> Option<NaiveDate> {
    let mut it = s.splitn(3, '-');
    let y: i32 = it.next()?.parse().ok()?;
    let m: u32 = it.next()?.parse().ok()?;
    let d: u32 = it.next()?.parse().ok()?;
    // Year 1 BC is ISO year 0.
    let y = if bc { 1 - y } else { y };
    NaiveDate::from_ymd_opt(y, m, d)
}

/// Parses `HH:MM:SS[.ffffff]` into microseconds since midnight.
fn parse_hms(s: &str) -> Option<i64> {
    let mut it = s.splitn(3, ':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let sec_part = it.next()?;
    let (sec, frac) = sec_part.split_once('.').unwrap_or((sec_part, ""));
    let sec: i64 = sec.parse().ok()?;
    if !(0..=24).contains(&h)
        || !(0..=59).contains(&m)
        || !(0..=60).contains(&sec)
        || frac.len() > 9
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let mut micros = 0i64;
    for (i, c) in frac.bytes().take(6).enumerate() {
        micros += (c - b'0') as i64 * 10i64.pow(5 - i as u32);
    }
    Some(((h * 60 + m) * 60 + sec) * MICROS_PER_SEC + micros)
}

/// Parses PostgreSQL's ISO `timestamp` output
/// (`2024-01-02 03:04:05.123456`, `… BC`, `infinity`) into wall-clock
/// microseconds.
pub fn parse_pg_timestamp(s: &str) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = strip_bc(s);
    let (date, time) = body.split_once([' ', 'T'])?;
    let date = parse_ymd(date, bc)?;
    let days = (date - epoch()).num_days();
    days.checked_mul(MICROS_PER_DAY)?
        .checked_add(parse_hms(time)?)
}

/// Parses PostgreSQL's ISO `timestamptz` output
/// (`2024-01-02 03:04:05.5+00`, `…+05:30`, `…-03:30:15`, `infinity`) and
/// RFC 3339 (`2024-01-02T03:04:05Z`) into UTC microseconds.
pub fn parse_pg_timestamptz(s: &str) -> Option<i64> {
    match s {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (body, bc) = strip_bc(s);
    let (date, rest) = body.split_once([' ', 'T'])?;
    let date = parse_ymd(date, bc)?;
    let (time, offset_secs) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
        (t, 0i64)
    } else {
        let pos = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(pos);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let mut parts = off[1..].split(':');
        let h: i64 = parts.next()?.parse().ok()?;
        let m: i64 = parts.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        let sec: i64 = parts.next().map(|p| p.parse().ok()).unwrap_or(Some(0))?;
        if !(0..=15).contains(&h) || !(0..=59).contains(&m) || !(0..=59).contains(&sec) {
            return None;
        }
        (t, sign * (h * 3600 + m * 60 + sec))
    };
    let days = (date - epoch()).num_days();
    days.checked_mul(MICROS_PER_DAY)?
        .checked_add(parse_hms(time)?)?
        .checked_sub(offset_secs * MICROS_PER_SEC)
}

/// Is `s` an RFC 3339 `date-time` (`2024-01-02T03:04:05[.f]Z` or with a
/// numeric offset)? Used by local validation and the mock API.
pub fn is_rfc3339(s: &str) -> bool {
    DateTime::parse_from_rfc3339(s).is_ok()
}

/// Is `s` a `full-date` (`YYYY-MM-DD`)?
pub fn is_iso_date(s: &str) -> bool {
    s.len() == 10 && NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// Milliseconds since the Unix epoch of UTC microseconds.
pub fn epoch_ms(micros: i64) -> i64 {
    micros.div_euclid(1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        let cases = [
            ("1970-01-01", Some(0)),
            ("2000-01-01", Some(10957)),
            ("2024-02-29", Some(19782)),
            ("1969-12-31", Some(-1)),
            ("infinity", Some(i32::MAX)),
            ("-infinity", Some(i32::MIN)),
            ("2023-02-29", None),
            ("garbage", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_pg_date(text), want, "{text}");
            if let Some(d) = want {
                if d != i32::MAX && d != i32::MIN {
                    assert_eq!(format_date(d).unwrap(), text);
                }
            }
        }
        assert_eq!(format_date(i32::MAX), None);
        // 0044-03-15 BC is ISO year -43: not representable in output.
        let bc = parse_pg_date("0044-03-15 BC").unwrap();
        assert!(bc < 0);
        assert_eq!(format_date(bc), None);
    }

    #[test]
    fn timestamps_parse_and_format() {
        let t = parse_pg_timestamp("2024-01-02 03:04:05.123456").unwrap();
        assert_eq!(format_naive(t).unwrap(), "2024-01-02 03:04:05.123456");
        assert_eq!(format_rfc3339(t).unwrap(), "2024-01-02T03:04:05.123456Z");
        let t = parse_pg_timestamp("2024-01-02 03:04:05").unwrap();
        assert_eq!(format_rfc3339(t).unwrap(), "2024-01-02T03:04:05.000000Z");
        let t = parse_pg_timestamp("2024-01-02 03:04:05.5").unwrap();
        assert_eq!(format_rfc3339(t).unwrap(), "2024-01-02T03:04:05.500000Z");
        assert_eq!(parse_pg_timestamp("infinity"), Some(i64::MAX));
        assert_eq!(format_rfc3339(i64::MAX), None);
        assert_eq!(format_rfc3339(i64::MIN), None);
    }

    #[test]
    fn timestamps_format_as_chrono_formats_them_across_years_1_to_9999() {
        // chrono's own formatter is the oracle for the digit writer.
        let micros = |y, m, d| {
            let day = NaiveDate::from_ymd_opt(y, m, d).unwrap();
            day.and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_micros()
        };
        let (first, last) = (micros(1, 1, 1), micros(9999, 12, 31));
        let step = (last - first) / 9973;
        for i in 0..=9973i64 {
            let t = first + i * step + i % 1_000_000;
            let dt = DateTime::from_timestamp_micros(t).unwrap().naive_utc();
            let want = dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
            assert_eq!(format_rfc3339(t).unwrap(), want);
            let want = dt.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
            assert_eq!(format_naive(t).unwrap(), want);
            let days = t.div_euclid(MICROS_PER_DAY) as i32;
            assert_eq!(
                format_date(days).unwrap(),
                dt.format("%Y-%m-%d").to_string()
            );
        }
    }

    #[test]
    fn timestamptz_offsets() {
        let base = parse_pg_timestamptz("2024-01-02 03:04:05+00").unwrap();
        let cases = [
            "2024-01-02 08:34:05+05:30",
            "2024-01-01 23:34:05-03:30",
            "2024-01-02T03:04:05Z",
            "2024-01-02 03:04:05.000000+00",
        ];
        for c in cases {
            assert_eq!(parse_pg_timestamptz(c), Some(base), "{c}");
        }
        let odd = parse_pg_timestamptz("2024-01-02 03:04:05-00:00:15").unwrap();
        assert_eq!(odd - base, 15_000_000);
    }

    #[test]
    fn wall_clock_in_zone() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let naive = parse_pg_timestamp("2024-07-01 12:00:00").unwrap();
        let utc = naive_to_utc(naive, tz).unwrap();
        assert_eq!(format_rfc3339(utc).unwrap(), "2024-07-01T10:00:00.000000Z");
        // Spring-forward gap: 02:30 does not exist on 2024-03-31 in Berlin.
        let gap = parse_pg_timestamp("2024-03-31 02:30:00").unwrap();
        let utc = naive_to_utc(gap, tz).unwrap();
        assert_eq!(format_rfc3339(utc).unwrap(), "2024-03-31T01:30:00.000000Z");
        // Midnight of a date.
        let d = parse_pg_date("2024-01-15").unwrap();
        let utc = date_to_utc(d, tz).unwrap();
        assert_eq!(format_rfc3339(utc).unwrap(), "2024-01-14T23:00:00.000000Z");
        assert_eq!(utc_to_date(utc, tz), Some(d));
    }

    /// Expected values are PostgreSQL 15's own answers to
    /// `'<wall>'::timestamp AT TIME ZONE '<zone>'`.
    #[test]
    fn wall_clock_converts_like_postgresql_around_transitions() {
        let cases = [
            // Fall-back: the repeated hour is read as standard time.
            (
                "America/New_York",
                "2024-11-03 01:30:00",
                "2024-11-03T06:30:00.000000Z",
            ),
            (
                "America/New_York",
                "2024-11-03 00:59:59",
                "2024-11-03T04:59:59.000000Z",
            ),
            (
                "America/New_York",
                "2024-11-03 02:00:00",
                "2024-11-03T07:00:00.000000Z",
            ),
            (
                "Europe/Berlin",
                "2024-10-27 02:30:00",
                "2024-10-27T01:30:00.000000Z",
            ),
            // Spring-forward gap: the offset before the transition.
            (
                "America/New_York",
                "2024-03-10 02:30:00",
                "2024-03-10T07:30:00.000000Z",
            ),
            (
                "Europe/Berlin",
                "2024-03-31 02:30:00",
                "2024-03-31T01:30:00.000000Z",
            ),
            // Ordinary times.
            (
                "America/New_York",
                "2024-07-01 12:00:00",
                "2024-07-01T16:00:00.000000Z",
            ),
        ];
        for (zone, wall, want) in cases {
            let tz: Tz = zone.parse().unwrap();
            let utc = naive_to_utc(parse_pg_timestamp(wall).unwrap(), tz).unwrap();
            assert_eq!(format_rfc3339(utc).unwrap(), want, "{zone} {wall}");
        }
    }

    #[test]
    fn hostile_input_does_not_overflow() {
        assert_eq!(
            parse_pg_timestamp("2024-01-02 -9223372036854775808:00:00"),
            None
        );
        assert_eq!(
            parse_pg_timestamptz("2024-01-02 03:00:00+99999999999999999"),
            None
        );
        assert_eq!(parse_pg_timestamptz("2024-01-02 03:00:00+9999999999"), None);
        assert_eq!(parse_pg_date("-2147483648-01-01"), None);
    }

    #[test]
    fn rfc3339_checks() {
        assert!(is_rfc3339("2024-01-02T03:04:05Z"));
        assert!(is_rfc3339("2024-01-02T03:04:05.123+02:00"));
        assert!(!is_rfc3339("2024-01-02 03:04:05"));
        assert!(!is_rfc3339("yesterday"));
        assert!(is_iso_date("2024-01-02"));
        assert!(!is_iso_date("2024-1-2"));
        assert!(!is_iso_date("2024-13-02"));
    }
}
