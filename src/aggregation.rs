//! The pure core: raw rows in, per-(portal, month) totals out. No I/O.
//!
//! Rows are folded one page at a time and dropped, so memory grows with the
//! number of keys, never with the number of rows. A row that breaks the
//! rules of docs/semantics.md ("Bad rows") is never folded: it is
//! counted as bad, with a few example ids for the operator.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{Datelike, NaiveDateTime};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One `usage_requests` row as the server sent it, already judged by the
/// rules of docs/semantics.md ("Bad rows"). Each field is parsed into its
/// type straight from the page's bytes (no `serde_json::Value` per field:
/// that, and chrono's general parser, were most of the client's CPU per
/// row). A field of the wrong type makes a bad row, never a failed page:
/// only `id` must be an integer, since paging depends on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRow {
    pub id: i64,
    pub judged: Result<GoodRow, BadReason>,
}

impl RawRow {
    /// A row from a JSON object, as a page would carry it (tests and the
    /// in-memory store).
    pub fn from_json(row: &serde_json::Value) -> Result<RawRow, serde_json::Error> {
        serde_json::from_str(&row.to_string())
    }

    pub fn good(&self) -> Option<&GoodRow> {
        self.judged.as_ref().ok()
    }
}

/// The row as it is on the wire: each field's JSON text, borrowed from the
/// page. `null` and a missing field both come as `None`.
#[derive(Deserialize)]
struct WireRow<'a> {
    id: i64,
    #[serde(borrow, default)]
    portal_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    month_year: Option<&'a RawValue>,
    #[serde(borrow, default)]
    success: Option<&'a RawValue>,
    #[serde(borrow, default)]
    request_timestamp: Option<&'a RawValue>,
}

impl<'de> Deserialize<'de> for RawRow {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawRow, D::Error> {
        let w = WireRow::deserialize(d)?;
        Ok(RawRow {
            id: w.id,
            judged: judge(&w),
        })
    }
}

/// A field's JSON text for a message: `null` when absent.
fn shown(v: Option<&RawValue>) -> String {
    v.map_or_else(|| "null".to_string(), |v| v.get().to_string())
}

/// A JSON string's contents, when the text is a string: borrowed when it
/// has no escapes (always, for what PostgREST sends for these columns).
fn json_str(v: Option<&RawValue>) -> Option<std::borrow::Cow<'_, str>> {
    let text = v?.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Into::into)
    } else {
        Some(inner.into())
    }
}

/// Applies the rules of docs/semantics.md, "Bad rows". `request_timestamp`
/// may be null (the seed's schema allows it); the other fields may not.
fn judge(w: &WireRow<'_>) -> Result<GoodRow, BadReason> {
    let month = json_str(w.month_year)
        .and_then(|s| Month::parse(&s))
        .ok_or_else(|| BadReason::MonthYear(shown(w.month_year)))?;
    let portal_id = w
        .portal_id
        .and_then(|v| json_integer(v.get()))
        .filter(|p| *p > 0)
        .ok_or_else(|| BadReason::PortalId(shown(w.portal_id)))?;
    let success = match w.success.map(RawValue::get) {
        Some("true") => true,
        Some("false") => false,
        _ => return Err(BadReason::Success(shown(w.success))),
    };
    let at = match w.request_timestamp {
        None => None,
        Some(v) => Some(
            json_str(Some(v))
                .and_then(|s| parse_timestamp(&s))
                .filter(writable)
                .ok_or_else(|| BadReason::RequestTimestamp(shown(Some(v))))?,
        ),
    };
    Ok(GoodRow {
        id: w.id,
        key: Key { portal_id, month },
        success,
        at,
    })
}

/// A JSON integer that fits an i64, as `serde_json::Value::as_i64` reads
/// one: `12`, `-3`; not `12.0`, `1e3` or `"12"`.
fn json_integer(text: &str) -> Option<i64> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The columns a scan asks for, matching [`RawRow`].
pub const RAW_COLUMNS: &str = "id,portal_id,month_year,success,request_timestamp";

/// A calendar month, `YYYY-MM`. Ordered by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month {
    pub year: u16,
    pub month: u8,
}

