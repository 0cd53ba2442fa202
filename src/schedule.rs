//! The job scheduled in the database (Supabase Cron, the pg_cron extension):
//! how `--every` becomes a cron expression, what the schedule functions of
//! the schedule migration answer, and the error for a database without
//! pg_cron. The job itself is `usage_agg_run_scheduled` in that migration
//! (README, "Run it without a cron host").

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The pg_cron job's name for this job: `usage-agg-<job>`.
pub fn job_name() -> String {
    format!("usage-agg-{}", crate::config::JOB)
}

/// Each scheduled run's time bound when `--time-limit` is not given: under
/// a minute, so that a run every minute ends before the next is due.
pub const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(50);

/// An interval pg_cron can keep, with its cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Every {
    pub interval: Duration,
    pub cron: String,
}

/// The cron expression that fires every `d`, when cron can say it: pg_cron
/// 1.4 takes cron syntax, whose finest unit is the minute, and a step
/// (`*/7`) restarts at each hour (or day), so only the steps that divide
/// the hour (or the day) keep a steady interval. Anything else is refused
/// rather than rounded: a schedule that drifts from what was asked is worse
/// than an error.
pub fn cron_expression(d: Duration) -> Result<Every, String> {
    const MINUTES: [u64; 11] = [1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30];
    const HOURS: [u64; 8] = [1, 2, 3, 4, 6, 8, 12, 24];
    let secs = d.as_secs();
    const PICK: &str =
        "pick one of 1m, 2m, 3m, 4m, 5m, 6m, 10m, 12m, 15m, 20m, 30m, 1h, 2h, 3h, 4h, 6h, \
                        8h, 12h, 1d";
    if secs == 0 && d.subsec_nanos() == 0 {
        return Err(format!("an interval of zero runs nothing; {PICK}"));
    }
    if d.subsec_nanos() != 0 || secs % 60 != 0 {
        return Err(format!(
            "pg_cron schedules by the minute (cron syntax): {} is not a whole number of minutes; {PICK}",
            humantime::format_duration(d)
        ));
    }
    let minutes = secs / 60;
    let cron = if MINUTES.contains(&minutes) {
        if minutes == 1 {
            "* * * * *".to_string()
        } else {
            format!("*/{minutes} * * * *")
        }
    } else if minutes % 60 == 0 && HOURS.contains(&(minutes / 60)) {
        match minutes / 60 {
            1 => "0 * * * *".to_string(),
            24 => "0 0 * * *".to_string(),
            h => format!("0 */{h} * * *"),
        }
    } else {
        return Err(format!(
            "cron cannot run something every {}: its steps restart at each hour and each day, so only \
             intervals that divide them stay even; pick one of 1m, 2m, 3m, 4m, 5m, 6m, 10m, 12m, 15m, 20m, \
             30m, 1h, 2h, 3h, 4h, 6h, 8h, 12h, 1d",
            humantime::format_duration(d)
        ));
    };
    Ok(Every { interval: d, cron })
}

/// "every 5 minutes" for an expression [`cron_expression`] makes; None for
/// any other (a job edited by hand is shown as its expression).
pub fn describe(cron: &str) -> Option<String> {
    let every = |n: u64, unit: &str| {
        if n == 1 {
            format!("every {unit}")
        } else {
            format!("every {n} {unit}s")
        }
    };
    match cron.split_whitespace().collect::<Vec<_>>()[..] {
        ["*", "*", "*", "*", "*"] => Some(every(1, "minute")),
        ["0", "*", "*", "*", "*"] => Some(every(1, "hour")),
        [m, "*", "*", "*", "*"] => m
            .strip_prefix("*/")?
            .parse()
            .ok()
            .map(|n| every(n, "minute")),
        ["0", "0", "*", "*", "*"] => Some(every(1, "day")),
        ["0", h, "*", "*", "*"] => h.strip_prefix("*/")?.parse().ok().map(|n| every(n, "hour")),
        _ => None,
    }
}

/// A pg_cron job, as `cron.job` holds it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CronJob {
    pub jobid: i64,
    pub jobname: Option<String>,
    pub schedule: String,
    pub command: String,
    pub active: bool,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub database: Option<String>,
}

/// One run of it, from `cron.job_run_details` (times as timestamptz JSON).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct CronRun {
    pub runid: i64,
    /// starting, running, sending, connecting, succeeded, failed.
    pub status: Option<String>,
    /// The error of a failed run; "1 row" (the summary `CALL` returns) for
    /// one that succeeded.
    pub return_message: Option<String>,
    pub start_time: Option<String>,
    pub end_time: Option<String>,
    /// Alerts recorded between its start and its end (the quota gaps
    /// migration): the scheduled run's, and any another writer recorded
    /// meanwhile (`quota set`, `reopen`, a CLI run it stood aside for).
    /// None without that migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts_recorded: Option<i64>,
}

