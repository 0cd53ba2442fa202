//! `usage-agg status`: where the job stands, in one screen, and (with
//! `--max-age`) a health check for cron or a monitor: exit 75 when the last
//! successful run is too old; 65 or 78 while an assumption is broken or
//! keys are known to hold wrong totals.

use chrono::{DateTime, Utc};

use serde::Serialize;

use super::connect;
use crate::cli::StatusArgs;
use crate::exit::Status;
use crate::metrics::{self, StatusMetrics};
use crate::migrations::MIGRATION_FILE;
use crate::output::Style;
use crate::output::{humanize, parse_time, when};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::preflight;
use crate::printer::{Printer, Report};
use crate::schedule::CronAnswer;
use crate::state::StateRow;
use crate::store::rest::RestStore;
use crate::store::Store;
use crate::text_table::fields;

pub async fn run(args: StatusArgs) -> Status {
    let printer = Printer::new("status", &args.output);
    // A health check pings its own monitor: start, then the exit status
    // with what --json prints (or the error).
    let ping = match Ping::new(args.ping_url.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            let status = printer.fail(&e.into(), None);
            write_metrics(&args, None, status, None);
            return status;
        }
    };
    ping.start().await;
    let (status, json, env, standing) = match connect(&args.connection) {
        Err(e) => {
            let status = printer.fail(&e, None);
            (status, printer.failure_json(status, &e), None, None)
        }
        Ok((config, client)) => {
            let printer = printer.against(&config);
            let env = config.environment.upper();
            match check(&args, &client, env).await {
                Ok(r) => (printer.report(&r), printer.json_of(&r), Some(env), Some(r)),
                Err(e) => {
                    let status = printer.fail(&e, Some(&config));
                    (status, printer.failure_json(status, &e), Some(env), None)
                }
            }
        }
    };
    write_metrics(&args, env, status, standing.as_ref());
    ping.finish(status, &json).await;
    status
}

/// `--metrics-file`: what this check found, as `usage_agg_status_*`
/// gauges, from its report. When the check failed (no report), the last
/// success the database recorded is carried over from the previous file.
fn write_metrics(
    args: &StatusArgs,
    env: Option<&str>,
    status: Status,
    standing: Option<&Standing>,
) {
    let Some(path) = args
        .metrics_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return;
    };
    let environment = metrics::environment_label(
        env,
        args.connection.env,
        args.connection.env_file.as_deref(),
    );
    let checked_at = Utc::now();
    let m = match standing {
        Some(s) => s.metrics(checked_at),
        None => StatusMetrics::failed(
            checked_at,
            status.code(),
            metrics::previous_value(path, metrics::STATUS_LAST_SUCCESS, &environment),
        ),
    };
    metrics::write_or_warn(path, &metrics::render(&environment, &m.gauges()));
}

/// A problem as the JSON names it.
#[derive(Serialize)]
struct ProblemJson {
    code: String,
    message: String,
}

/// The scheduled job and its last runs, as the JSON shows them.
#[derive(Serialize)]
struct ScheduleJson {
    job: Option<crate::schedule::CronJob>,
    runs: Vec<crate::schedule::CronRun>,
}

/// The closed months, with the periods migration.
#[derive(Serialize)]
struct PeriodsJson {
    closed_months: Vec<crate::ledger::ClosedMonth>,
    newest_closed: Option<String>,
    prunable_rows: i64,
    closable_months: Vec<String>,
    reopened_months: Vec<crate::ledger::Reopened>,
}