impl Month {
    /// Strict `YYYY-MM` with a month from 01 to 12: what `month_year` must hold.
    pub fn parse(s: &str) -> Option<Month> {
        let b = s.as_bytes();
        if b.len() != 7 || b[4] != b'-' || !b[..4].iter().chain(&b[5..]).all(u8::is_ascii_digit) {
            return None;
        }
        let year: u16 = s[..4].parse().ok()?;
        let month: u8 = s[5..].parse().ok()?;
        (1..=12).contains(&month).then_some(Month { year, month })
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// What `portal_usage_monthly` is keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub portal_id: i64,
    pub month: Month,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.portal_id, self.month)
    }
}

/// A key's totals over some set of its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub successes: i64,
    pub errors: i64,
    pub last_request_at: Option<NaiveDateTime>,
    /// The newest raw id counted (the key's watermark); 0 when none.
    pub last_request_id: i64,
}

impl Totals {
    fn add_row(&mut self, id: i64, success: bool, at: Option<NaiveDateTime>) {
        self.requests += 1;
        if success {
            self.successes += 1;
        } else {
            self.errors += 1;
        }
        self.last_request_at = self.last_request_at.max(at);
        self.last_request_id = self.last_request_id.max(id);
    }

    /// Stored state plus new rows: counts add, the newest time and id win.
    pub fn plus(self, new: Totals) -> Totals {
        Totals {
            requests: self.requests + new.requests,
            successes: self.successes + new.successes,
            errors: self.errors + new.errors,
            last_request_at: self.last_request_at.max(new.last_request_at),
            last_request_id: self.last_request_id.max(new.last_request_id),
        }
    }

    /// Same counts and time; the watermark is not compared (a table without
    /// the migration has none).
    pub fn same_values(&self, other: &Totals) -> bool {
        self.requests == other.requests
            && self.successes == other.successes
            && self.errors == other.errors
            && self.last_request_at == other.last_request_at
    }
}

/// Why a row was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadReason {
    MonthYear(String),
    PortalId(String),
    Success(String),
    RequestTimestamp(String),
    /// Refused by the same rule, applied in SQL by the server-side engine.
    RejectedBySql,
}

impl fmt::Display for BadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadReason::MonthYear(v) => write!(f, "month_year {v} is not YYYY-MM"),
            BadReason::PortalId(v) => write!(f, "portal_id {v} is not a positive integer"),
            BadReason::Success(v) => write!(f, "success {v} is not true or false"),
            BadReason::RequestTimestamp(v) => write!(f, "request_timestamp {v} is not a timestamp"),
            BadReason::RejectedBySql => {
                f.write_str("month_year, portal_id, success or request_timestamp breaks the rules (checked in SQL)")
            }
        }
    }
}

/// How many example ids a report keeps.
pub const BAD_EXAMPLES: usize = 5;

/// Rows refused, with the first few for the operator to look up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BadRows {
    pub count: u64,
    pub examples: Vec<(i64, BadReason)>,
}

impl BadRows {
    fn note(&mut self, id: i64, reason: &BadReason) {
        self.count += 1;
        if self.examples.len() < BAD_EXAMPLES {
            self.examples.push((id, reason.clone()));
        }
    }

    pub fn merge(&mut self, other: BadRows) {
        self.count += other.count;
        for e in other.examples {
            if self.examples.len() < BAD_EXAMPLES {
                self.examples.push(e);
            }
        }
    }
}

/// A row that passed the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoodRow {
    pub id: i64,
    pub key: Key,
    pub success: bool,
    pub at: Option<NaiveDateTime>,
}

/// Whether a time can go back to PostgreSQL as it came: years 1 to 9999.
/// PostgreSQL holds more (4713 BC to 294276 AD, and infinity), but those
/// come as `12025-...`, `... BC` or `infinity`, which no client writes back
/// faithfully; the server-side engine refuses the same rows
/// (`usage_agg_valid_time`), so both engines agree (docs/semantics.md,
/// "Bad rows").
fn writable(t: &NaiveDateTime) -> bool {
    (1..=9999).contains(&t.year())
}

