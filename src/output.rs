//! What a person reads on stdout: the Node.js script's summary, kept line for
//! line so existing log searches still match, with working emoji on a UTF-8
//! terminal and plain markers anywhere else (cron logs, pipes).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::aggregation::Totals;
use crate::engine::{Change, Mode, Outcome};
use crate::text_table::{Align, Table, Width};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub emoji: bool,
    /// Charts may use UTF-8 block characters: the locale says UTF-8 and
    /// `NO_COLOR` is not set (plain ASCII otherwise, wherever stdout goes).
    pub unicode: bool,
    /// Charts may use ANSI colours: stdout is a terminal, `NO_COLOR` is not
    /// set and `TERM` is not `dumb`.
    pub color: bool,
}

impl Style {
    /// Emoji only where they will render: stdout is a terminal and the
    /// locale says UTF-8.
    pub fn detect() -> Style {
        let utf8 = ["LC_ALL", "LC_CTYPE", "LANG"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
            .is_some_and(|l| {
                let l = l.to_ascii_lowercase();
                l.contains("utf-8") || l.contains("utf8")
            });
        // https://no-color.org: set and not empty.
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        let terminal = std::io::stdout().is_terminal();
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Style {
            emoji: utf8 && terminal,
            unicode: utf8 && !no_color,
            color: terminal && !no_color && !dumb,
        }
    }

    /// Plain ASCII, no emoji, no colour: what a file or a pipe gets
    /// without a UTF-8 locale (and the unit tests).
    pub fn plain() -> Style {
        Style {
            emoji: false,
            unicode: false,
            color: false,
        }
    }

    fn mark(&self, kind: Mark) -> &'static str {
        match (kind, self.emoji) {
            (Mark::Start, true) => "🔄",
            (Mark::Info, true) => "📊",
            (Mark::Fetch, true) => "📋",
            (Mark::Target, true) => "🎯",
            (Mark::Ok, true) => "✅",
            (Mark::Warn, true) => "⚠️ ",
            (Mark::Error, true) => "❌",
            (Mark::Bullet, true) => "•",
            (Mark::Ok, false) => "OK",
            (Mark::Warn, false) => "WARNING:",
            (Mark::Error, false) => "ERROR:",
            (Mark::Bullet, false) => "-",
            (_, false) => "*",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mark {
    Start,
    Info,
    Fetch,
    Target,
    Ok,
    Warn,
    Error,
    Bullet,
}

/// The lines printed before any request, so a stalled run shows how far it got.
pub fn header(
    style: Style,
    started: DateTime<Utc>,
    env: &str,
    chosen_by: &str,
    dry_run: bool,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} Starting usage aggregation at {}",
        style.mark(Mark::Start),
        started.format("%Y-%m-%dT%H:%M:%S%.3fZ")
    );
    let _ = writeln!(
        s,
        "{} Aggregating usage for {env} environment ({chosen_by})",
        style.mark(Mark::Info)
    );
    if dry_run {
        let _ = writeln!(
            s,
            "{} Dry run: nothing will be written",
            style.mark(Mark::Info)
        );
    }
    let _ = writeln!(s, "{} Fetching usage requests...", style.mark(Mark::Fetch));
    s
}

/// A run that found nothing new and has nothing to warn about: worth one
/// line in a cron log, not sixteen.
pub fn nothing_to_report(o: &Outcome) -> bool {
    !o.dry_run
        && o.rows_read == 0
        && o.keys_touched == 0
        && o.keys_changed == 0
        && o.verdict() == crate::engine::Verdict::Ok
        && o.drift.is_empty()
        && o.restored_keys.is_empty()
        && o.write.superseded.is_empty()
        && o.late.rows == 0
        && o.late.keys == 0
        && o.closed_left_alone.is_empty()
        && o.alerts.is_empty()
}

/// That one line.
pub fn nothing_done(style: Style, o: &Outcome, env: &str, took: Duration) -> String {
    let cursor = o
        .cursor
        .map_or(String::new(), |(_, c)| format!(", cursor {c}"));
    format!(
        "{} No pending requests to aggregate ({env}{cursor}, {} seconds)\n",
        style.mark(Mark::Ok),
        format_secs(took)
    )
}

/// Everything after the run: counts, bad rows, the dry-run table, the summary.
pub fn summary(style: Style, o: &Outcome, env: &str, took: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} Mode: {}", style.mark(Mark::Info), describe_mode(o));
    let _ = writeln!(
        s,
        "{} Found {} to aggregate",
        style.mark(Mark::Info),
        count(o.rows_counted, "request", "requests")
    );
    let _ = writeln!(
        s,
        "{} Aggregating for {}",
        style.mark(Mark::Target),
        count(
            (o.keys_touched) as u64,
            "portal-month combination",
            "portal-month combinations"
        )
    );
    s.push_str(&periods_lines(style, o));
    s.push_str(&alerts_lines(style, o));
    if o.bad.count > 0 {
        let ids: Vec<String> = o
            .bad
            .examples
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        let _ = writeln!(
            s,
            "{} {} rejected as bad data and not counted (ids {}{}); first: {}",
            style.mark(Mark::Warn),
            count(o.bad.count, "row", "rows"),
            ids.join(", "),
            if o.bad.count as usize > ids.len() {
                ", ..."
            } else {
                ""
            },
            o.bad
                .examples
                .first()
                .map(|(id, why)| format!("id {id}: {why}"))
                .unwrap_or_default()
        );
    }
    if !o.drift.is_empty() {
        // Only keys actually written are "corrected": a refused key keeps
        // its stored counts, and a dry run writes nothing.
        let refused: std::collections::BTreeSet<_> =
            o.refused_decreases.iter().map(|c| c.key).collect();
        let (kept, fixed): (Vec<Change>, Vec<Change>) = o
            .drift
            .iter()
            .cloned()
            .partition(|c| refused.contains(&c.key) || o.write.lost.contains(&c.key));
        let verb = if o.dry_run {
            "would be corrected"
        } else {
            "were corrected"
        };
        let _ = if kept.is_empty() {
            writeln!(
                s,
                "{} Drift: {} with {} own rows and {}:",
                style.mark(Mark::Warn),
                count(
                    (fixed.len()) as u64,
                    "stored key disagreed",
                    "stored keys disagreed"
                ),
                if fixed.len() == 1 { "its" } else { "their" },
                if fixed.len() == 1 {
                    verb.replace("were", "was")
                } else {
                    verb.to_string()
                }
            )
        } else if fixed.is_empty() {
            writeln!(
                s,
                "{} Drift: {} with {} own rows and {} NOT corrected (below)",
                style.mark(Mark::Warn),
                count(
                    (kept.len()) as u64,
                    "stored key disagreed",
                    "stored keys disagreed"
                ),
                if kept.len() == 1 { "its" } else { "their" },
                if kept.len() == 1 { "was" } else { "were" }
            )
        } else {
            writeln!(
                s,
                "{} Drift: {} stored keys disagreed with their own rows; {} {verb}, {} NOT (below){}",
                style.mark(Mark::Warn),
                o.drift.len(),
                fixed.len(),
                kept.len(),
                if fixed.is_empty() { "" } else { ":" }
            )
        };
        s.push_str(&capped_table(&fixed));
    }
    if !o.refused_decreases.is_empty() {
        let _ = writeln!(
            s,
            "{} {} stored counts lowered (raw rows deleted or moved?) and NOT lowered; \
             new rows are still counted. Check, then rerun with --allow-decrease:",
            style.mark(Mark::Warn),
            count(
                (o.refused_decreases.len()) as u64,
                "key would have its",
                "keys would have their"
            )
        );
        s.push_str(&capped_table(&o.refused_decreases));
    } else if o.refusals_standing.count > 0 {
        let r = &o.refusals_standing;
        let standing = Standing {
            total: r.count,
            lost: r.lost,
            closed: r.closed,
        };
        let _ = writeln!(
            s,
            "{} refused keys stand since {} ({}): {}; {}",
            style.mark(Mark::Warn),
            o.refusals_standing
                .since
                .as_deref()
                .unwrap_or("an earlier run"),
            o.refusals_standing.examples.join(", "),
            standing.what(),
            standing.repair()
        );
    }
    if !o.write.lost.is_empty() {
        let keys: Vec<String> = o
            .write
            .lost
            .iter()
            .take(TABLE_CAP)
            .map(|k| k.to_string())
            .collect();
        let _ = writeln!(
            s,
            "{} {} did not take effect although no newer run had counted those keys: {}{}; run \
             `usage-agg verify`, and look for triggers or rules on portal_usage_monthly",
            style.mark(Mark::Error),
            count((o.write.lost.len()) as u64, "write", "writes"),
            keys.join(", "),
            more(o.write.lost.len())
        );
    }
    if !o.write.superseded.is_empty() {
        let _ = writeln!(
            s,
            "{} {} already counted further by another run; its newer totals were kept",
            style.mark(Mark::Info),
            count((o.write.superseded.len()) as u64, "key was", "keys were")
        );
    }
    if o.batches_halved > 0 {
        let _ = writeln!(
            s,
            "{} {} the statement timeout and halved, then went through; if this repeats, \
             a smaller --batch-size saves the wasted work",
            style.mark(Mark::Info),
            count(
                u64::from(o.batches_halved),
                "batch ran past",
                "batches ran past"
            )
        );
    }
    if let Some(reason) = &o.write.fallback_reason {
        let _ = writeln!(
            s,
            "{} Bulk upsert refused ({reason}); wrote {} one by one. Add UNIQUE(portal_id, month_year) to portal_usage_monthly.",
            style.mark(Mark::Warn),
            count((o.write.fallback_keys) as u64, "key", "keys")
        );
    }
    let unchanged = o.keys_touched.saturating_sub(o.keys_changed);
    if o.dry_run {
        s.push_str(&capped_table(&o.changes));
        let _ = writeln!(
            s,
            "{} Dry run: {} be written, {unchanged} unchanged; nothing was written",
            style.mark(Mark::Ok),
            count((o.keys_changed) as u64, "key would", "keys would")
        );
    } else {
        let _ = writeln!(
            s,
            "{} Aggregation completed: {} processed ({} written, {unchanged} unchanged), {}",
            if o.write.lost.is_empty() {
                style.mark(Mark::Ok)
            } else {
                style.mark(Mark::Error)
            },
            o.keys_touched,
            o.keys_changed,
            count((o.write.lost.len()) as u64, "write error", "write errors")
        );
    }
    let b = style.mark(Mark::Bullet);
    let _ = writeln!(s, "\n{} Aggregation Summary:", style.mark(Mark::Info));
    let _ = writeln!(s, "   {b} Total requests processed: {}", o.rows_counted);
    let _ = writeln!(s, "   {b} Portal-month combinations: {}", o.keys_touched);
    let _ = writeln!(s, "   {b} Rows rejected as bad data: {}", o.bad.count);
    if matches!(o.mode, Mode::Rpc { .. }) {
        // The server-side engine reads rows in the database, not over HTTP.
        let _ = writeln!(s, "   {b} Rows read in the database: {}", o.rows_read);
    } else {
        let _ = writeln!(s, "   {b} Rows read from the server: {}", o.rows_read);
    }
    if let Some((before, after)) = o.cursor {
        let before = before.map_or("none".to_string(), |c| c.to_string());
        let _ = writeln!(s, "   {b} Cursor: {before} -> {after}");
    }
    let _ = writeln!(s, "   {b} Duration: {} seconds", format_secs(took));
    if let Some(pace) = pace_line(o) {
        let _ = writeln!(s, "   {b} Pace: {pace}");
    }
    let _ = writeln!(s, "   {b} Environment: {env}");
    if !o.write.lost.is_empty() {
        let _ = writeln!(
            s,
            "{} Usage aggregation completed, but {} not take effect (exit status 65)",
            style.mark(Mark::Error),
            count((o.write.lost.len()) as u64, "write did", "writes did")
        );
    } else if !o.refused_decreases.is_empty() || o.refusals_standing.count > 0 {
        let _ = writeln!(
            s,
            "{} Usage aggregation completed, but {} counts above raw rows (exit status 65)",
            style.mark(Mark::Warn),
            count(
                o.refusals_standing
                    .count
                    .max(o.refused_decreases.len() as u64),
                "key holds",
                "keys hold"
            )
        );
    } else if o.bad.count > 0 {
        let _ = writeln!(
            s,
            "{} Usage aggregation completed, but {} skipped (exit status 65)",
            style.mark(Mark::Warn),
            count(o.bad.count, "bad row was", "bad rows were")
        );
    } else if o.keys_touched == 0
        && o.keys_changed == 0
        && o.drift.is_empty()
        && o.restored_keys.is_empty()
    {
        let _ = writeln!(
            s,
            "{} No pending requests to aggregate",
            style.mark(Mark::Ok)
        );
    } else {
        let _ = writeln!(
            s,
            "{} Usage aggregation completed successfully",
            style.mark(Mark::Ok)
        );
    }
    s
}

