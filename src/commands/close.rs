//! `usage-agg close --month YYYY-MM`: close a billing month (docs/semantics.md,
//! "Closed months"). In order: refuse inside the grace window by the
//! database's clock (64, naming the earliest time), catch up (the same run
//! `aggregate` makes), check the month's keys against their raw rows (65
//! with the keys on any drift), then record it closed with its snapshot in
//! one transaction. A closed month closes again as a no-op (0).

use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::connect;
use crate::aggregation::Month;
use crate::cli::{AggregateArgs, CloseArgs};
use crate::engine::rebuild::{self, Marks, Scope};
use crate::engine::{Change, Verdict};
use crate::exit::Status;
use crate::job::Job;
use crate::ledger::{self, CloseAnswer};
use crate::output::{capped_table, Style};
use crate::periods::{self, Blocked, Refusal};
use crate::printer::{Printer, Report};
use crate::progress::Progress;
use crate::store::rest::RestStore;
use crate::store::{Store, StoredFilter};

/// How a close ended, for the text and the JSON.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(into = "ClosingJson")]
pub struct Closing {
    pub month: Option<Month>,
    /// `closed`, `already_closed`, `would_close`.
    pub outcome: &'static str,
    pub answer: CloseAnswer,
    pub caught_up_rows: u64,
    pub warnings: Vec<String>,
}