/// PostgREST sends `timestamp` as `2025-07-26T14:28:18.46` and `timestamptz`
/// with an offset; both become a UTC-less time as the seed's column holds.
pub fn parse_timestamp(s: &str) -> Option<NaiveDateTime> {
    parse_plain_timestamp(s)
        .or_else(|| s.parse::<NaiveDateTime>().ok())
        .or_else(|| {
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()
                .map(|d| d.naive_utc())
        })
        .or_else(|| NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").ok())
}

/// The form PostgREST sends for `timestamp`, `YYYY-MM-DDTHH:MM:SS` with 0 to
/// 9 fraction digits, read by hand: chrono's general parser cost more than
/// everything else a row needs. Anything else (an offset, a leap second, a
/// space) is left to chrono, which reads these the same way (a unit test
/// compares them).
fn parse_plain_timestamp(s: &str) -> Option<NaiveDateTime> {
    let b = s.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        b[r].iter().try_fold(0u32, |n, d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let nanos = match &b[19..] {
        [] => 0,
        [b'.', frac @ ..] if (1..=9).contains(&frac.len()) => {
            let n = num(20..b.len())?;
            n * 10u32.pow(9 - frac.len() as u32)
        }
        _ => return None,
    };
    let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    let sec = num(17..19).filter(|s| *s < 60)?; // a leap second: chrono's way
    let time = chrono::NaiveTime::from_hms_nano_opt(num(11..13)?, num(14..16)?, sec, nanos)?;
    Some(date.and_time(time))
}

/// The format written back: what PostgREST itself sends for `timestamp`.
pub fn format_timestamp(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// Rows folded into per-key totals.
#[derive(Debug, Default)]
pub struct Fold {
    pub groups: BTreeMap<Key, Totals>,
    /// Rows seen, good and bad.
    pub rows: u64,
    /// Good rows left out because their key had already counted them
    /// (watermark above the scan's start).
    pub skipped: u64,
    pub bad: BadRows,
}

impl Fold {
    /// Folds one row; a good row is counted only when `include(key, id)`
    /// says so. Engines use it to count each key from its own watermark
    /// (rows a run that died already counted are left out), and verify to
    /// count each key up to its watermark.
    pub fn add(&mut self, row: &RawRow, include: impl Fn(&Key, i64) -> bool) {
        self.rows += 1;
        match &row.judged {
            Ok(good) if include(&good.key, good.id) => self
                .groups
                .entry(good.key)
                .or_default()
                .add_row(good.id, good.success, good.at),
            Ok(_) => self.skipped += 1,
            Err(reason) => self.bad.note(row.id, reason),
        }
    }

    pub fn good_rows(&self) -> u64 {
        self.rows - self.bad.count - self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row_json(
        id: i64,
        portal: serde_json::Value,
        month: &str,
        success: bool,
    ) -> serde_json::Value {
        json!({
            "id": id,
            "portal_id": portal,
            "month_year": month,
            "success": success,
            "request_timestamp": format!("2025-01-0{}T10:00:00", 1 + id % 9),
        })
    }

    fn row(id: i64, portal: serde_json::Value, month: &str, success: bool) -> RawRow {
        RawRow::from_json(&row_json(id, portal, month, success)).unwrap()
    }

    /// A good row with one field replaced.
    fn with(id: i64, field: &str, value: serde_json::Value) -> RawRow {
        let mut r = row_json(id, json!(9), "2025-01", true);
        r[field] = value;
        RawRow::from_json(&r).unwrap()
    }

    fn validate(r: &RawRow) -> Result<GoodRow, BadReason> {
        r.judged.clone()
    }

    #[test]
    fn month_is_strict_yyyy_mm() {
        assert_eq!(
            Month::parse("2025-01"),
            Some(Month {
                year: 2025,
                month: 1
            })
        );
        for bad in [
            "2025-13",
            "2025-00",
            "2025-1",
            "25-01",
            "2025/01",
            "2025-01 ",
            "２０２５-01",
            "",
        ] {
            assert_eq!(Month::parse(bad), None, "{bad}");
        }
        assert_eq!(
            Month {
                year: 2025,
                month: 3
            }
            .to_string(),
            "2025-03"
        );
    }

    #[test]
    fn folds_counts_successes_errors_and_the_newest_time_and_id() {
        let mut f = Fold::default();
        for (id, ok) in [(1, true), (2, false), (3, true)] {
            f.add(&row(id, json!(7), "2025-01", ok), |_, _| true);
        }
        f.add(&row(4, json!(8), "2025-02", true), |_, _| true);
        let k = Key {
            portal_id: 7,
            month: Month {
                year: 2025,
                month: 1,
            },
        };
        let t = f.groups[&k];
        assert_eq!(
            (t.requests, t.successes, t.errors, t.last_request_id),
            (3, 2, 1, 3)
        );
        assert_eq!(t.last_request_at, parse_timestamp("2025-01-04T10:00:00"));
        assert_eq!(f.groups.len(), 2);
        assert_eq!((f.rows, f.good_rows()), (4, 4));
    }

    #[test]
    fn bad_rows_are_counted_with_examples_and_never_create_a_key() {
        let mut f = Fold::default();
        f.add(&row(1, json!(0), "2025-01", true), |_, _| true);
        f.add(&row(2, json!(-5), "2025-01", true), |_, _| true);
        f.add(&row(3, json!("12"), "2025-01", true), |_, _| true);
        f.add(&row(4, json!(9), "2025-13", true), |_, _| true);
        f.add(&row(5, json!(null), "2025-01", true), |_, _| true);
        f.add(&row(6, json!(9), "January", true), |_, _| true);
        f.add(&with(7, "success", json!(null)), |_, _| true);
        f.add(&with(8, "request_timestamp", json!("yesterday")), |_, _| {
            true
        });
        f.add(&with(9, "request_timestamp", json!(null)), |_, _| true);
        assert!(
            f.groups.len() == 1
                && f.groups
                    .values()
                    .all(|t| t.requests == 1 && t.last_request_at.is_none())
        );
        assert_eq!(f.bad.count, 8);
        assert_eq!(f.bad.examples.len(), BAD_EXAMPLES);
        assert_eq!(
            f.bad.examples.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn rows_the_predicate_leaves_out_are_skipped_not_bad() {
        let mut f = Fold::default();
        let hot = Key {
            portal_id: 1,
            month: Month {
                year: 2025,
                month: 1,
            },
        };
        let floor = |k: &Key, id: i64| id > if *k == hot { 3 } else { 0 };
        for id in 1..=5 {
            f.add(&row(id, json!(1), "2025-01", true), floor);
            f.add(&row(id + 10, json!(2), "2025-01", true), floor);
        }
        assert_eq!(f.groups[&hot].requests, 2);
        assert_eq!(f.skipped, 3);
        assert_eq!(f.good_rows(), 7);
    }

    #[test]
    fn stored_plus_new_keeps_the_newest_time_and_id() {
        let t = |r, at: &str, id| Totals {
            requests: r,
            successes: r,
            errors: 0,
            last_request_at: parse_timestamp(at),
            last_request_id: id,
        };
        let sum = t(5, "2025-01-09T00:00:00", 50).plus(t(2, "2025-01-03T00:00:00", 70));
        assert_eq!((sum.requests, sum.last_request_id), (7, 70));
        assert_eq!(sum.last_request_at, parse_timestamp("2025-01-09T00:00:00"));
    }

    #[test]
    fn times_postgres_holds_but_no_client_writes_back_are_bad_rows() {
        for (at, ok) in [
            ("9999-12-31T23:59:59.999999", true),
            ("0001-01-01T00:00:00", true),
            ("12025-01-01T00:00:00", false),
            ("+12025-01-01T00:00:00", false),
            ("0044-03-15T00:00:00 BC", false),
            ("-0043-03-15T00:00:00", false),
            ("infinity", false),
            ("-infinity", false),
        ] {
            let r = with(1, "request_timestamp", json!(at));
            assert_eq!(validate(&r).is_ok(), ok, "{at}");
        }
        let extreme = row(2, json!(i64::MAX), "2025-01", true);
        assert_eq!(validate(&extreme).unwrap().key.portal_id, i64::MAX);
        assert!(validate(&row(3, json!(i64::MIN), "2025-01", true)).is_err());
        assert!(validate(&row(
            4,
            json!(9_223_372_036_854_775_808u64),
            "2025-01",
            true
        ))
        .is_err());
    }

    #[test]
    fn timestamps_parse_in_postgrest_forms_and_round_trip() {
        let t = parse_timestamp("2025-07-26T14:28:18.46").unwrap();
        assert_eq!(format_timestamp(t), "2025-07-26T14:28:18.460000");
        assert_eq!(
            parse_timestamp("2025-07-26T14:28:18+02:00"),
            parse_timestamp("2025-07-26T12:28:18")
        );
    }

    #[test]
    fn the_hand_parser_reads_timestamps_as_chrono_does() {
        for s in [
            "2025-07-26T14:28:18",
            "2025-07-26T14:28:18.4",
            "2025-07-26T14:28:18.46",
            "2025-07-26T14:28:18.123456",
            "2025-07-26T14:28:18.123456789",
            "2024-02-29T00:00:00",
            "0001-01-01T00:00:00",
            "9999-12-31T23:59:59.999999",
        ] {
            assert_eq!(
                parse_plain_timestamp(s),
                s.parse::<NaiveDateTime>().ok(),
                "{s}"
            );
            assert!(parse_plain_timestamp(s).is_some(), "{s}");
        }
        // Not its form, or not a time: left to chrono, which refuses them.
        for s in [
            "2025-02-29T00:00:00",
            "2025-13-01T00:00:00",
            "2025-07-26T24:00:00",
            "2025-07-26T14:60:00",
            "2025-07-26T14:28:18.",
            "2025-07-26T14:28:18.1234567890",
            "2025-07-26T14:28:18Z",
            "2025-07-26 14:28:18",
            "2025-07-26T14:28:60",
            "+2025-07-26T14:28:18",
            "2025-07-2６T14:28:18",
        ] {
            assert_eq!(parse_plain_timestamp(s), None, "{s}");
        }
        // The general path still reads what PostgREST sends for timestamptz.
        assert!(parse_timestamp("2025-07-26T14:28:18.5+00:00").is_some());
        assert!(parse_timestamp("2025-07-26 14:28:18").is_some());
    }

    #[test]
    fn wrong_types_and_missing_fields_are_bad_rows_not_failed_pages() {
        let page = r#"[
            {"id":1,"portal_id":7,"month_year":"2025-01","success":true,"request_timestamp":"2025-01-02T00:00:00"},
            {"id":2,"portal_id":7.0,"month_year":"2025-01","success":true,"request_timestamp":null},
            {"id":3,"portal_id":7,"month_year":{"y":2025},"success":true,"request_timestamp":null},
            {"id":4,"portal_id":7,"month_year":"2025-01","success":"true","request_timestamp":null},
            {"id":5,"portal_id":7,"month_year":"2025-01","success":true,"request_timestamp":12},
            {"id":6,"portal_id":1e3,"month_year":"2025-01","success":true},
            {"id":7,"month_year":"2025-01","success":true},
            {"id":8,"portal_id":7,"month_year":"\u0032025-01","success":false,"request_timestamp":"2025-01-02T00:00:00"},
            {"id":9,"portal_id":[7],"month_year":"2025-01","success":null},
            {"id":10,"portal_id":-0,"month_year":"2025-01","success":true},
            {"id":11,"portal_id":7,"month_year":"2025-01\n","success":true}
        ]"#;
        let rows: Vec<RawRow> = serde_json::from_str(page).unwrap();
        let good: Vec<i64> = rows
            .iter()
            .filter(|r| r.good().is_some())
            .map(|r| r.id)
            .collect();
        assert_eq!(good, vec![1, 8], "an escaped but valid month is a good row");
        let reason = |id: i64| {
            rows[id as usize - 1]
                .judged
                .clone()
                .unwrap_err()
                .to_string()
        };
        assert_eq!(reason(2), "portal_id 7.0 is not a positive integer");
        assert_eq!(reason(3), r#"month_year {"y":2025} is not YYYY-MM"#);
        assert_eq!(reason(4), r#"success "true" is not true or false"#);
        assert_eq!(reason(5), "request_timestamp 12 is not a timestamp");
        assert_eq!(reason(7), "portal_id null is not a positive integer");
        assert_eq!(reason(9), "portal_id [7] is not a positive integer");
        assert_eq!(reason(11), r#"month_year "2025-01\n" is not YYYY-MM"#);
        // Only a bad id fails the page: paging depends on it.
        assert!(serde_json::from_str::<Vec<RawRow>>(r#"[{"id":"1"}]"#).is_err());
    }
}
