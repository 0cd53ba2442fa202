//! `usage-agg doctor`: every check a new operator would otherwise make by
//! hand, one line each, pass or fail with the fix (as `brew doctor` and
//! `flutter doctor` do). Exit 0 only when all pass; otherwise the gravest
//! failure's status. Later checks that need an earlier one are skipped when
//! it fails, and say so.

use super::connect;
use crate::cli::DoctorArgs;
use crate::config::KeyKind;
use crate::exit::{self, Status};
use crate::migrations::{LATEST_MIGRATION, MIGRATIONS};
use crate::output::Style;
use crate::postgrest::Kind;
use crate::preflight;
use crate::printer::{Printer, Report};
use crate::schedule::CronAnswer;
use crate::state::owner_is_dead_here;
use crate::store::rest::RestStore;
use crate::store::Store;
use crate::text_table::{Align, Table, Width};

/// One check's result.
struct Check {
    name: &'static str,
    /// None: skipped, because a check it needs failed.
    pass: Option<bool>,
    detail: String,
    fix: Option<String>,
    status: Status,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            pass: Some(true),
            detail: detail.into(),
            fix: None,
            status: Status::Ok,
        }
    }

    fn fail(
        name: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
        status: Status,
    ) -> Check {
        Check {
            name,
            pass: Some(false),
            detail: detail.into(),
            fix: Some(fix.into()),
            status,
        }
    }

    fn from_error(name: &'static str, e: &anyhow::Error, config: &crate::config::Config) -> Check {
        Check::fail(
            name,
            format!("{e:#}"),
            exit::hint(e, Some(config)).unwrap_or_else(|| "see the message".into()),
            exit::classify(e),
        )
    }

    fn skipped(name: &'static str, because: &str) -> Check {
        Check {
            name,
            pass: None,
            detail: format!("not checked: {because}"),
            fix: None,
            status: Status::Ok,
        }
    }
}

pub async fn run(args: DoctorArgs) -> Status {
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => {
            let check = Check::fail(
                "configuration",
                format!("{e:#}"),
                "set the variable it names (README, \"Configuration\")",
                exit::classify(&e),
            );
            return finish(&args, None, vec![check]);
        }
    };
    let store = RestStore::new(client);
    let env = config.environment.upper();
    let mut checks = vec![Check::pass(
        "configuration",
        format!(
            "{env} ({}); URL from {} ({}); key from {} ({}), {}",
            config.chosen_by,
            config.url_var,
            config.url_from,
            config.key_var,
            config.key_from,
            match config.key_kind {
                KeyKind::Jwt => "a JWT",
                KeyKind::SecretKey => "an sb_secret_ key",
            }
        ),
    )];
    checks.extend(diagnose(&store, &config).await);
    finish(&args, Some(&config), checks)
}