/// What `usage_agg_schedule`, `usage_agg_unschedule` and
/// `usage_agg_schedule_show` answer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct CronAnswer {
    /// Whether the extension is created in this database. When false,
    /// nothing else is set.
    pub pg_cron: bool,
    pub version: Option<String>,
    /// Whether the server has the extension to create.
    pub available: bool,
    pub job: Option<CronJob>,
    /// Newest first.
    pub runs: Vec<CronRun>,
    /// `schedule`: the job was new (else updated).
    pub created: Option<bool>,
    /// `--remove`: a job was removed (else there was none).
    pub removed: Option<bool>,
    /// Why the database did not schedule: `time_limit`.
    pub refused: Option<String>,
    /// The statement timeout the scheduled run runs under, and where the
    /// figure comes from.
    pub statement_timeout: Option<StatementTimeout>,
}

/// `usage_agg_cron_statement_timeout`'s answer.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct StatementTimeout {
    pub ms: u64,
    pub source: String,
}

impl CronAnswer {
    /// The answer, or the error that says how to enable pg_cron.
    pub fn require_pg_cron(self) -> Result<CronAnswer, CronMissing> {
        if self.pg_cron {
            Ok(self)
        } else {
            Err(CronMissing {
                available: self.available,
            })
        }
    }
}

/// The database has no pg_cron: exit 78, with how to enable it.
#[derive(Debug, thiserror::Error)]
#[error(
    "the pg_cron extension is not enabled in this database, and scheduling the job in the database needs it \
     (Supabase Cron). On Supabase: Dashboard > Database > Extensions > pg_cron, or run \
     `create extension pg_cron with schema extensions;` in the SQL editor. On your own PostgreSQL: {}, set \
     shared_preload_libraries = 'pg_cron' and cron.database_name to this database, restart it, then \
     CREATE EXTENSION pg_cron. Or run `usage-agg aggregate` from a cron host instead (README, \"Cron\")",
    if *available {
        "the server has it"
    } else {
        "install it on the server (Debian: the postgresql-15-cron package; it is not installed there now)"
    }
)]
pub struct CronMissing {
    /// Whether the server has the extension (so only CREATE EXTENSION is missing).
    pub available: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cron(s: &str) -> Result<String, String> {
        cron_expression(humantime::parse_duration(s).unwrap()).map(|e| e.cron)
    }

    #[test]
    fn intervals_cron_keeps_evenly_become_expressions() {
        for (every, expr) in [
            ("1m", "* * * * *"),
            ("60s", "* * * * *"),
            ("5m", "*/5 * * * *"),
            ("30m", "*/30 * * * *"),
            ("60m", "0 * * * *"),
            ("1h", "0 * * * *"),
            ("2h", "0 */2 * * *"),
            ("12h", "0 */12 * * *"),
            ("24h", "0 0 * * *"),
            ("1d", "0 0 * * *"),
        ] {
            assert_eq!(cron(every).as_deref(), Ok(expr), "{every}");
            assert!(describe(expr).is_some(), "{expr}");
        }
        assert_eq!(describe("*/5 * * * *").as_deref(), Some("every 5 minutes"));
        assert_eq!(describe("0 * * * *").as_deref(), Some("every hour"));
        assert_eq!(describe("0 */2 * * *").as_deref(), Some("every 2 hours"));
        assert_eq!(describe("15 3 * * 1"), None);
    }

    #[test]
    fn what_cron_cannot_keep_is_refused_with_the_choices() {
        for every in ["30s", "90s", "7m", "45m", "90m", "5h", "2d", "1m30s"] {
            let e = cron(every).unwrap_err();
            assert!(e.contains("pick one of 1m"), "{every}: {e}");
        }
        assert!(cron("30s").unwrap_err().contains("by the minute"));
        assert!(cron("7m").unwrap_err().contains("every 7m"));
    }

    #[test]
    fn the_missing_extension_is_named_with_how_to_enable_it_on_supabase() {
        let e = CronAnswer::default().require_pg_cron().unwrap_err();
        let text = e.to_string();
        for needle in [
            "pg_cron extension is not enabled",
            "Dashboard > Database > Extensions > pg_cron",
            "create extension pg_cron with schema extensions",
            "postgresql-15-cron",
        ] {
            assert!(text.contains(needle), "{needle:?} not in {text}");
        }
    }
}