/// Rows booked as late adjustments, and closed months a rebuild left alone
/// (docs/semantics.md, "Closed months").
fn periods_lines(style: Style, o: &Outcome) -> String {
    let mut s = String::new();
    if o.late.rows > 0 || o.late.keys > 0 {
        let _ = writeln!(
            s,
            "{} {} rows of closed months {} as late adjustments ({} adjustment rows), booked in the open month; \
             the closed months' totals are unchanged",
            style.mark(Mark::Info),
            o.late.rows,
            if o.dry_run { "would be booked" } else { "booked" },
            o.late.keys
        );
        if o.dry_run {
            for c in o.late.changes.iter().take(TABLE_CAP) {
                let _ = writeln!(
                    s,
                    "  late {} booked in {}: {} requests{}",
                    c.key,
                    c.booked,
                    c.after.requests,
                    c.before
                        .map_or(String::new(), |b| format!(" (was {})", b.requests))
                );
            }
        }
    }
    if !o.closed_left_alone.is_empty() {
        let months: Vec<String> = o.closed_left_alone.iter().map(|m| m.to_string()).collect();
        let _ = writeln!(
            s,
            "{} Closed months left as they are: {} (their totals never change; `usage-agg reopen` one to rebuild it)",
            style.mark(Mark::Info),
            months.join(", ")
        );
    }
    s
}