/// What `status` found: the job's state, the run-time checks, the closed
/// months and the schedule, and the verdict on them.
#[derive(Serialize)]
struct Standing {
    #[serde(skip)]
    status: Status,
    #[serde(skip)]
    outcome: &'static str,
    migration_installed: bool,
    cursor: Option<i64>,
    newest_id: Option<i64>,
    backlog_estimate: Option<i64>,
    lease_owner: Option<String>,
    lease_taken_at: Option<String>,
    lease_expires_at: Option<String>,
    last_run_started_at: Option<String>,
    last_run_finished_at: Option<String>,
    last_run_outcome: Option<String>,
    last_run_rows: Option<i64>,
    last_run_seconds: Option<f64>,
    last_success_at: Option<String>,
    stale: bool,
    problems: Vec<ProblemJson>,
    refused_keys: u64,
    rejected_rows: i64,
    rejected_ids: Vec<i64>,
    refused_since: Option<String>,
    refused_examples: Vec<String>,
    last_run_by: Option<String>,
    schedule: Option<ScheduleJson>,
    #[serde(flatten)]
    periods: Option<PeriodsJson>,
    /// The quotas' alerts not yet delivered (quotas migration): how many,
    /// the oldest's age.
    alerts: Option<crate::alerts::AlertsStatus>,
    /// What the text shows besides the fields.
    #[serde(skip)]
    text: String,
}

impl Report for Standing {
    fn outcome(&self) -> &str {
        self.outcome
    }

    fn status(&self) -> Status {
        self.status
    }

    fn render(&self, _: Style) -> String {
        self.text.clone()
    }
}

impl Standing {
    /// The gauges of this check: the same facts its JSON carries (times as
    /// the database wrote them; one that does not parse is left out).
    fn metrics(&self, checked_at: DateTime<Utc>) -> StatusMetrics {
        let time =
            |t: &Option<String>| t.as_deref().and_then(parse_time).map(metrics::unix_seconds);
        StatusMetrics {
            checked_at,
            exit_status: self.status.code(),
            backlog: self.backlog_estimate,
            last_run_started: time(&self.last_run_started_at),
            last_success: time(&self.last_success_at),
            alerts_undelivered: self.alerts.as_ref().map(|a| a.undelivered),
            alerts_oldest_age: self
                .alerts
                .as_ref()
                .map(|a| a.oldest_age_seconds.unwrap_or(0)),
        }
    }
}