/// The checks after the configuration, in the order they depend on each other.
async fn diagnose(store: &RestStore, config: &crate::config::Config) -> Vec<Check> {
    let mut out = Vec::new();
    // Reachability, TLS and the key: one read that needs all three.
    match store.newest_id().await {
        Ok(_) => {
            out.push(Check::pass(
                "reachability",
                format!(
                    "{} answers over {}",
                    config.rest_url,
                    config.rest_url.scheme()
                ),
            ));
            out.push(Check::pass(
                "key",
                "accepted, with the rights a run needs to read",
            ));
        }
        Err(e) => {
            let kind = exit::classify(&e);
            let (failed, skipped) = if kind == Status::NoPerm {
                ("key", "reachability")
            } else {
                ("reachability", "key")
            };
            if kind == Status::NoPerm {
                out.push(Check::pass(
                    "reachability",
                    format!("{} answers", config.rest_url),
                ));
            }
            out.push(Check::from_error(failed, &e, config));
            if kind != Status::NoPerm {
                out.push(Check::skipped(skipped, "the server could not be reached"));
            }
            for name in [
                "tables",
                "migrations",
                "unique key",
                "assumptions",
                "lease",
                "rejected rows",
                "last run",
                "schedule",
            ] {
                out.push(Check::skipped(name, "the server answered nothing usable"));
            }
            return out;
        }
    }
    let installed = match store.installed().await {
        Ok(i) => i,
        Err(e) => {
            out.push(Check::from_error("migrations", &e, config));
            return out;
        }
    };
    match store.probe(installed).await {
        Ok(()) => out.push(Check::pass(
            "tables",
            "usage_requests and portal_usage_monthly, with every column a run uses",
        )),
        Err(e) => out.push(Check::from_error("tables", &e, config)),
    }
    let facts = if !installed {
        out.push(Check::fail(
            "migrations",
            "not applied: every run recomputes every key from all rows, unguarded",
            format!(
                "apply {} (`usage-agg sql | psql`, or `supabase db push`)",
                MIGRATIONS
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
            Status::Config,
        ));
        None
    } else {
        match store.preflight().await {
            Ok(f) => {
                // The later migrations answer too: the schedule's functions
                // (they read the pg_cron job, which the last check shows),
                // the rejected-rows tally's columns, and the bound on
                // manual adjustments.
                let schedule = store.schedule_show(1).await;
                let tally = crate::state::rejected_tally_installed(store.client()).await;
                let rules = crate::state::adjust_rules_installed(store.client()).await;
                let dashboard = crate::dashboard::installed(store.client()).await;
                let gaps = crate::alerts::quota_gaps_installed(store.client()).await;
                let apply = |function: &str| {
                    format!(
                        "apply {} (`usage-agg sql | psql`, or `supabase db push`)",
                        crate::migrations::migration_defining(function)
                    )
                };
                out.push(match (&schedule, &tally, &rules, &dashboard) {
                    (Err(e), _, _, _) if crate::postgrest::kind_of(e) == Some(Kind::MissingFunction) => {
                        Check::from_error("migrations", e, config)
                    }
                    (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => {
                        Check::from_error("migrations", e, config)
                    }
                    _ if gaps.is_err() => Check::from_error(
                        "migrations",
                        gaps.as_ref().expect_err("an error"),
                        config,
                    ),
                    _ if f.lost_keys.is_none() => Check::fail(
                        "migrations",
                        "the rule book is missing: no engine can book rows without it",
                        apply("usage_agg_book"),
                        Status::Config,
                    ),
                    (_, Ok(false), _, _) => Check::fail(
                        "migrations",
                        "the rejected-rows tally is missing: runs cannot add their rejected rows to it",
                        apply("usage_agg_note_rejected"),
                        Status::Config,
                    ),
                    (_, _, Ok(false), _) => Check::fail(
                        "migrations",
                        "the rules of manual adjustments are missing: any client can book an adjustment of any \
                         amount, whose sums overflow, in a month no invoice shows",
                        apply("usage_agg_adjust_bound"),
                        Status::Config,
                    ),
                    (_, _, _, Ok(false)) => Check::fail(
                        "migrations",
                        "usage_portal_summary is missing: the app's usage page cannot read a portal in one call, \
                         and `report --html --portal` fails",
                        apply("usage_portal_summary"),
                        Status::Config,
                    ),
                    _ if matches!(gaps, Ok(false)) => Check::fail(
                        "migrations",
                        "the pending crossings are missing: a rebuild killed between its writes and the record of \
                         their quotas' crossings can lose an alert, and a dry run of a rebuild shows none",
                        apply("usage_agg_sweep_pending_crossings"),
                        Status::Config,
                    ),
                    _ => Check::pass(
                        "migrations",
                        format!(
                            "all {} applied (up to {LATEST_MIGRATION})",
                            MIGRATIONS.len()
                        ),
                    ),
                });
                Some((f, schedule))
            }
            Err(e) => {
                out.push(Check::from_error("migrations", &e, config));
                None
            }
        }
    };
    let Some((facts, schedule)) = facts else {
        for name in [
            "unique key",
            "assumptions",
            "lease",
            "rejected rows",
            "last run",
            "schedule",
            "table owners",
            "row level security",
            "grants",
            "statement timeout",
            "alerts",
        ] {
            out.push(Check::skipped(name, "the migrations are not all applied"));
        }
        return out;
    };
    out.push(match facts.unique_key {
        Some(false) => Check::fail(
            "unique key",
            "portal_usage_monthly has no UNIQUE(portal_id, month_year): every key is written one by one",
            "ALTER TABLE public.portal_usage_monthly ADD UNIQUE (portal_id, month_year)",
            Status::Config,
        ),
        _ => Check::pass("unique key", "UNIQUE(portal_id, month_year): bulk upserts"),
    });
    let problems = preflight::problems(&facts);
    out.push(if problems.is_empty() {
        Check::pass(
            "assumptions",
            format!(
                "ids from {} (CACHE 1), never behind the cursor",
                facts.sequence.as_deref().unwrap_or("the sequence")
            ),
        )
    } else {
        let refused = preflight::Refused(problems);
        Check::fail(
            "assumptions",
            refused.to_string().replace("refused to count: ", ""),
            "the repair each problem names",
            Status::from(refused.kind()),
        )
    });
    match store.state().await {
        Ok(Some(s)) => {
            let lease = match &s.lease_owner {
                None => "free".to_string(),
                Some(o) if owner_is_dead_here(o) => {
                    format!("stale: held by {o}, whose process is gone")
                }
                Some(o) => format!(
                    "held by {o} until {}",
                    s.lease_expires_at.as_deref().unwrap_or("?")
                ),
            };
            out.push(Check::pass("lease", lease));
            out.push(match s.rejected_rows.filter(|n| *n > 0) {
                None => Check::pass("rejected rows", "none so far"),
                Some(n) => Check::fail(
                    "rejected rows",
                    format!(
                        "{} as bad data so far (first ids {})",
                        crate::output::count(n as u64, "row", "rows"),
                        s.rejected_ids
                            .clone()
                            .unwrap_or_default()
                            .iter()
                            .map(i64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "fix or delete them (`usage-agg verify` lists them with the reason); they are counted nowhere",
                    Status::DataErr,
                ),
            });
            let outcome = s.last_run_outcome.as_deref();
            out.push(match outcome {
                None => Check::pass("last run", "none yet"),
                Some("ok" | "bad_rows" | "stopped") => Check::pass(
                    "last run",
                    format!(
                        "{}, ended {}",
                        outcome.unwrap_or_default(),
                        s.last_run_finished_at.as_deref().unwrap_or("?")
                    ),
                ),
                Some(o) => Check::fail(
                    "last run",
                    format!(
                        "{o}, ended {}{}",
                        s.last_run_finished_at.as_deref().unwrap_or("?"),
                        s.last_run_by
                            .as_deref()
                            .map_or(String::new(), |by| format!(", by {by}"))
                    ),
                    match o {
                        // Recorded by scheduled runs (README, "Run it without a cron host").
                        "needs_rebuild" => "run `usage-agg aggregate` once: the first run rebuilds every key and \
                                            reports drift, which only the CLI does; the scheduled runs go on \
                                            from there"
                            .to_string(),
                        "refused" => "the assumptions check above names what is broken and its repair".into(),
                        _ => "run `usage-agg status` and `usage-agg verify` for the keys involved".into(),
                    },
                    Status::DataErr,
                ),
            });
        }
        Ok(None) => {
            out.push(Check::pass("lease", "free (no run yet)"));
            out.push(Check::pass("rejected rows", "none so far"));
            out.push(Check::pass("last run", "none yet"));
        }
        Err(e) => out.push(Check::from_error("lease", &e, config)),
    }
    let time_limit = schedule
        .as_ref()
        .ok()
        .and_then(|a| a.job.as_ref())
        .and_then(|j| scheduled_time_limit(&j.command));
    out.push(schedule_check(schedule, config));
    out.extend(supabase_checks(store, time_limit, config).await);
    out.push(alerts_check(store.client(), config).await);
    if facts.refused_keys > 0 {
        let standing = crate::output::Standing::of(&facts);
        out.push(Check::fail(
            "refused keys",
            format!(
                "{} ({})",
                standing.what(),
                facts.refused_examples.join(", ")
            ),
            standing.repair(),
            Status::DataErr,
        ));
    }
    out
}

/// The quotas' alerts (docs/quotas.md): the migration that records them,
/// and whether any waits for delivery.
async fn alerts_check(client: &crate::postgrest::Client, config: &crate::config::Config) -> Check {
    match crate::alerts::status(client).await {
        Err(e) => Check::from_error("alerts", &e, config),
        Ok(None) => Check::fail(
            "alerts",
            "the quotas migration is missing: no quota can be set and no alert is recorded",
            format!(
                "apply {} (`usage-agg sql | psql`, or `supabase db push`)",
                crate::migrations::migration_defining("usage_quota_status")
            ),
            Status::Config,
        ),
        Ok(Some(a)) if a.quotas == 0 && a.alerts == 0 => {
            Check::pass("alerts", "no quota set, so no alert fires")
        }
        Ok(Some(a)) if a.undelivered == 0 => Check::pass(
            "alerts",
            crate::commands::status::alerts_line(&a),
        ),
        Ok(Some(a)) => Check::fail(
            "alerts",
            crate::commands::status::alerts_line(&a),
            format!(
                "`usage-agg alerts deliver` (with {} and {} set), or `aggregate --deliver-alerts` in cron; `usage-agg alerts list --undelivered` shows each with its last error",
                crate::config::ALERTS_WEBHOOK_URL,
                crate::config::ALERTS_WEBHOOK_SECRET
            ),
            Status::TempFail,
        ),
    }
}

/// The job scheduled in the database: optional, so none (or no pg_cron)
/// passes; a job that does not run, or whose last run failed, does not.
/// The time limit a scheduled job's command gives its run
/// (`CALL public.usage_agg_run_scheduled(50)`), in seconds.
fn scheduled_time_limit(command: &str) -> Option<u64> {
    let rest = command.split("usage_agg_run_scheduled(").nth(1)?;
    rest.split([')', ',']).next()?.trim().parse().ok()
}

/// What a Supabase project sets up around the migrations (issue 18): the
/// owners of the seed's tables, row level security on them, grants no
/// wider than the migrations leave, and the statement timeouts a run lives
/// under.
async fn supabase_checks(
    store: &RestStore,
    time_limit: Option<u64>,
    config: &crate::config::Config,
) -> Vec<Check> {
    let f = match crate::state::supabase_facts(store.client()).await {
        Ok(f) => f,
        Err(e) => {
            return [
                "table owners",
                "row level security",
                "grants",
                "statement timeout",
            ]
            .into_iter()
            .map(|name| Check::from_error(name, &e, config))
            .collect()
        }
    };
    let mut out = Vec::new();
    let owner = f.migrations_owner.clone().unwrap_or_default();
    let strangers: Vec<(&String, &String)> = f
        .table_owners
        .iter()
        .filter(|(_, o)| **o != owner)
        .collect();
    out.push(if strangers.is_empty() {
        Check::pass("table owners", format!("the seed's tables and the migrations: {owner}"))
    } else {
        Check::fail(
            "table owners",
            format!(
                "{}, not {owner}, which runs the migrations (a table Studio made as supabase_admin): a later \
                 migration altering it stops at `must be owner of table`",
                strangers
                    .iter()
                    .map(|(t, o)| format!("{t} is owned by {o}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "as supabase_admin (self-hosted: connect as it; hosted: ask support): {}",
                strangers
                    .iter()
                    .map(|(t, _)| format!("ALTER TABLE public.{t} OWNER TO {owner};"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Status::Config,
        )
    });
    let off: Vec<&String> = f
        .rls
        .iter()
        .filter(|(_, on)| !**on)
        .map(|(t, _)| t)
        .collect();
    out.push(if off.is_empty() && f.open_policies.is_empty() {
        Check::pass(
            "row level security",
            "on for both seed tables, with no policy for the API's roles",
        )
    } else if !off.is_empty() {
        Check::fail(
            "row level security",
            format!(
                "off on {}: with Supabase's default grants, the anon key reads and writes it",
                off.iter()
                    .map(|t| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            off.iter()
                .map(|t| format!("ALTER TABLE public.{t} ENABLE ROW LEVEL SECURITY;"))
                .collect::<Vec<_>>()
                .join(" "),
            Status::Config,
        )
    } else {
        Check::fail(
            "row level security",
            format!(
                "policies open the seed tables to anon or authenticated: {}",
                f.open_policies.join(", ")
            ),
            "drop them, or make sure they allow only what the app means (the totals are billing's)",
            Status::Config,
        )
    });
    out.push(if f.grant_leaks.is_empty() {
        Check::pass(
            "grants",
            "no role may write the job's state or run its functions but service_role",
        )
    } else {
        Check::fail(
            "grants",
            f.grant_leaks.join("; "),
            format!(
                "apply {} again (it revokes the default grants, then grants what each role needs)",
                crate::migrations::migration_defining("usage_agg_supabase_facts")
            ),
            Status::Config,
        )
    });
    let cron = f.cron_statement_timeout.unwrap_or_default();
    let api = f.api_statement_timeout.as_deref().unwrap_or("none set");
    let figures = format!(
        "API requests: {api} (PostgREST's role); scheduled runs: {} ms ({})",
        cron.ms, cron.source
    );
    out.push(match time_limit {
        Some(limit) if cron.ms > 0 && limit * 1000 >= cron.ms => Check::fail(
            "statement timeout",
            format!("the scheduled job's time limit ({limit} s) is at or above it: {figures}"),
            "`usage-agg schedule --every ... --time-limit` under it (the run keeps inside 80% of it anyway)",
            Status::Config,
        ),
        _ => Check::pass("statement timeout", figures),
    });
    out
}

fn schedule_check(schedule: anyhow::Result<CronAnswer>, config: &crate::config::Config) -> Check {
    const NAME: &str = "schedule";
    let answer = match schedule {
        Ok(a) => a,
        Err(e) if crate::postgrest::kind_of(&e) == Some(Kind::MissingFunction) => {
            return Check::skipped(NAME, "the migration that reads it is not applied");
        }
        Err(e) => return Check::from_error(NAME, &e, config),
    };
    if !answer.pg_cron {
        return Check::pass(
            NAME,
            "none in the database: pg_cron is not enabled there (optional: runs come from a cron host; \
             `usage-agg schedule` needs pg_cron)",
        );
    }
    let Some(job) = answer.job else {
        return Check::pass(
            NAME,
            format!(
                "none in the database (pg_cron {} is enabled: runs come from elsewhere, or `usage-agg schedule \
                 --every 5m`)",
                answer.version.as_deref().unwrap_or("?")
            ),
        );
    };
    let every =
        crate::schedule::describe(&job.schedule).unwrap_or_else(|| format!("on {}", job.schedule));
    let what = format!(
        "{} {every} ({}), pg_cron job {}",
        job.jobname.as_deref().unwrap_or("?"),
        job.schedule,
        job.jobid
    );
    if !job.active {
        return Check::fail(
            NAME,
            format!("{what} is inactive: it does not run"),
            format!(
                "SELECT cron.alter_job({}, active := true); or `usage-agg schedule --remove` if it should not run",
                job.jobid
            ),
            Status::Config,
        );
    }
    match answer.runs.first() {
        Some(r) if r.status.as_deref() == Some("failed") => Check::fail(
            NAME,
            format!(
                "{what}; its last run, {}, failed: {}",
                r.start_time.as_deref().unwrap_or("?"),
                r.return_message
                    .as_deref()
                    .and_then(|m| m.lines().next())
                    .unwrap_or("?")
                    .trim_start_matches("ERROR:")
                    .trim()
            ),
            "the message names the repair; `usage-agg schedule --show` lists the last runs",
            Status::DataErr,
        ),
        Some(r) => Check::pass(
            NAME,
            format!(
                "{what}; last run {} {}",
                r.start_time.as_deref().unwrap_or("?"),
                r.status.as_deref().unwrap_or("?")
            ),
        ),
        None => Check::pass(NAME, format!("{what}; no run yet")),
    }
}

/// Prints the checks (or the JSON) and returns the gravest status.
fn finish(args: &DoctorArgs, config: Option<&crate::config::Config>, checks: Vec<Check>) -> Status {
    let printer = Printer::new("doctor", &args.output);
    let printer = match config {
        Some(c) => printer.against(c),
        None => printer,
    };
    printer.report(&Diagnosis { checks })
}

/// Every check `doctor` made, and the gravest status among the failed.
struct Diagnosis {
    checks: Vec<Check>,
}

impl Diagnosis {
    fn failed(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| c.pass == Some(false))
            .collect()
    }
}

impl serde::Serialize for Diagnosis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct CheckJson<'a> {
            name: &'a str,
            result: &'a str,
            detail: &'a str,
            fix: Option<&'a str>,
        }
        #[derive(serde::Serialize)]
        struct DiagnosisJson<'a> {
            checks: Vec<CheckJson<'a>>,
        }
        DiagnosisJson {
            checks: self
                .checks
                .iter()
                .map(|c| CheckJson {
                    name: c.name,
                    result: match c.pass {
                        Some(true) => "pass",
                        Some(false) => "fail",
                        None => "skipped",
                    },
                    detail: &c.detail,
                    fix: c.fix.as_deref(),
                })
                .collect(),
        }
        .serialize(s)
    }
}

impl Report for Diagnosis {
    fn quiet_note(&self) -> Option<String> {
        let failed = self.failed();
        (!failed.is_empty()).then(|| {
            failed
                .iter()
                .map(|c| format!("{} failed: {}", c.name, c.detail.replace('\n', "; ")))
                .collect::<Vec<_>>()
                .join("\nusage-agg: ")
        })
    }

    fn outcome(&self) -> &str {
        if self.failed().is_empty() {
            "ok"
        } else {
            "failed"
        }
    }

    fn status(&self) -> Status {
        let failed = self.failed();
        // The order of precedence: configuration and the key before the data.
        [
            Status::Config,
            Status::NoPerm,
            Status::Unavailable,
            Status::DataErr,
            Status::Software,
        ]
        .into_iter()
        .find(|s| failed.iter().any(|c| c.status == *s))
        .or_else(|| failed.first().map(|c| c.status))
        .unwrap_or(Status::Ok)
    }

    fn render(&self, style: Style) -> String {
        use std::fmt::Write as _;
        // The names' column fits the longest; a detail of several lines
        // goes on under its first, as the plain marks (four wide) place it.
        let width = self
            .checks
            .iter()
            .map(|c| c.name.chars().count())
            .max()
            .unwrap_or(0);
        let indent = " ".repeat(5 + width + 1);
        let mut t = Table::new("", " ")
            .column(Align::Left, Width::AtLeast(0))
            .column(Align::Left, Width::AtLeast(width))
            .column(Align::Left, Width::Fit);
        for c in &self.checks {
            let mark = match (c.pass, style.emoji) {
                (Some(true), true) => "✅",
                (Some(false), true) => "❌",
                (None, true) => "➖",
                (Some(true), false) => "ok  ",
                (Some(false), false) => "FAIL",
                (None, false) => "skip",
            };
            t.row([
                mark,
                c.name,
                &c.detail.replace('\n', &format!("\n{indent}")),
            ]);
            if let Some(fix) = &c.fix {
                t.row(["    ", "", &format!("fix: {fix}")]);
            }
        }
        let mut s = t.render();
        let failed = self.failed();
        if failed.is_empty() {
            s.push_str("All checks passed.\n");
        } else {
            let _ = writeln!(
                s,
                "{} failed (exit status {}).",
                crate::output::count(failed.len() as u64, "check", "checks"),
                self.status().code()
            );
        }
        s
    }
}