pub async fn run(args: CloseArgs) -> Status {
    let printer = Printer::new("close", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer
        .against(&config)
        .on_failure("month", args.month.to_string());
    let store = RestStore::new(client);
    let quiet = !printer.human();
    match close(&store, args.month, args.grace, args.dry_run, quiet).await {
        Ok(c) => printer.report(&c),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

impl Report for Closing {
    fn outcome(&self) -> &str {
        self.outcome
    }

    fn render(&self, style: Style) -> String {
        render(style, self)
    }
}

/// The catch-up run a close (and `aggregate --auto-close`) makes: what
/// `aggregate` does with its defaults, planned the same way.
pub fn catch_up_job(quiet: bool) -> Job {
    Job::plan(
        &AggregateArgs::defaults(),
        Progress::for_terminal(quiet),
        None,
    )
}

/// Closes `month`, or says why not (errors: [`Refusal`] 64, [`Blocked`]
/// 65, or what the catch-up run or the server answered).
pub async fn close<S: Store>(
    store: &S,
    month: Month,
    grace: Duration,
    dry_run: bool,
    quiet: bool,
) -> anyhow::Result<Closing> {
    anyhow::ensure!(
        store.installed().await?,
        "the usage-agg migrations are not applied, so no month can close: apply them first (`usage-agg sql`)"
    );
    let grace_secs = grace.as_secs();
    let info = store.period_info(month, grace_secs).await?;
    let mut c = Closing {
        month: Some(month),
        ..Closing::default()
    };
    if info.closed {
        c.outcome = "already_closed";
        c.answer = CloseAnswer {
            already_closed: true,
            closed_at: info.closed_at,
            closed_by: info.closed_by,
            up_to_id: info.up_to_id,
            ..CloseAnswer::default()
        };
        return Ok(c);
    }
    if !info.can_close {
        return Err(grace_refusal(
            month,
            grace,
            info.future,
            info.earliest_close_at.as_deref(),
            info.now.as_deref(),
        ));
    }
    if !dry_run {
        let mut warnings = Vec::new();
        let outcome = catch_up_job(quiet).run(store, &mut warnings).await?;
        c.caught_up_rows = outcome.rows_counted;
        c.warnings = warnings;
        match outcome.verdict() {
            Verdict::Ok => {}
            Verdict::BadRows => c.warnings.push(format!(
                "the catch-up run rejected {} bad rows (not counted in any month)",
                outcome.bad.count
            )),
            v => {
                return Err(Blocked(format!(
                    "{month} was not closed: the catch-up run ended with {} (see `usage-agg aggregate`); \
                     a month closes only on totals known to be right",
                    v.label()
                ))
                .into())
            }
        }
    }
    let drift = month_drift(store, month).await?;
    if !drift.is_empty() {
        return Err(Blocked(format!(
            "{month} was not closed: {} of its keys differ from their raw rows ({}); repair them \
             (`usage-agg aggregate --month {month}`, with --allow-decrease if rows were deleted), then close it\n{}",
            drift.len(),
            drift
                .iter()
                .take(20)
                .map(|d| d.key.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            capped_table(&drift)
        ))
        .into());
    }
    if dry_run {
        let stored = store
            .stored(
                StoredFilter::Month(month),
                false,
                crate::engine::DEFAULT_PAGE_SIZE,
            )
            .await?;
        c.outcome = "would_close";
        c.answer = CloseAnswer {
            keys: json!(stored.len()),
            requests: Some(stored.values().map(|t| t.requests).sum()),
            successes: Some(stored.values().map(|t| t.successes).sum()),
            errors: Some(stored.values().map(|t| t.errors).sum()),
            up_to_id: store.state().await?.and_then(|s| s.cursor_id),
            ..CloseAnswer::default()
        };
        return Ok(c);
    }
    let answer = store
        .close_month(month, grace_secs, &periods::who())
        .await?;
    match answer.refused.as_deref() {
        None if answer.already_closed => c.outcome = "already_closed",
        None => c.outcome = "closed",
        Some("grace") => {
            return Err(grace_refusal(
                month,
                grace,
                false,
                answer.earliest_close_at.as_deref(),
                answer.now.as_deref(),
            ))
        }
        Some("keys") => {
            return Err(Blocked(format!(
                "{month} was not closed: keys of it stand refused or deleted ({}); `usage-agg status` shows \
                 them and their repair",
                answer.keys
            ))
            .into())
        }
        Some(other) => {
            return Err(Blocked(format!("{month} was not closed: the database refused ({other})")).into())
        }
    }
    c.answer = answer;
    Ok(c)
}

fn grace_refusal(
    month: Month,
    grace: Duration,
    future: bool,
    earliest: Option<&str>,
    now: Option<&str>,
) -> anyhow::Error {
    let when = if future {
        format!("{month} has not even begun")
    } else {
        format!("{month} is still inside its grace period")
    };
    Refusal(format!(
        "{month} cannot close yet: {when}; the earliest it can close is {} (its end plus a grace of {}, by the \
         database's clock; now {})",
        earliest.unwrap_or("?"),
        humanize(grace),
        now.unwrap_or("?")
    ))
    .into()
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        "0".into()
    } else if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

/// The month's keys that disagree with their raw rows (monthly row and late
/// adjustments against the rows there and those pruned), or whose rows
/// are counted nowhere.
pub async fn month_drift<S: Store>(store: &S, month: Month) -> anyhow::Result<Vec<Change>> {
    let cursor = store.state().await?.and_then(|s| s.cursor_id);
    let marks = Marks {
        cursor,
        horizon: store
            .safe_horizon(crate::engine::DEFAULT_HORIZON_WAIT)
            .await?,
    };
    let periods = store.periods().await?;
    let rc = rebuild::recount(
        store,
        Scope::Month(month),
        Some(marks),
        &periods,
        crate::engine::DEFAULT_PAGE_SIZE,
        &neighbourly(),
        &Progress::for_terminal(true),
        None,
    )
    .await?;
    Ok(rc.drift(true))
}

fn render(style: Style, c: &Closing) -> String {
    let mut s = String::new();
    let month = c.month.map(|m| m.to_string()).unwrap_or_default();
    let a = &c.answer;
    for w in &c.warnings {
        s.push_str(&crate::output::warning(style, w));
    }
    match c.outcome {
        "already_closed" => s.push_str(&format!(
            "{month} is already closed (at {} by {}); nothing to do\n",
            a.closed_at.as_deref().map_or("?".into(), crate::output::human_time),
            a.closed_by.as_deref().unwrap_or("?")
        )),
        "would_close" => s.push_str(&format!(
            "Dry run: {month} can close: its keys agree with their raw rows. It would close with {}, {} \
             requests ({} successes, {} errors), up to id {}; nothing was written\n",
            crate::output::count(a.keys.as_u64().unwrap_or(0), "key", "keys"),
            a.requests.unwrap_or(0),
            a.successes.unwrap_or(0),
            a.errors.unwrap_or(0),
            a.up_to_id.map_or("?".into(), |i| i.to_string())
        )),
        _ => s.push_str(&format!(
            "Closed {month} at {} by {}: {}, {} requests ({} successes, {} errors), every row up to id {} \
             counted ({} rows caught up first). Its totals never change now; rows that come late are booked as \
             adjustments in the open month\n",
            a.closed_at.as_deref().map_or("?".into(), crate::output::human_time),
            a.closed_by.as_deref().unwrap_or("?"),
            crate::output::count(a.keys.as_u64().unwrap_or(0), "key", "keys"),
            a.requests.unwrap_or(0),
            a.successes.unwrap_or(0),
            a.errors.unwrap_or(0),
            a.up_to_id.map_or("?".into(), |i| i.to_string()),
            c.caught_up_rows
        )),
    }
    s
}

/// Closing's JSON fields, as documented.
#[derive(Serialize)]
struct ClosingJson {
    month: Option<String>,
    closed_at: Option<String>,
    closed_by: Option<String>,
    up_to_id: Option<i64>,
    keys: serde_json::Value,
    requests: Option<i64>,
    successes: Option<i64>,
    errors: Option<i64>,
    caught_up_rows: u64,
    warnings: Vec<String>,
}

impl From<Closing> for ClosingJson {
    fn from(c: Closing) -> ClosingJson {
        let a = c.answer;
        ClosingJson {
            month: c.month.map(|m| m.to_string()),
            closed_at: a.closed_at,
            closed_by: a.closed_by,
            up_to_id: a.up_to_id,
            keys: a.keys,
            requests: a.requests,
            successes: a.successes,
            errors: a.errors,
            caught_up_rows: c.caught_up_rows,
            warnings: c.warnings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::periods::DEFAULT_GRACE;
    use crate::store::memory::MemoryStore;

    #[tokio::test]
    async fn a_close_catches_up_checks_and_closes_once() {
        let store = MemoryStore::default();
        store.insert(&[(1, "2025-05", true), (2, "2025-05", false)]);
        let m = Month::parse("2025-05").unwrap();
        let c = close(&store, m, DEFAULT_GRACE, false, true).await.unwrap();
        assert_eq!((c.outcome, c.caught_up_rows), ("closed", 2));
        assert!(store.periods().await.unwrap().is_closed(m));
        let again = close(&store, m, DEFAULT_GRACE, false, true).await.unwrap();
        assert_eq!(again.outcome, "already_closed");
    }

    #[tokio::test]
    async fn a_month_whose_keys_drift_does_not_close() {
        let store = MemoryStore::default();
        store.insert(&[(1, "2025-05", true), (1, "2025-05", true)]);
        let m = Month::parse("2025-05").unwrap();
        catch_up_job(true)
            .run(&store, &mut Vec::new())
            .await
            .unwrap();
        store.delete_raw(&[1]);
        let err = close(&store, m, DEFAULT_GRACE, false, true)
            .await
            .unwrap_err();
        assert_eq!(crate::exit::classify(&err), Status::DataErr, "{err:#}");
        assert!(format!("{err:#}").contains("1:2025-05"), "{err:#}");
        assert!(!store.periods().await.unwrap().is_closed(m));
    }

    #[test]
    fn grace_reads_back_as_given() {
        assert_eq!(humanize(Duration::from_secs(72 * 3600)), "72h");
        assert_eq!(humanize(Duration::from_secs(90 * 60)), "90m");
        assert_eq!(humanize(Duration::from_secs(0)), "0");
    }
}

/// What `aggregate --auto-close` did after its run.
#[derive(Debug, Default, Clone)]
pub struct AutoClosed {
    pub closed: Vec<Month>,
    /// Months past their grace that did not close, and why.
    pub refused: Vec<(Month, String)>,
}

impl AutoClosed {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "auto_closed": self.closed.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
            "auto_close_refused": self.refused.iter()
                .map(|(m, why)| json!({"month": m.to_string(), "reason": why}))
                .collect::<Vec<_>>(),
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if !self.closed.is_empty() {
            let months: Vec<String> = self.closed.iter().map(|m| m.to_string()).collect();
            s.push_str(&format!(
                "Closed {} (past their grace; their totals never change now)\n",
                months.join(", ")
            ));
        }
        for (m, why) in &self.refused {
            s.push_str(&format!("NOT closed {m}: {why}\n"));
        }
        s
    }
}

/// Closes every month with usage that is open and past `grace` by the
/// database's clock, oldest first, each only if its keys agree with their
/// raw rows (one recount for all of them). The caller has just caught up.
pub async fn auto_close(store: &RestStore, grace: Duration) -> anyhow::Result<AutoClosed> {
    let mut out = AutoClosed::default();
    let status = ledger::status(store.client(), grace.as_secs()).await?;
    let months: Vec<Month> = status
        .closable
        .iter()
        .filter_map(|m| Month::parse(m))
        .collect();
    if months.is_empty() {
        return Ok(out);
    }
    let drift = if months.len() == 1 {
        month_drift(store, months[0]).await?
    } else {
        let cursor = store.state().await?.and_then(|s| s.cursor_id);
        let marks = Marks {
            cursor,
            horizon: store
                .safe_horizon(crate::engine::DEFAULT_HORIZON_WAIT)
                .await?,
        };
        let periods = store.periods().await?;
        rebuild::recount(
            store,
            Scope::All,
            Some(marks),
            &periods,
            crate::engine::DEFAULT_PAGE_SIZE,
            &neighbourly(),
            &Progress::for_terminal(true),
            None,
        )
        .await?
        .drift(true)
    };
    let by = periods::who();
    for m in months {
        let keys: Vec<String> = drift
            .iter()
            .filter(|c| c.key.month == m)
            .map(|c| c.key.to_string())
            .collect();
        if !keys.is_empty() {
            out.refused.push((
                m,
                format!(
                    "{} from their raw rows ({}); repair them (`usage-agg aggregate --month {m}`), then it \
                     closes on the next run",
                    crate::output::count(keys.len() as u64, "key differs", "keys differ"),
                    keys.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
            continue;
        }
        let a = store.close_month(m, grace.as_secs(), &by).await?;
        match a.refused {
            None => out.closed.push(m),
            Some(why) => out
                .refused
                .push((m, format!("the database refused ({why}: {})", a.keys))),
        }
    }
    Ok(out)
}

/// Closing a month scans it while the product runs: at the default pace.
fn neighbourly() -> crate::pace::Pace {
    crate::pace::Pace::new(crate::pace::PaceSettings::neighbourly(usize::from(
        crate::pace::DEFAULT_CONCURRENCY,
    )))
}