/// The quotas' thresholds the run's bookings reached (docs/quotas.md):
/// recorded with the totals, or, dry, that would be.
fn alerts_lines(style: Style, o: &Outcome) -> String {
    let mut s = String::new();
    if o.alerts.is_empty() {
        return s;
    }
    let n = o.alerts.len() as u64;
    let _ = writeln!(
        s,
        "{} Quotas: {} reached, {} (once per portal, month, threshold and limit){}",
        style.mark(Mark::Info),
        count(n, "threshold", "thresholds"),
        match (o.dry_run, n) {
            (true, 1) => "which would be recorded as an alert",
            (true, _) => "which would be recorded as alerts",
            (false, 1) => "recorded with the totals as an alert",
            (false, _) => "recorded with the totals as alerts",
        },
        if o.dry_run {
            ""
        } else {
            "; `usage-agg alerts deliver` posts them"
        }
    );
    for a in o.alerts.iter().take(TABLE_CAP) {
        let _ = writeln!(
            s,
            "  portal {} {}: {}% of {} requests ({} counted)",
            a.portal_id, a.month_year, a.threshold_percent, a.request_limit, a.request_count
        );
    }
    if o.alerts.len() > TABLE_CAP {
        let _ = writeln!(s, "  ...{}", more(o.alerts.len()));
    }
    s
}