/// The status: its verdict, JSON fields and text.
async fn check(args: &StatusArgs, client: &Client, env: &'static str) -> anyhow::Result<Standing> {
    let (installed, state, newest, facts, schedule) =
        gather(&RestStore::new(client.clone())).await?;
    // The closed months (periods migration); its absence is a problem of
    // the schema, as the runs say (78).
    let periods = if installed {
        match crate::ledger::status(client, crate::periods::DEFAULT_GRACE.as_secs()).await {
            Ok(p) => Ok(Some(p)),
            Err(e) if crate::exit::classify(&e) == Status::Config => Err(format!(
                "the periods migration is not applied, so runs stop (78): apply {} (`usage-agg sql`)",
                crate::migrations::PERIODS_MIGRATION
            )),
            Err(e) => return Err(e),
        }
    } else {
        Ok(None)
    };
    let alerts = if installed {
        crate::alerts::status(client).await?
    } else {
        None
    };
    let now = Utc::now();
    let last_success = state.last_success_at.as_deref().and_then(parse_time);
    let stale = args.max_age.is_some_and(|max| {
        last_success.is_none_or(|t| (now - t).to_std().unwrap_or_default() > max)
    });
    let backlog = match (state.cursor_id, newest) {
        (Some(c), Some(n)) => Some((n - c).max(0)),
        (None, Some(n)) => Some(n),
        (_, None) => Some(0),
    };
    let problems = facts.as_ref().map(preflight::problems).unwrap_or_default();
    // Newest id minus the cursor says nothing when the ids no longer
    // describe the table (a sequence set back, a truncate): unknown, not 0.
    let backlog = backlog.filter(|_| {
        problems
            .iter()
            .all(|p| p.kind() == preflight::ProblemKind::Schema)
    });
    let refused = facts.as_ref().map_or(0, |f| f.refused_keys);
    // Known-wrong totals outrank an old success: they need a person.
    let (status, outcome) = if periods.is_err() {
        (Status::Config, "problems")
    } else if !problems.is_empty() {
        (
            Status::from(preflight::Refused(problems.clone()).kind()),
            "problems",
        )
    } else if refused > 0 {
        (Status::DataErr, "decreases_refused")
    } else if stale {
        (Status::TempFail, "stale")
    } else {
        (Status::Ok, "ok")
    };
    // The state's lines, then the schedule's, the problems, the alerts,
    // the closed months, staleness: one column of labels.
    let gone_in_db = facts.as_ref().and_then(|f| f.lease_holder_gone) == Some(true);
    let mut lines = state_lines(installed, &state, newest, backlog, now, gone_in_db);
    if let Some(s) = &schedule {
        lines.extend(crate::commands::schedule::job_lines(
            s.job.as_ref(),
            &s.runs,
            now,
            false,
        ));
    }
    for p in &problems {
        lines.push(("PROBLEM:".into(), p.to_string()));
    }
    if let Some(f) = facts.as_ref().filter(|f| f.refused_keys > 0) {
        let standing = crate::output::Standing::of(f);
        lines.push((
            "REFUSED:".into(),
            format!(
                "{} since {} ({}); {}",
                standing.what(),
                f.refused_since.as_deref().unwrap_or("?"),
                f.refused_examples.join(", "),
                standing.repair()
            ),
        ));
    }
    if let Some(a) = alerts.as_ref().filter(|a| a.quotas > 0 || a.alerts > 0) {
        lines.push(("Alerts:".into(), alerts_line(a)));
    }
    match &periods {
        Ok(Some(p)) => lines.extend(periods_lines(p)),
        Ok(None) => {}
        Err(problem) => lines.push(("PROBLEM:".into(), problem.clone())),
    }
    if stale {
        lines.push((
            "STALE:".into(),
            format!(
                "no successful run in the last {}{}",
                humanize(args.max_age.unwrap_or_default().as_secs() as i64),
                if installed {
                    ""
                } else {
                    " (none is recorded: runs keep their record in the migrations' state table, which is not there)"
                }
            ),
        ));
    }
    let text = format!("usage-agg status ({env})\n{}", fields(&lines));
    let mut problem_json: Vec<ProblemJson> = problems
        .iter()
        .map(|p| ProblemJson {
            code: p.code().to_string(),
            message: p.to_string(),
        })
        .collect();
    if let Err(problem) = &periods {
        problem_json.push(ProblemJson {
            code: "periods_migration_missing".into(),
            message: problem.clone(),
        });
    }
    Ok(Standing {
        status,
        outcome,
        migration_installed: installed,
        cursor: state.cursor_id,
        newest_id: newest,
        backlog_estimate: backlog,
        last_run_seconds: run_seconds(&state),
        lease_owner: state.lease_owner,
        lease_taken_at: state.lease_taken_at,
        lease_expires_at: state.lease_expires_at,
        last_run_started_at: state.last_run_started_at,
        last_run_finished_at: state.last_run_finished_at,
        last_run_outcome: state.last_run_outcome,
        last_run_rows: state.last_run_rows,
        last_success_at: state.last_success_at,
        stale,
        problems: problem_json,
        refused_keys: refused,
        rejected_rows: state.rejected_rows.unwrap_or(0),
        rejected_ids: state.rejected_ids.unwrap_or_default(),
        refused_since: facts.as_ref().and_then(|f| f.refused_since.clone()),
        refused_examples: facts
            .as_ref()
            .map(|f| f.refused_examples.clone())
            .unwrap_or_default(),
        last_run_by: state.last_run_by,
        schedule: schedule.map(|s| ScheduleJson {
            job: s.job,
            runs: s.runs,
        }),
        periods: periods.ok().flatten().map(|p| PeriodsJson {
            closed_months: p.closed,
            newest_closed: p.newest_closed,
            prunable_rows: p.prunable_rows,
            closable_months: p.closable,
            reopened_months: p.reopened,
        }),
        alerts,
        text,
    })
}

/// The quotas' alerts in a line: all delivered, or how many wait and for
/// how long (docs/quotas.md).
pub fn alerts_line(a: &crate::alerts::AlertsStatus) -> String {
    if a.undelivered == 0 {
        return format!(
            "{} recorded, all delivered ({})",
            a.alerts,
            crate::output::count(a.quotas, "quota", "quotas")
        );
    }
    format!(
        "{} undelivered, the oldest reached {} ago{}; `usage-agg alerts deliver` posts them",
        a.undelivered,
        humanize(a.oldest_age_seconds.unwrap_or(0)),
        a.last_error
            .as_deref()
            .map_or(String::new(), |e| format!(" (last error: {e})"))
    )
}

