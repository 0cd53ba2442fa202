//! `usage-agg schedule`: the job run in the database by pg_cron (Supabase
//! Cron), for a project with no cron host. `--every` installs or updates the
//! pg_cron job `usage-agg-default` (by name: running it again changes the
//! interval, never adds a second job), `--remove` removes it, `--show` lists
//! it with its last runs. All of it over the REST API, through the schedule
//! migration's functions; the job itself is `usage_agg_run_scheduled`
//! (README, "Run it without a cron host").

use chrono::{DateTime, Utc};

use serde::Serialize;

use super::connect;
use crate::cli::ScheduleArgs;
use crate::exit::Status;
use crate::output::{parse_time, when, Style};
use crate::printer::{Printer, Report};
use crate::schedule::{describe, job_name, CronAnswer, CronJob, CronRun};
use crate::store::rest::RestStore;
use crate::store::Store;

/// Runs shown by `--show` (and `status` shows fewer).
const RUNS_SHOWN: usize = 5;

pub async fn run(args: ScheduleArgs) -> Status {
    let printer = Printer::new("schedule", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let store = RestStore::new(client);
    let env = config.environment.upper();
    match act(&args, &store, env).await {
        Ok(s) => printer.report(&s),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

/// What `schedule` did (installed, updated, removed, none) or showed, and
/// the job and its runs as pg_cron has them.
#[derive(Serialize)]
struct Scheduled {
    action: &'static str,
    job_name: String,
    pg_cron_version: Option<String>,
    job: Option<CronJob>,
    runs: Vec<CronRun>,
    warnings: Vec<String>,
    #[serde(skip)]
    env: &'static str,
    #[serde(skip)]
    time_limit: std::time::Duration,
    #[serde(skip)]
    answer: CronAnswer,
    #[serde(skip)]
    now: chrono::DateTime<Utc>,
}

impl Report for Scheduled {
    fn outcome(&self) -> &str {
        "ok"
    }

    fn render(&self, _: Style) -> String {
        let (env, name) = (self.env, &self.job_name);
        let mut s = String::new();
        match (self.action, &self.job) {
            ("installed" | "updated", Some(job)) => {
                s.push_str(&format!(
                    "{} {name} in the {env} database (pg_cron job {}): {}, each run at most {}\n",
                    if self.action == "installed" {
                        "Scheduled"
                    } else {
                        "Updated the schedule of"
                    },
                    job.jobid,
                    every_text(&job.schedule),
                    humantime::format_duration(self.time_limit)
                ));
                s.push_str(&format!("  runs: {}\n", job.command));
                s.push_str(&format!(
                    "Each run counts the new rows in the database (the server-side engine); the first run, and \
                     rebuilds, stay with the CLI. Watch it with `usage-agg status --env {}` or `usage-agg schedule \
                     --show`.\n",
                    env.to_lowercase()
                ));
            }
            ("removed", Some(job)) => s.push_str(&format!(
                "Removed the schedule {name} from the {env} database (pg_cron job {}, {})\n",
                job.jobid,
                every_text(&job.schedule)
            )),
            ("none", _) => s.push_str(&format!(
                "No schedule to remove: the {env} database has no pg_cron job {name}\n"
            )),
            _ => s.push_str(&render(env, &self.answer, self.now)),
        }
        for w in &self.warnings {
            s.push_str(&format!("Note: {w}\n"));
        }
        s
    }
}

async fn act(
    args: &ScheduleArgs,
    store: &impl Store,
    env: &'static str,
) -> anyhow::Result<Scheduled> {
    let now = Utc::now();
    let mut warnings = Vec::new();
    let (action, answer) = if let Some(every) = &args.every {
        let answer = store
            .schedule(&every.cron, args.time_limit().as_secs())
            .await?
            .require_pg_cron()?;
        if answer.refused.as_deref() == Some("time_limit") {
            let t = answer.statement_timeout.clone().unwrap_or_default();
            return Err(crate::engine::UsageError(format!(
                "--time-limit {} is at or above the statement timeout the scheduled run runs under ({}; {}): \
                 the database would cancel a run that long midway; choose a --time-limit under it (the run \
                 keeps its own bound inside 80% of it), or raise the cron role's statement_timeout \
                 (ALTER ROLE postgres SET statement_timeout = '5min')",
                humantime::format_duration(args.time_limit()),
                humantime::format_duration(std::time::Duration::from_millis(t.ms)),
                t.source
            ))
            .into());
        }
        // Before the first run the cursor is not set, and a scheduled run
        // cannot do the first run's rebuild: say so now, not at 3 am.
        if store.installed().await? && store.state().await?.and_then(|s| s.cursor_id).is_none() {
            warnings.push(format!(
                "no run has counted anything yet: run `usage-agg aggregate --env {}` once (the first run \
                 rebuilds every key and reports drift, which only the CLI does); until then each scheduled run \
                 records needs_rebuild",
                env.to_lowercase()
            ));
        }
        let action = if answer.created == Some(false) {
            "updated"
        } else {
            "installed"
        };
        (action, answer)
    } else if args.remove {
        let answer = store.unschedule().await?.require_pg_cron()?;
        let action = if answer.removed == Some(true) {
            "removed"
        } else {
            "none"
        };
        (action, answer)
    } else {
        (
            "show",
            store.schedule_show(RUNS_SHOWN).await?.require_pg_cron()?,
        )
    };
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(Scheduled {
        action,
        job_name: job_name(),
        pg_cron_version: answer.version.clone(),
        job: answer.job.clone(),
        runs: answer.runs.clone(),
        warnings,
        env,
        time_limit: args.time_limit(),
        answer,
        now,
    })
}

/// "every 5 minutes (*/5 * * * *)", or the expression alone.
fn every_text(cron: &str) -> String {
    describe(cron).map_or_else(|| format!("on {cron}"), |d| format!("{d} ({cron})"))
}

/// `--show`: the job and its last runs.
fn render(env: &str, a: &CronAnswer, now: DateTime<Utc>) -> String {
    format!(
        "usage-agg schedule ({env})\n{}",
        crate::text_table::fields(&job_lines(a.job.as_ref(), &a.runs, now, true))
    )
}

/// The lines `--show` and `status` print about the job: (label with its
/// colon, or empty for a continuation, value).
pub(crate) fn job_lines(
    job: Option<&CronJob>,
    runs: &[CronRun],
    now: DateTime<Utc>,
    with_command: bool,
) -> Vec<(String, String)> {
    let Some(job) = job else {
        return vec![(
            "Schedule:".into(),
            "none in the database (pg_cron is enabled; `usage-agg schedule --every 5m` runs the job there)"
                .into(),
        )];
    };
    let mut lines = vec![(
        "Schedule:".to_string(),
        format!(
            "{}, pg_cron job {} {}{}",
            every_text(&job.schedule),
            job.jobid,
            job.jobname.as_deref().unwrap_or("(no name)"),
            if job.active {
                ""
            } else {
                ", INACTIVE (it does not run)"
            }
        ),
    )];
    if with_command {
        lines.push(("Command:".into(), job.command.clone()));
    }
    if runs.is_empty() {
        lines.push(("Cron runs:".into(), "none yet".into()));
    }
    for (i, r) in runs.iter().enumerate() {
        let label = if i == 0 { "Cron runs:" } else { "" };
        lines.push((label.into(), run_text(r, now)));
    }
    lines
}

/// One run: when, how it ended, how long, and why when it failed.
pub(crate) fn run_text(r: &CronRun, now: DateTime<Utc>) -> String {
    let took = match (
        r.start_time.as_deref().and_then(parse_time),
        r.end_time.as_deref().and_then(parse_time),
    ) {
        (Some(s), Some(e)) if e >= s => {
            format!(" in {:.1} s", (e - s).num_milliseconds() as f64 / 1000.0)
        }
        _ => String::new(),
    };
    let status = r.status.as_deref().unwrap_or("?");
    let why = match status {
        "failed" => r
            .return_message
            .as_deref()
            .map(first_line)
            .map_or(String::new(), |m| format!(": {m}")),
        _ => String::new(),
    };
    let alerts = match r.alerts_recorded {
        Some(n) if n > 0 => format!(
            "; {} recorded while it ran",
            crate::output::count(n as u64, "alert", "alerts")
        ),
        _ => String::new(),
    };
    format!(
        "{} {status}{took}{alerts}{why}",
        when(r.start_time.as_deref(), now)
    )
}

/// A failed run's message on one line, without PostgreSQL's "ERROR:  ".
fn first_line(m: &str) -> String {
    let line = m.lines().next().unwrap_or_default();
    let line = line.trim_start_matches("ERROR:").trim();
    if line.chars().count() > 300 {
        format!("{}...", line.chars().take(300).collect::<String>())
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shows_the_job_and_why_a_run_failed() {
        let now = parse_time("2026-12-01T10:05:01+00:00").unwrap();
        let job = CronJob {
            jobid: 3,
            jobname: Some("usage-agg-default".into()),
            schedule: "*/5 * * * *".into(),
            command: "CALL public.usage_agg_run_scheduled(50)".into(),
            active: true,
            username: Some("postgres".into()),
            database: Some("postgres".into()),
        };
        let runs = [
            CronRun {
                runid: 9,
                status: Some("failed".into()),
                return_message: Some(
                    "ERROR:  usage_agg_run_scheduled (refused): refused to count: the sequence ...\nDETAIL: {}"
                        .into(),
                ),
                start_time: Some("2026-12-01T10:05:00.01+00:00".into()),
                end_time: Some("2026-12-01T10:05:00.03+00:00".into()),
                alerts_recorded: Some(0),
            },
            CronRun {
                runid: 8,
                status: Some("succeeded".into()),
                return_message: Some("1 row".into()),
                start_time: Some("2026-12-01T10:00:00+00:00".into()),
                end_time: Some("2026-12-01T10:00:00.4+00:00".into()),
                alerts_recorded: Some(2),
            },
        ];
        let text = render(
            "PROD",
            &CronAnswer {
                pg_cron: true,
                job: Some(job),
                runs: runs.to_vec(),
                ..CronAnswer::default()
            },
            now,
        );
        for needle in [
            "Schedule:      every 5 minutes (*/5 * * * *), pg_cron job 3 usage-agg-default\n",
            "Command:       CALL public.usage_agg_run_scheduled(50)\n",
            "Cron runs:     2026-12-01 10:05:00 UTC (0 seconds ago) failed in 0.0 s: \
             usage_agg_run_scheduled (refused): refused to count: the sequence ...\n",
            "                 2026-12-01 10:00:00 UTC (5 minutes ago) succeeded in 0.4 s; 2 alerts recorded \
             while it ran\n",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        assert!(!text.contains("DETAIL"), "{text}");
    }
}