fn describe_mode(o: &Outcome) -> String {
    match &o.mode {
        Mode::RecomputeWithoutMigration => {
            "full recompute of every key (migration not applied)".into()
        }
        Mode::Rebuild { first_run: true } => "full rebuild (first run with the migration)".into(),
        Mode::Rebuild { first_run: false } => "full rebuild (--full)".into(),
        Mode::Month(m) => format!("rebuild of {m} (--month)"),
        Mode::Incremental => "incremental (new rows only)".into(),
        Mode::Rpc { batches } => format!(
            "server-side (--engine rpc), {}",
            count(*batches, "batch", "batches")
        ),
        Mode::Rebase => "rebase: cursor and watermarks reset, every key rebuilt (--rebase)".into(),
    }
}

/// Why a run took as long as it did, when the pace had a say: a slow
/// run at 3 a.m. should say it was being careful, not leave one guessing.
fn pace_line(o: &Outcome) -> Option<String> {
    match o.mode {
        Mode::Rpc { batches } if batches > 0 => Some(format!(
            "{}, the longest {} s; rested {} s between them (--aggressive: no rests)",
            count(batches, "batch", "batches"),
            format_secs(o.batch_longest),
            format_secs(o.batch_rest)
        )),
        Mode::Rpc { .. } => None,
        _ if o.rows_read == 0 || o.pace.peak_concurrency == 0 => None,
        _ => Some(format!(
            "up to {} in flight{}",
            count(o.pace.peak_concurrency as u64, "request", "requests"),
            if o.pace.cuts > 0 {
                format!(
                    ", cut back {} as the server's latency rose",
                    match o.pace.cuts {
                        1 => "once".to_string(),
                        n => format!("{n} times"),
                    }
                )
            } else {
                String::new()
            }
        )),
    }
}