type Gathered = (
    bool,
    StateRow,
    Option<i64>,
    Option<preflight::Facts>,
    Option<CronAnswer>,
);

async fn gather(store: &impl Store) -> anyhow::Result<Gathered> {
    let installed = store.installed().await?;
    let (row, facts, schedule) = if installed {
        (
            store.state().await?.unwrap_or_default(),
            Some(store.preflight().await?),
            schedule(store).await,
        )
    } else {
        (StateRow::default(), None, None)
    };
    // Minus the cursor, the newest id bounds the backlog (ids skipped by
    // rolled-back inserts make it an overestimate, never an under-).
    let newest = store.newest_id().await?;
    Ok((
        installed,
        row,
        (newest > 0).then_some(newest),
        facts,
        schedule,
    ))
}

/// Runs of the scheduled job shown by `status`.
const CRON_RUNS_SHOWN: usize = 3;

/// The job scheduled in the database and its last runs, when pg_cron is
/// there. None without pg_cron, and without the migration that reads it
/// (the schedule is optional); any other error is a warning, not a failed
/// health check.
async fn schedule(store: &impl Store) -> Option<CronAnswer> {
    match store.schedule_show(CRON_RUNS_SHOWN).await {
        Ok(a) => a.pg_cron.then_some(a),
        Err(e)
            if crate::postgrest::kind_of(&e) == Some(crate::postgrest::Kind::MissingFunction) =>
        {
            None
        }
        Err(e) => {
            tracing::warn!("could not read the schedule: {e:#}");
            None
        }
    }
}

/// Whether the months (YYYY-MM, in order) follow each other with none
/// missing.
fn contiguous<'a>(months: impl Iterator<Item = &'a str>) -> bool {
    let parsed: Vec<crate::aggregation::Month> = months
        .filter_map(crate::aggregation::Month::parse)
        .collect();
    parsed
        .windows(2)
        .all(|w| crate::periods::next_month(w[0]) == w[1])
}

/// Closed months, the newest, what prune could delete, what could close,
/// what was reopened.
fn periods_lines(p: &crate::ledger::PeriodsStatus) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut line = |k: &str, v: String| out.push((format!("{k}:"), v));
    match (p.closed.first(), p.newest_closed.as_deref()) {
        (Some(first), Some(newest)) => line(
            "Closed months",
            format!(
                "{} ({}); newest closed {newest} (closed {} by {}); adjustments are booked in the month after \
                 it",
                p.closed.len(),
                // A range only when no month in it is open (one reopened).
                if p.closed.len() > 3 && contiguous(p.closed.iter().map(|c| c.month.as_str())) {
                    format!("{} to {newest}", first.month)
                } else {
                    p.closed.iter().map(|c| c.month.clone()).collect::<Vec<_>>().join(", ")
                },
                p.closed.last().and_then(|c| c.closed_at.as_deref()).map_or("?".into(), crate::output::human_time),
                p.closed.last().and_then(|c| c.closed_by.as_deref()).unwrap_or("?")
            ),
        ),
        _ => line("Closed months", "none".into()),
    }
    if !p.closed.is_empty() {
        line(
            "Prunable",
            format!(
                "{} raw rows of closed months are still there{}",
                p.prunable_rows,
                match (
                    p.prunable_rows,
                    p.newest_closed
                        .as_deref()
                        .and_then(crate::aggregation::Month::parse)
                ) {
                    (n, Some(m)) if n > 0 => format!(
                        " (`usage-agg prune --before {}`)",
                        crate::periods::next_month(m)
                    ),
                    _ => String::new(),
                }
            ),
        );
    }
    if !p.closable.is_empty() {
        line(
            "Closable",
            format!(
                "{} (past a 72h grace; `usage-agg close --month ...`, or `aggregate --auto-close 72h`)",
                p.closable.join(", ")
            ),
        );
    }
    for r in &p.reopened {
        line(
            "Reopened",
            format!(
                "{} by {} at {}: {}",
                r.month,
                r.reopened_by.as_deref().unwrap_or("?"),
                r.reopened_at.as_deref().unwrap_or("?"),
                r.reason.as_deref().unwrap_or("")
            ),
        );
    }
    out
}

/// How long the last finished run took; None while a newer run is under
/// way (its start is not the finished run's), never negative.
fn run_seconds(s: &StateRow) -> Option<f64> {
    let start = parse_time(s.last_run_started_at.as_deref()?)?;
    let end = parse_time(s.last_run_finished_at.as_deref()?)?;
    (end >= start).then(|| (end - start).num_milliseconds() as f64 / 1000.0)
}

fn state_lines(
    installed: bool,
    s: &StateRow,
    newest: Option<i64>,
    backlog: Option<i64>,
    now: DateTime<Utc>,
    holder_gone_in_db: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut line = |k: &str, v: String| out.push((format!("{k}:"), v));
    if !installed {
        line(
            "Migration",
            format!("NOT applied: every run recomputes all rows; apply {MIGRATION_FILE}"),
        );
        line(
            "Newest row id",
            newest.map_or("none (table empty)".into(), |n| n.to_string()),
        );
        return out;
    }
    line("Migration", "applied".into());
    line(
        "Cursor",
        s.cursor_id.map_or(
            "none yet: the next run rebuilds every key".into(),
            |c| match backlog {
                Some(_) => format!("{c} (every row up to this id is counted)"),
                // A data problem stands (a sequence set back, a reset).
                None => format!("{c} (not to be trusted until the PROBLEM below is repaired)"),
            },
        ),
    );
    line(
        "Backlog",
        match backlog {
            Some(b) => format!(
                "about {b} rows waiting (newest id {})",
                newest.map_or("none".into(), |n| n.to_string())
            ),
            None => format!(
                "unknown: the ids no longer describe the table (see PROBLEM; newest id {})",
                newest.map_or("none".into(), |n| n.to_string())
            ),
        },
    );
    let lease_live = s
        .lease_expires_at
        .as_deref()
        .and_then(parse_time)
        .is_some_and(|t| t > now);
    // A lease whose process is gone (same host) is taken over at once by the
    // next run, expired or not.
    // ... or a run in the database whose backend is gone (the preflight
    // looks in pg_stat_activity).
    let holder_gone = holder_gone_in_db
        || s.lease_owner
            .as_deref()
            .is_some_and(crate::state::owner_is_dead_here);
    line(
        "Lease",
        match (&s.lease_owner, lease_live, holder_gone) {
            (Some(owner), _, true) => format!(
                "stale: held by {owner}, whose process is gone (the next run takes it over)"
            ),
            (Some(owner), true, false) => format!(
                "held by {owner} since {}, expires {}",
                when(s.lease_taken_at.as_deref(), now),
                when(s.lease_expires_at.as_deref(), now)
            ),
            (Some(owner), false, false) => {
                format!("stale: last held by {owner}, expired (the next run takes it over)")
            }
            (None, _, _) => "free".into(),
        },
    );
    // A run under way: its start is newer than the last run's end.
    let started = s.last_run_started_at.as_deref().and_then(parse_time);
    let finished = s.last_run_finished_at.as_deref().and_then(parse_time);
    let running =
        lease_live && !holder_gone && started.is_some_and(|st| finished.is_none_or(|f| st > f));
    if running {
        line(
            "Running",
            format!(
                "since {}, by {}",
                when(s.last_run_started_at.as_deref(), now),
                s.lease_owner.as_deref().unwrap_or("?")
            ),
        );
    }
    line(
        "Last run",
        match (&s.last_run_finished_at, running) {
            (None, _) if s.last_run_started_at.is_none() => "never".into(),
            (None, _) => "none finished yet".into(),
            (Some(_), _) => {
                format!(
                    "{} {}{}{}",
                    if running { "finished" } else { "ended" },
                    when(s.last_run_finished_at.as_deref(), now),
                    s.last_run_outcome
                        .as_deref()
                        .map_or(String::new(), |o| format!(", {o}")),
                    s.last_run_rows
                        .map_or(String::new(), |r| format!(", {r} rows")),
                ) + &if running {
                    String::new()
                } else {
                    run_seconds(s).map_or(String::new(), |t| format!(", took {t:.1} s"))
                } + &s
                    .last_run_by
                    .as_deref()
                    .map_or(String::new(), |by| format!(", by {by}"))
            }
        },
    );
    line("Last success", when(s.last_success_at.as_deref(), now));
    if let Some(n) = s.rejected_rows.filter(|n| *n > 0) {
        let ids = s.rejected_ids.clone().unwrap_or_default();
        line(
            "Rejected",
            format!(
                "{} as bad data so far (first ids {}): fix or delete them; `usage-agg verify` lists them",
                crate::output::count(n as u64, "row", "rows"),
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing() -> Standing {
        Standing {
            status: Status::Ok,
            outcome: "ok",
            migration_installed: true,
            cursor: Some(100),
            newest_id: Some(142),
            backlog_estimate: Some(42),
            lease_owner: None,
            lease_taken_at: None,
            lease_expires_at: None,
            last_run_started_at: Some("2026-11-27T21:31:14.210+00:00".into()),
            last_run_finished_at: None,
            last_run_outcome: None,
            last_run_rows: None,
            last_run_seconds: None,
            last_success_at: Some("2026-11-27T21:31:15+00:00".into()),
            stale: false,
            problems: Vec::new(),
            refused_keys: 0,
            rejected_rows: 0,
            rejected_ids: Vec::new(),
            refused_since: None,
            refused_examples: Vec::new(),
            last_run_by: None,
            schedule: None,
            periods: None,
            alerts: None,
            text: String::new(),
        }
    }

    #[test]
    fn metrics_come_from_the_report_as_its_json_says_it() {
        let checked = parse_time("2026-11-27T22:00:00+00:00").unwrap();
        let m = standing().metrics(checked);
        assert_eq!(
            (m.exit_status, m.backlog, m.last_run_started, m.last_success),
            (0, Some(42), Some(1795815074.21), Some(1795815075.0))
        );
        assert_eq!((m.alerts_undelivered, m.alerts_oldest_age), (None, None));
        // With the quotas migration: undelivered alerts, and an age of 0
        // when none waits.
        let s = Standing {
            status: Status::TempFail,
            alerts: Some(crate::alerts::AlertsStatus::default()),
            last_success_at: Some("not a time".into()),
            ..standing()
        };
        let m = s.metrics(checked);
        assert_eq!(m.exit_status, 75);
        assert_eq!(
            (m.alerts_undelivered, m.alerts_oldest_age),
            (Some(0), Some(0))
        );
        assert_eq!(m.last_success, None);
    }

    #[test]
    fn renders_a_held_lease_and_the_last_run() {
        let now = parse_time("2026-11-27T12:00:00+00:00").unwrap();
        let s = StateRow {
            cursor_id: Some(100),
            lease_owner: Some("usage-agg@cron:42".into()),
            lease_taken_at: Some("2026-11-27T11:58:00+00:00".into()),
            lease_expires_at: Some("2026-11-27T12:08:00+00:00".into()),
            last_run_started_at: Some("2026-11-27T11:00:00+00:00".into()),
            last_run_finished_at: Some("2026-11-27T11:00:03.5+00:00".into()),
            last_run_outcome: Some("ok".into()),
            last_run_rows: Some(1234),
            last_success_at: Some("2026-11-27T11:00:03.5+00:00".into()),
            rejected_rows: Some(3),
            rejected_ids: Some(vec![7, 9, 12]),
            last_run_by: Some("usage-agg@cron:41".into()),
        };
        let text = fields(&state_lines(true, &s, Some(150), Some(50), now, false));
        assert!(
            text.contains("Rejected:      3 rows as bad data so far (first ids 7, 9, 12)"),
            "{text}"
        );
        assert!(
            text.contains("about 50 rows waiting (newest id 150)"),
            "{text}"
        );
        assert!(
            text.contains(
                "held by usage-agg@cron:42 since 2026-11-27 11:58:00 UTC (2 minutes ago)"
            ),
            "{text}"
        );
        assert!(
            text.contains("expires 2026-11-27 12:08:00 UTC (in 8 minutes)"),
            "{text}"
        );
        assert!(
            text.contains("ok, 1234 rows, took 3.5 s, by usage-agg@cron:41"),
            "{text}"
        );
    }
}