/// "1 key", "2 keys": the number and the right form beside it.
pub fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Rows a human table shows; the JSON has them all.
pub const TABLE_CAP: usize = 20;

fn more(n: usize) -> String {
    if n > TABLE_CAP {
        format!(" and {} more (see --json)", n - TABLE_CAP)
    } else {
        String::new()
    }
}

/// At most [`TABLE_CAP`] keys, then how many more.
pub fn capped_table(changes: &[Change]) -> String {
    let mut s = dry_run_table(&changes[..changes.len().min(TABLE_CAP)]);
    if changes.len() > TABLE_CAP {
        let _ = writeln!(
            s,
            "  ... and {} more (see --json)",
            changes.len() - TABLE_CAP
        );
    }
    s
}

/// One warning line.
pub fn warning(style: Style, message: &str) -> String {
    format!("{} {message}\n", style.mark(Mark::Warn))
}

/// What `verify` found.
pub fn verify_report(style: Style, drift: &[Change], stored: usize, rows_read: u64) -> String {
    let mut s = String::new();
    if drift.is_empty() {
        let _ = writeln!(
            s,
            "{} portal_usage_monthly agrees with usage_requests: {stored} keys checked against {rows_read} rows",
            style.mark(Mark::Ok)
        );
    } else {
        let _ = writeln!(
            s,
            "{} {} from their raw rows (stored value shown as \"was\"; {stored} keys, {rows_read} rows checked):",
            style.mark(Mark::Error),
            count(drift.len() as u64, "key differs", "keys differ")
        );
        s.push_str(&capped_table(drift));
    }
    s
}

/// The one line the summary gives a run that stopped on an error; the
/// error itself is on stderr, once.
pub fn failure(style: Style, status: crate::exit::Status) -> String {
    let code = status.code();
    if status == crate::exit::Status::TempFail {
        format!(
            "{} Usage aggregation did not run this time (exit status {code}: try later; see stderr)\n",
            style.mark(Mark::Info)
        )
    } else {
        format!(
            "{} Usage aggregation failed (exit status {code}; the error and a hint are on stderr)\n",
            style.mark(Mark::Error)
        )
    }
}

fn format_secs(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.2}")
    } else {
        format!("{secs:.0}")
    }
}

/// What a dry run would write: one line a key, the stored value beside the
/// new one where they differ.
pub fn dry_run_table(changes: &[Change]) -> String {
    if changes.is_empty() {
        return String::new();
    }
    let cell = |before: Option<i64>, after: i64| match before {
        Some(b) if b != after => format!("{after} (was {b})"),
        _ => after.to_string(),
    };
    let mut t = Table::new("  ", "  ")
        .column(Align::Right, Width::Fit)
        .column(Align::Left, Width::Fit)
        .column(Align::Right, Width::Fit)
        .column(Align::Right, Width::Fit)
        .column(Align::Right, Width::Fit);
    t.row(["portal", "month", "requests", "successes", "errors"]);
    for c in changes {
        let b: Option<&Totals> = c.before.as_ref();
        t.row([
            c.key.portal_id.to_string(),
            c.key.month.to_string(),
            cell(b.map(|t| t.requests), c.after.requests),
            cell(b.map(|t| t.successes), c.after.successes),
            cell(b.map(|t| t.errors), c.after.errors),
        ]);
    }
    t.render()
}

/// The run as one JSON object: for `--json`, log shippers and the ping's
/// body. Field names are stable (README, "JSON output"); add, never rename.
pub struct RunRecord<'a> {
    pub command: &'static str,
    pub environment: Option<&'a str>,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub dry_run: bool,
    pub status: crate::exit::Status,
    pub result: Result<&'a Outcome, &'a anyhow::Error>,
    pub warnings: &'a [String],
}

/// `verify --json`: the keys that differ, in the same shape as drift.
pub fn verify_json(drift: &[Change], stored: usize, rows_read: u64) -> serde_json::Value {
    serde_json::json!({
        "version": 1,
        "command": "verify",
        "keys_checked": stored,
        "rows_read": rows_read,
        "differing": drift.iter().map(change_json).collect::<Vec<_>>(),
    })
}

fn change_json(c: &Change) -> serde_json::Value {
    use serde_json::json;
    let totals = |t: &Totals| {
        json!({
            "requests": t.requests, "successes": t.successes, "errors": t.errors,
            "last_request_at": t.last_request_at.map(crate::aggregation::format_timestamp),
            "last_request_id": t.last_request_id,
        })
    };
    json!({
        "portal_id": c.key.portal_id,
        "month": c.key.month.to_string(),
        "stored": c.before.as_ref().map(totals),
        "new": totals(&c.after),
    })
}

pub fn run_json(r: &RunRecord) -> serde_json::Value {
    use serde_json::json;
    let mut v = json!({
        "version": 1,
        "command": r.command,
        "environment": r.environment,
        "started_at": r.started_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "duration_seconds": (r.duration.as_secs_f64() * 1000.0).round() / 1000.0,
        "dry_run": r.dry_run,
        "exit_status": r.status.code(),
        "warnings": r.warnings,
    });
    match r.result {
        Ok(o) => {
            let extra = json!({
                "outcome": o.verdict().label(),
                "mode": match &o.mode {
                    Mode::RecomputeWithoutMigration => "recompute_without_migration".to_string(),
                    Mode::Rebuild { first_run: true } => "first_rebuild".to_string(),
                    Mode::Rebuild { first_run: false } => "full_rebuild".to_string(),
                    Mode::Month(m) => format!("month:{m}"),
                    Mode::Incremental => "incremental".to_string(),
                    Mode::Rpc { .. } => "rpc".to_string(),
                    Mode::Rebase => "rebase".to_string(),
                },
                "rows_read": o.rows_read,
                "rows_counted": o.rows_counted,
                "rows_rejected": o.bad.count,
                "rejected_examples": o.bad.examples.iter().map(|(id, why)| json!({"id": id, "reason": why.to_string()})).collect::<Vec<_>>(),
                "keys_touched": o.keys_touched,
                "keys_written": if o.dry_run { 0 } else { o.keys_changed },
                "keys_to_write": o.keys_changed,
                "changes": if o.dry_run { o.changes.iter().map(change_json).collect::<Vec<_>>() } else { Vec::new() },
                "drift": o.drift.iter().map(change_json).collect::<Vec<_>>(),
                "refused_decreases": o.refused_decreases.iter().map(change_json).collect::<Vec<_>>(),
                "keys_superseded": o.write.superseded.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "keys_lost": o.write.lost.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "refusals_standing": o.refusals_standing.count,
                "refusals_since": o.refusals_standing.since,
                "restored_keys": o.restored_keys,
                "batches_halved": o.batches_halved,
                "batches": match o.mode { Mode::Rpc { batches } => batches, _ => 0 },
                "batch_seconds_max": (o.batch_longest.as_secs_f64() * 1000.0).round() / 1000.0,
                "batch_rest_seconds": (o.batch_rest.as_secs_f64() * 1000.0).round() / 1000.0,
                "peak_concurrency": o.pace.peak_concurrency,
                "concurrency_cuts": o.pace.cuts,
                "cursor_before": o.cursor.and_then(|c| c.0),
                "cursor_after": o.cursor.map(|c| c.1),
                "upsert_fallback": o.write.fallback_reason,
                "late_rows": o.late.rows,
                "late_adjustments_written": if o.dry_run { 0 } else { o.late.keys },
                "late_changes": o.late.changes.iter().map(|c| json!({
                    "portal_id": c.key.portal_id, "month": c.key.month.to_string(),
                    "booked_month": c.booked.to_string(),
                    "stored": c.before.map(|b| b.requests), "new": c.after.requests,
                })).collect::<Vec<_>>(),
                "closed_months_left_alone": o.closed_left_alone.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                "alerts_recorded": if o.dry_run { 0 } else { o.alerts.len() },
                "alerts": o.alerts,
                "error": null,
            });
            merge(&mut v, extra);
        }
        Err(e) => merge(
            &mut v,
            json!({"outcome": "failed", "error": format!("{e:#}")}),
        ),
    }
    v
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(a), serde_json::Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// The refused keys that stand, by kind: each kind has its own repair
/// (docs/semantics.md, "Rebuilds", "Rebase", "Verdicts").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    pub total: u64,
    pub lost: u64,
    pub closed: u64,
}

impl Standing {
    pub fn of(f: &crate::preflight::Facts) -> Standing {
        Standing {
            total: f.refused_keys,
            lost: f.lost_keys.unwrap_or(0),
            closed: f.closed_refused_keys.unwrap_or(0),
        }
    }

    fn decreases(&self) -> u64 {
        self.total.saturating_sub(self.lost + self.closed)
    }

    /// What stands, kind by kind.
    pub fn what(&self) -> String {
        let mut parts = Vec::new();
        if self.decreases() > 0 {
            parts.push(count(
                self.decreases(),
                "key holds counts above its raw rows",
                "keys hold counts above their raw rows",
            ));
        }
        if self.lost > 0 {
            parts.push(count(
                self.lost,
                "key had a write that did not hold",
                "keys had a write that did not hold",
            ));
        }
        if self.closed > 0 {
            parts.push(count(
                self.closed,
                "key of a closed month has fewer raw rows than billed",
                "keys of closed months have fewer raw rows than billed",
            ));
        }
        parts.join("; ")
    }

    /// How to clear each kind that stands.
    pub fn repair(&self) -> String {
        let mut parts = Vec::new();
        if self.decreases() > 0 {
            parts.push(
                "check them, then `usage-agg aggregate --full --allow-decrease` (or --month M)",
            );
        }
        if self.lost > 0 {
            parts.push(
                "remove what undid the writes (a trigger, a rule, a hand edit), then `usage-agg aggregate --full` \
                 (or --month M; a closed month's key: `usage-agg aggregate --rebase`)",
            );
        }
        if self.closed > 0 {
            parts.push(
                "for a closed month: `usage-agg reopen --month M --reason ...`, `usage-agg aggregate --month M \
                 --allow-decrease`, then `usage-agg close --month M`",
            );
        }
        parts.join("; ")
    }
}

/// A time the database wrote (RFC 3339), in UTC.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

/// A time the database wrote, as every text shows times: to the second,
/// in UTC ("2026-12-07 04:39:38 UTC"); what does not parse, as written.
pub fn human_time(s: &str) -> String {
    parse_time(s).map_or_else(
        || s.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
    )
}

/// A span of seconds in the unit a person reads it in.
pub fn humanize(secs: i64) -> String {
    match secs.abs() {
        1 => "1 second".into(),
        s if s < 120 => format!("{s} seconds"),
        s if s < 7200 => format!("{} minutes", s / 60),
        s if s < 172_800 => format!("{} hours", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// A time the database wrote, with how long ago (or until) it is; "never"
/// for none.
pub fn when(s: Option<&str>, now: DateTime<Utc>) -> String {
    match s.and_then(parse_time) {
        Some(t) if t <= now => format!(
            "{} ({} ago)",
            t.format("%Y-%m-%d %H:%M:%S UTC"),
            humanize((now - t).num_seconds())
        ),
        Some(t) => format!(
            "{} (in {})",
            t.format("%Y-%m-%d %H:%M:%S UTC"),
            humanize((t - now).num_seconds())
        ),
        None => "never".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::{Key, Month};

    #[test]
    fn dry_run_table_shows_stored_beside_new_where_they_differ() {
        let t = |r, s, e| Totals {
            requests: r,
            successes: s,
            errors: e,
            ..Totals::default()
        };
        let key = |p| Key {
            portal_id: p,
            month: Month {
                year: 2025,
                month: 7,
            },
        };
        let table = dry_run_table(&[
            Change {
                key: key(42),
                before: Some(t(10, 9, 1)),
                after: t(12, 11, 1),
            },
            Change {
                key: key(7),
                before: None,
                after: t(3, 3, 0),
            },
        ]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].contains("42")
                && lines[1].contains("12 (was 10)")
                && lines[1].contains("11 (was 9)")
        );
        assert!(lines[1].trim_end().ends_with(" 1"), "{}", lines[1]);
        assert!(lines[2].contains("2025-07") && !lines[2].contains("was"));
    }

    #[test]
    fn tables_stop_at_twenty_keys_and_say_how_many_more() {
        let changes: Vec<Change> = (1..=23)
            .map(|p| Change {
                key: Key {
                    portal_id: p,
                    month: Month {
                        year: 2025,
                        month: 1,
                    },
                },
                before: None,
                after: Totals::default(),
            })
            .collect();
        let t = capped_table(&changes);
        assert_eq!(t.lines().count(), 1 + TABLE_CAP + 1, "{t}");
        assert!(t.ends_with("  ... and 3 more (see --json)\n"), "{t}");
        assert_eq!(capped_table(&changes[..20]).lines().count(), 21);
    }

    #[test]
    fn plain_style_has_no_emoji() {
        let o = Outcome {
            rows_counted: 4,
            keys_touched: 1,
            ..Outcome::default()
        };
        let s = summary(Style::plain(), &o, "DEV", Duration::from_millis(1500));
        assert!(s.is_ascii(), "{s}");
        assert!(s.contains("Total requests processed: 4") && s.contains("Duration: 1.50 seconds"));
    }
}
