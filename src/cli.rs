//! The command line. One subcommand a file under `commands/`.

use clap::{Args, Parser, Subcommand};

use std::time::Duration;

use crate::aggregation::Month;
use crate::config::EnvChoice;
use crate::engine::{Engine, DEFAULT_REST_BATCH_IDS};
use crate::periods::DEFAULT_PRUNE_BATCH_IDS;

/// Rolls usage_requests up into portal_usage_monthly over Supabase's REST
/// API (PostgREST): every row counted exactly once, safe to rerun.
#[derive(Debug, Parser)]
#[command(
    name = "usage-agg",
    version,
    about,
    long_about = None,
    after_help = crate::exit::help_summary()
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,

    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes, before or after its name. Everything
/// else belongs to the subcommands that honour it.
#[derive(Debug, Args)]
pub struct Global {
    /// How logs are written on stderr
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The environment variables every connecting subcommand reads, for the
/// end of its `--help` (one text, kept beside the options it explains).
macro_rules! environment_help {
    () => {
        "Environment (also from ./.env.local, ./.env or --env-file; a real variable wins):
  SUPABASE_DEV_URL, SUPABASE_PROD_URL
      the project URL, https://<ref>.supabase.co
  SUPABASE_DEV_SERVICE_ROLE_KEY, SUPABASE_PROD_SERVICE_ROLE_KEY
      the service_role key (a JWT, or an sb_secret_ key)
  SUPABASE_DEV_REST_URL, SUPABASE_PROD_REST_URL
      optional: a PostgREST root instead of <URL>/rest/v1
  APP_ENV, NODE_ENV
      with --env auto: production or prod chooses PROD
  USAGE_AGG_PING_URL, USAGE_AGG_METRICS_FILE
      aggregate's --ping-url and --metrics-file
  USAGE_AGG_ALERTS_WEBHOOK_URL, USAGE_AGG_ALERTS_WEBHOOK_SECRET
      where alerts are posted, and the whsec_ secret that signs them
  USAGE_AGG_ALLOW_INSECURE_HTTP=1
      allow http:// to a host that is not this machine

README.md: \"Configuration\", \"Exit statuses\", \"Operating it\"."
    };
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Aggregate new usage_requests rows into portal_usage_monthly
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg aggregate --env prod                 count new rows (what cron runs)
  usage-agg aggregate --env dev --dry-run        preview, write nothing
  usage-agg aggregate --env prod --engine rpc    aggregate in the database, batch by batch
  usage-agg aggregate --env prod --full          recompute every key; report drift
  usage-agg aggregate --env prod --month 2025-07 --allow-decrease
  usage-agg aggregate --env prod --rebase        after the id sequence moved back\n\n",
        environment_help!()
    ))]
    Aggregate(AggregateArgs),
    /// Recompute from raw rows and compare with portal_usage_monthly; write nothing
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg verify --env prod                    every key against its raw rows (reads all of them)
  usage-agg verify --env prod --month 2025-07 --json\n\n",
        environment_help!()
    ))]
    Verify(VerifyArgs),
    /// Show the job's state: cursor, backlog, lease, last run; a cron health check with --max-age
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg status --env prod
  usage-agg status --env prod --max-age 3h --quiet    a health check: exit 75 when stale\n\n",
        environment_help!()
    ))]
    Status(StatusArgs),
    /// Show usage from portal_usage_monthly: one portal's months as a chart, or the top portals of a month;
    /// or write both as one HTML file (--html)
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg report --env prod                    the top portals of the newest month
  usage-agg report --env prod --portal 12345     its last 12 months as bars (successes, errors)
  usage-agg report --env prod --portal 12345 --months 6 --month 2025-07
  usage-agg report --env prod --month 2025-07 --top 50 --format csv
  usage-agg report --env prod --portal 12345 --html portal.html
  usage-agg report --env prod --html usage.html --force

Bars: UTF-8 blocks where the locale is UTF-8; plain ASCII otherwise, or with NO_COLOR set;
none with --json or --format csv. The HTML report and usage_portal_summary: docs/dashboard.md.\n\n",
        environment_help!()
    ))]
    Report(ReportArgs),
    /// Print the migration SQL (to paste into Supabase's SQL editor)
    #[command(
        after_long_help = "Examples:\n  usage-agg sql | psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1\n  usage-agg sql > migrations.sql   (paste into Supabase's SQL editor)"
    )]
    Sql,
    /// Close a billing month: catch up, check its keys against their raw rows, record it closed with a snapshot
    Close(CloseArgs),
    /// Reopen a closed month, recorded with who, when and why
    Reopen(ReopenArgs),
    /// Book a signed manual correction, with its reason, once per idempotency key
    Adjust(AdjustArgs),
    /// Delete the raw rows of closed months (their totals stay checkable), in resumable batches
    Prune(PruneArgs),
    /// Check everything a run needs, one line each, with the fix: configuration, reachability, the key,
    /// the tables, the migrations, the unique key, the assumptions, the lease, the last run, the schedule
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg doctor --env prod
  usage-agg doctor --env dev --json\n\n",
        environment_help!()
    ))]
    Doctor(DoctorArgs),
    /// Run the job in the database with pg_cron (Supabase Cron), with no cron host: install or update the
    /// schedule (--every), remove it (--remove), or show it with its last runs (--show)
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg schedule --env prod --every 5m       run it in the database every 5 minutes (pg_cron)
  usage-agg schedule --env prod --every 1h --time-limit 5m
  usage-agg schedule --env prod --show           the job and its last runs
  usage-agg schedule --env prod --remove

README.md: \"Run it without a cron host\".\n\n",
        environment_help!()
    ))]
    Schedule(ScheduleArgs),
    /// Set and show the monthly request limits of portals and of the default plan, and the thresholds (percent
    /// of the limit) at which an alert fires
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg quota set --env prod --default --limit 10000            every portal without its own: 80% and 100%
  usage-agg quota set --env prod --portal 42 --limit 250000 --thresholds 50,80,100,150
  usage-agg quota show --env prod
  usage-agg quota show --env prod --portal 42     its month so far: used, limit, percent, projection

docs/quotas.md.\n\n",
        environment_help!()
    ))]
    Quota(QuotaArgs),
    /// List the alerts the quotas' thresholds fired (once per portal, month, threshold and limit), and deliver
    /// them to the webhook, signed (Standard Webhooks)
    #[command(after_long_help = concat!(
        "Examples:
  usage-agg alerts list --env prod --undelivered
  usage-agg alerts deliver --env prod             post each undelivered alert, signed; retried with backoff

docs/quotas.md.\n\n",
        environment_help!()
    ))]
    Alerts(AlertsArgs),
}

#[derive(Debug, Args)]
pub struct QuotaArgs {
    #[command(subcommand)]
    pub action: QuotaAction,
}

#[derive(Debug, Subcommand)]
pub enum QuotaAction {
    /// Set a portal's quota (--portal) or the default plan's (--default); it applies from the next booking,
    /// where a threshold the month has already reached fires
    Set(QuotaSetArgs),
    /// Show the quotas; with --portal, that portal's month against its quota
    Show(QuotaShowArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("whose").required(true).args(["portal", "default"])))]
pub struct QuotaSetArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// The portal whose quota this is
    #[arg(long, value_parser = portal_id, allow_hyphen_values = true)]
    pub portal: Option<i64>,

    /// The default plan: every portal without a quota of its own
    #[arg(long)]
    pub default: bool,

    /// Requests a month, 1 or more
    #[arg(long, value_parser = quota_limit, allow_hyphen_values = true)]
    pub limit: i64,

    /// Percentages of the limit at which an alert fires, ascending, each from 1 to 1000
    // allow_hyphen_values: `--thresholds -5` is a bad threshold, refused
    // by its own message, not an unknown flag.
    #[arg(
        long,
        value_parser = thresholds,
        default_value = "80,100",
        value_name = "PERCENTS",
        allow_hyphen_values = true
    )]
    pub thresholds: Thresholds,

    /// With --portal: set it even though the portal has no usage yet (its first request is still to come)
    // conflicts_with: `requires` alone let `--default --new-portal` through
    // (the group names --portal), and the flag did nothing there.
    #[arg(long, requires = "portal", conflicts_with = "default")]
    pub new_portal: bool,
}

#[derive(Debug, Args)]
pub struct QuotaShowArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// One portal: its quota and its month against it (used right now, percent, projection, alerts fired)
    #[arg(long, value_parser = portal_id, allow_hyphen_values = true)]
    pub portal: Option<i64>,

    /// With --portal: this month (YYYY-MM) [default: the current month]
    #[arg(long, value_parser = month, requires = "portal")]
    pub month: Option<Month>,
}

/// A quota's thresholds, as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds(pub Vec<u32>);

#[derive(Debug, Args)]
pub struct AlertsArgs {
    #[command(subcommand)]
    pub action: AlertsAction,
}

#[derive(Debug, Subcommand)]
pub enum AlertsAction {
    /// List the alerts, oldest first
    List(AlertsListArgs),
    /// Post each undelivered alert to USAGE_AGG_ALERTS_WEBHOOK_URL, signed with
    /// USAGE_AGG_ALERTS_WEBHOOK_SECRET (Standard Webhooks), at least once: the webhook-id stays the same
    /// across attempts, so a receiver that dedups by it processes each alert once
    Deliver(AlertsDeliverArgs),
}

#[derive(Debug, Args)]
pub struct AlertsListArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// Only the alerts not yet delivered
    #[arg(long)]
    pub undelivered: bool,

    /// Only this portal's
    #[arg(long, value_parser = portal_id, allow_hyphen_values = true)]
    pub portal: Option<i64>,

    /// Only this month's (YYYY-MM)
    #[arg(long, value_parser = month)]
    pub month: Option<Month>,
}

#[derive(Debug, Args)]
pub struct AlertsDeliverArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    #[command(flatten)]
    pub delivery: Delivery,
}

/// How alerts are posted: `alerts deliver`, and `aggregate --deliver-alerts`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Delivery")]
pub struct Delivery {
    /// Attempts per alert in this run; an alert still undelivered after them waits for the next run, and so
    /// do the alerts after it
    #[arg(long, default_value_t = DEFAULT_DELIVERY_ATTEMPTS, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub attempts: u32,

    /// How long one attempt may take before it counts as failed
    #[arg(long, default_value = "10s", value_parser = request_timeout, value_name = "DURATION")]
    pub attempt_timeout: std::time::Duration,

    /// The wait before the second attempt; each wait after it is twice the one before (with jitter), at most
    /// 10m. A 429 or 503 answer with Retry-After waits at least what it asks, at most 10m too
    #[arg(long, default_value = "1s", value_parser = retry_delay, value_name = "DURATION")]
    pub retry_delay: std::time::Duration,
}

/// Attempts per alert in one delivery run.
pub const DEFAULT_DELIVERY_ATTEMPTS: u32 = 4;

impl Delivery {
    /// `alerts deliver`'s defaults: what `aggregate --deliver-alerts` uses.
    pub fn defaults() -> Delivery {
        match Cli::try_parse_from(["usage-agg", "alerts", "deliver"]) {
            Ok(Cli {
                command:
                    Command::Alerts(AlertsArgs {
                        action: AlertsAction::Deliver(a),
                    }),
                ..
            }) => a.delivery,
            other => unreachable!("`alerts deliver` alone parses: {other:?}"),
        }
    }
}

fn portal_id(s: &str) -> Result<i64, String> {
    match s.trim().parse::<i64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{s:?} is not a portal id: expected a whole number, 1 or more"
        )),
    }
}

fn quota_limit(s: &str) -> Result<i64, String> {
    crate::quota::parse_limit(s)
}

fn thresholds(s: &str) -> Result<Thresholds, String> {
    crate::quota::parse_thresholds(s).map(Thresholds)
}

/// A wait between attempts: 0s to 10m.
fn retry_delay(s: &str) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if d > std::time::Duration::from_secs(600) {
        return Err(format!("{s:?} is out of range: from 0s to 10m"));
    }
    Ok(d)
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true).args(["every", "remove", "show"])))]
pub struct ScheduleArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// Install or update the pg_cron job `usage-agg-default` to run the job in the database this often:
    /// 1m, 5m, 15m, 1h, 1d, ... (an interval cron keeps evenly: minutes dividing the hour, hours dividing
    /// the day)
    #[arg(long, value_parser = every, value_name = "INTERVAL", help_heading = "Schedule")]
    pub every: Option<crate::schedule::Every>,

    /// With --every: how long each scheduled run may count before it leaves the rest to the next run
    /// (checked between batches); shorter than the interval [default: 50s]
    #[arg(long, conflicts_with_all = ["remove", "show"], value_parser = time_limit, value_name = "DURATION", help_heading = "Schedule")]
    pub time_limit: Option<std::time::Duration>,

    /// Remove the pg_cron job (nothing to do when there is none)
    #[arg(long, help_heading = "Schedule")]
    pub remove: bool,

    /// Show the pg_cron job and its last runs (from cron.job_run_details)
    #[arg(long, help_heading = "Schedule")]
    pub show: bool,
}

impl ScheduleArgs {
    /// Each scheduled run's time bound: `--time-limit`, else 50 s.
    pub fn time_limit(&self) -> std::time::Duration {
        self.time_limit
            .unwrap_or(crate::schedule::DEFAULT_TIME_LIMIT)
    }

    /// A run that may last longer than the interval would still be running
    /// when the next is due (pg_cron then holds that one back).
    fn check(&self) -> Result<(), clap::Error> {
        let Some(every) = &self.every else {
            return Ok(());
        };
        if self.time_limit() < every.interval {
            return Ok(());
        }
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let sub = cmd
            .find_subcommand_mut("schedule")
            .expect("schedule is a subcommand");
        Err(sub.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "--time-limit {} is not shorter than --every {}: each run must end before the next is due",
                humantime::format_duration(self.time_limit()),
                humantime::format_duration(every.interval)
            ),
        ))
    }
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,
}

impl Cli {
    /// Parses the command line as [`clap::Parser::try_parse`] does, then
    /// refuses the combinations clap's rules cannot express, with the same
    /// kind of error (exit 64).
    pub fn try_parse_checked() -> Result<Cli, clap::Error> {
        Self::try_parse_checked_from(std::env::args_os())
    }

    /// [`Cli::try_parse_checked`] over given arguments (the first is the
    /// program name).
    pub fn try_parse_checked_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let cli = Cli::try_parse_from(args)?;
        match &cli.command {
            Command::Aggregate(a) => a.check()?,
            Command::Schedule(a) => a.check()?,
            _ => {}
        }
        Ok(cli)
    }
}

/// What a subcommand prints on stdout.
#[derive(Debug, Args)]
#[command(next_help_heading = "Output")]
pub struct Output {
    /// Print the result as one JSON object on stdout instead of the text (README, "Output for scripts and monitors")
    #[arg(long)]
    pub json: bool,

    /// Nothing on stdout (no summary, no progress bar), the same exit status; warnings and errors still go to stderr
    #[arg(long, short, conflicts_with = "json")]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// healthchecks.io-style URL for this health check: GET <URL>/start before, POST <URL>/<exit status> after
    /// with the JSON status (not read from USAGE_AGG_PING_URL, which is aggregate's check)
    #[arg(long, value_name = "URL")]
    pub ping_url: Option<String>,

    /// Exit 75 when the last successful run is older than this (e.g. 90m, 2h, 1d)
    #[arg(long, value_parser = duration, value_name = "AGE")]
    pub max_age: Option<std::time::Duration>,

    /// Write what status found as Prometheus metrics (usage_agg_status_*) to this file for node_exporter's
    /// textfile collector, after every check (not read from USAGE_AGG_METRICS_FILE, which is aggregate's file)
    #[arg(long, value_name = "PATH")]
    pub metrics_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
// --months needs a window: one portal's (--portal), or the HTML report's.
#[command(group(clap::ArgGroup::new("window").multiple(true).args(["portal", "html"])))]
pub struct ReportArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// One portal's usage, month by month: every month of the window, as a bar chart in a table
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub portal: Option<i64>,

    /// How many months: with --portal, the window's length; with --html, the totals' too
    #[arg(long, default_value_t = 12, requires = "window", value_parser = clap::value_parser!(u16).range(1..=240))]
    pub months: u16,

    /// The top portals' month (default: the newest month in the table); with --portal, the window's last
    /// month (default: the current month, by the database's clock)
    #[arg(long, value_parser = month)]
    pub month: Option<Month>,

    /// How many portals in the top list, and in the HTML report's highest error rates (not with --portal)
    #[arg(long, default_value_t = 10, conflicts_with = "portal", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,

    /// With --portal: its current month right now (stored totals, late adjustments and the rows no run has
    /// counted yet), exact between runs
    #[arg(long, requires = "portal", conflicts_with_all = ["months", "month", "html"])]
    pub live: bool,

    /// Output format (--json is --format json)
    #[arg(long, value_enum, default_value = "table", conflicts_with_all = ["json", "quiet", "html"])]
    pub format: ReportFormat,

    /// Write the report as one self-contained HTML file (inline SVG charts with their tables, light and dark,
    /// nothing fetched): with --portal, its trend, error rate and month to date; without, every portal
    #[arg(long, value_name = "FILE", help_heading = "HTML report")]
    pub html: Option<std::path::PathBuf>,

    /// With --html: replace FILE if it exists (never otherwise)
    #[arg(long, requires = "html", help_heading = "HTML report")]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

/// Where to connect, and how hard to try: every subcommand that talks to
/// the server.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct Connection {
    /// Which project: dev, prod, or auto (prod when APP_ENV, else NODE_ENV, is production or prod)
    #[arg(long, value_enum, default_value = "auto", ignore_case = true)]
    pub env: EnvChoice,

    /// Read the configuration from this file instead of ./.env.local and ./.env (the environment still wins)
    #[arg(long, value_name = "PATH")]
    pub env_file: Option<std::path::PathBuf>,

    /// How long a single request may take before it is abandoned (and tried again): 60s, 2m, ...
    #[arg(long, default_value = "60s", value_parser = request_timeout, value_name = "DURATION")]
    pub timeout: std::time::Duration,

    /// Tries again after a transient failure (network, 502/503/504, ...) at most this many times per request
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(0..=100))]
    pub max_retries: u16,

    /// How long the whole run may take (5m, 1h30m); past it, no request is started or retried (exit 75)
    #[arg(long, value_parser = run_deadline, value_name = "DURATION")]
    pub deadline: Option<std::time::Duration>,
}

/// How raw rows are read: the subcommands that page through them
/// (`aggregate`, `verify`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Reading rows")]
pub struct Scan {
    /// Rows asked for per page (the server may cap it lower, which is fine)
    #[arg(long, default_value_t = crate::engine::DEFAULT_PAGE_SIZE, value_parser = page_size)]
    pub page_size: usize,

    /// Id ranges scanned at once, at most (the server answers requests in parallel). Unless --aggressive,
    /// a scan starts with one request in flight and adds more only while the server's latency stays low
    #[arg(long, default_value_t = crate::pace::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub concurrency: u16,

    /// Read at most this many rows a second, over the whole run (a ceiling on the load, for busy hours;
    /// with --engine rpc, by resting between batches)
    #[arg(long, value_name = "ROWS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_rows_per_second: Option<u64>,

    /// Lift the good-neighbour limits, for a catch-up at night: all --concurrency requests in flight from
    /// the start, whatever the latency, and no rest between server-side batches
    #[arg(long, conflicts_with = "max_rows_per_second")]
    pub aggressive: bool,
}

impl Scan {
    /// The pace these flags ask for; `batch_pause` as `--batch-pause` gave it.
    pub fn pace(&self, batch_pause: Option<std::time::Duration>) -> crate::pace::PaceSettings {
        let concurrency = usize::from(self.concurrency);
        if self.aggressive {
            return crate::pace::PaceSettings::flat_out(concurrency);
        }
        crate::pace::PaceSettings {
            max_rows_per_second: self.max_rows_per_second,
            batch_pause,
            ..crate::pace::PaceSettings::neighbourly(concurrency)
        }
    }
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("rebuild").args(["full", "month"])))]
pub struct AggregateArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub scan: Scan,

    #[command(flatten)]
    pub output: Output,

    /// healthchecks.io-style URL: GET <URL>/start before a run, POST <URL>/<exit status> after with the JSON summary
    #[arg(long, env = "USAGE_AGG_PING_URL", value_name = "URL")]
    pub ping_url: Option<String>,

    /// Write the run's Prometheus metrics to this file for node_exporter's textfile collector (name it *.prom),
    /// after every run, failed ones included; atomically (PATH.tmp.<pid>, then renamed)
    #[arg(long, env = "USAGE_AGG_METRICS_FILE", value_name = "PATH")]
    pub metrics_file: Option<std::path::PathBuf>,

    /// Read everything and show what would be written; write nothing (not even the lease)
    #[arg(long)]
    pub dry_run: bool,

    /// With --dry-run: preview even while another run holds the lease (its half-written state shows)
    #[arg(long, requires = "dry_run")]
    pub force: bool,

    /// The header before the run and the whole summary even when there is nothing to do (else one line then)
    #[arg(long, short)]
    pub verbose: bool,

    /// rest: page rows over PostgREST and aggregate here; rpc: aggregate in the database, batch by batch
    /// (new rows only: not with --full, --month or --rebase)
    #[arg(long, default_value = "rest", value_parser = engine())]
    pub engine: Engine,

    /// Ids per batch of new rows, both engines: the counts are written and the cursor moved after each
    /// (one transaction each with --engine rpc) [default: 1000000; with --engine rpc, sized by --batch-seconds]. The old names
    /// --batch-rows and --batch-ids still work, for this release only
    #[arg(
        long,
        alias = "batch-rows",
        alias = "batch-ids",
        value_name = "IDS",
        conflicts_with_all = ["full", "month", "rebase"],
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub batch_size: Option<u64>,

    /// With --engine rpc and no --batch-size: size each server-side batch to take about this long (100ms to
    /// 60s) [default: 2s; 4s with --aggressive], from the rows and keys the last one read and what each cost,
    /// so a small or busy instance stays far from its statement timeout
    #[arg(long, value_parser = batch_seconds, value_name = "DURATION", conflicts_with = "batch_size")]
    pub batch_seconds: Option<std::time::Duration>,

    /// With --engine rpc: rest this long after each server-side batch [default: a quarter of what the batch
    /// took; 0s with --aggressive]
    #[arg(long, value_parser = batch_pause, value_name = "DURATION", conflicts_with = "aggressive", allow_hyphen_values = true)]
    pub batch_pause: Option<std::time::Duration>,

    /// Recompute every key from all its rows instead of only new rows
    #[arg(long, conflicts_with = "month")]
    pub full: bool,

    /// Recompute one month's keys (YYYY-MM) from that month's rows
    #[arg(long, value_parser = month)]
    pub month: Option<Month>,

    /// Let --full or --month lower stored counts (when raw rows were deleted)
    #[arg(long, requires = "rebuild")]
    pub allow_decrease: bool,

    /// Repair after the id sequence moved backwards or a table was truncated: reset the cursor and the
    /// watermarks, then rebuild every key from its rows (lowering counts where rows are gone)
    #[arg(long, conflicts_with_all = ["month", "full", "dry_run"])]
    pub rebase: bool,

    /// How long the lease lasts without renewal (renewed after each batch): 600s, 10m, ...
    #[arg(long, default_value = "10m", value_parser = lease_ttl, value_name = "DURATION")]
    pub lease_ttl: std::time::Duration,

    /// After the run, close every month past this grace after its end (e.g. 72h), each only if its keys agree
    /// with their raw rows
    #[arg(long, value_name = "GRACE", value_parser = grace, allow_hyphen_values = true,
          conflicts_with_all = ["dry_run", "month", "rebase"])]
    pub auto_close: Option<std::time::Duration>,

    /// After the run, post the undelivered alerts to USAGE_AGG_ALERTS_WEBHOOK_URL as `alerts deliver` does
    /// (checked before the run: a missing or bad webhook setting is exit 78 and nothing is counted)
    #[arg(long, conflicts_with = "dry_run")]
    pub deliver_alerts: bool,

    /// Milliseconds to wait for inserts in flight before counting up to the newest id
    #[arg(long, default_value_t = crate::engine::DEFAULT_HORIZON_WAIT.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(0..=7000))]
    pub horizon_wait_ms: u64,
}

/// A conflict between `aggregate`'s flags that clap's rules cannot say,
/// reported as clap reports its own (usage, exit 64).
fn aggregate_conflict(message: impl std::fmt::Display) -> clap::Error {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    cmd.find_subcommand_mut("aggregate")
        .expect("aggregate is a subcommand")
        .error(clap::error::ErrorKind::ArgumentConflict, message)
}

impl Cli {
    /// Whether `name` is a subcommand that takes `--json` (a refused
    /// command line's JSON is printed for those alone).
    pub fn takes_json(name: &str) -> bool {
        fn takes(c: &clap::Command) -> bool {
            c.get_arguments().any(|a| a.get_long() == Some("json"))
                || c.get_subcommands().any(takes)
        }
        <Cli as clap::CommandFactory>::command()
            .get_subcommands()
            .filter(|c| c.get_name() == name)
            .any(takes)
    }
}

impl AggregateArgs {
    /// `aggregate` with every default: what a catch-up run inside another
    /// command makes (`close`, `--auto-close`).
    pub fn defaults() -> AggregateArgs {
        match Cli::try_parse_from(["usage-agg", "aggregate"]) {
            Ok(Cli {
                command: Command::Aggregate(a),
                ..
            }) => a,
            other => unreachable!("`aggregate` alone parses: {other:?}"),
        }
    }

    /// Ids per batch for `engine`: `--batch-size`, else that engine's default.
    pub fn batch_ids_for(&self, engine: Engine) -> u64 {
        self.batch_size.unwrap_or(match engine {
            Engine::Rest => DEFAULT_REST_BATCH_IDS,
            Engine::Rpc => crate::engine::rpc::DEFAULT_BATCH_IDS,
        })
    }

    /// What clap's rules cannot say: the server-side engine only counts
    /// new rows, so a rebuild asked of it would silently run the REST one.
    fn check(&self) -> Result<(), clap::Error> {
        if self.engine != Engine::Rpc {
            let rpc_only = if self.batch_seconds.is_some() {
                "--batch-seconds sizes the server-side engine's batches: add --engine rpc, or use \
                 --batch-size for the REST engine"
            } else if self.batch_pause.is_some() {
                "--batch-pause rests between the server-side engine's batches: add --engine rpc, or use \
                 --max-rows-per-second to slow the REST engine"
            } else {
                return Ok(());
            };
            return Err(aggregate_conflict(rpc_only));
        }
        let rebuild = if self.full {
            "--full"
        } else if self.month.is_some() {
            "--month"
        } else if self.rebase {
            "--rebase"
        } else {
            return Ok(());
        };
        Err(aggregate_conflict(format!(
            "the argument '--engine rpc' cannot be used with '{rebuild}': the server-side engine counts \
             only new rows, and rebuilds run in the REST engine (drop --engine rpc)"
        )))
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub scan: Scan,

    #[command(flatten)]
    pub output: Output,

    /// healthchecks.io-style URL for this check: GET <URL>/start before, POST <URL>/<exit status> after with
    /// the JSON result (not read from USAGE_AGG_PING_URL, which is aggregate's check)
    #[arg(long, value_name = "URL")]
    pub ping_url: Option<String>,

    /// Check one month (YYYY-MM) only
    #[arg(long, value_parser = month)]
    pub month: Option<Month>,
}

fn page_size(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(n),
        _ => Err("expected a number of rows from 1 to 100000".into()),
    }
}

pub(crate) fn month(s: &str) -> Result<Month, String> {
    Month::parse(s)
        .ok_or_else(|| format!("{s:?} is not a month: expected YYYY-MM with a month from 01 to 12"))
}

/// `90` (seconds), `90s`, `15m`, `2h30m`, `1d`: one syntax for every
/// duration option (humantime's).
fn duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t
            .parse()
            .map(std::time::Duration::from_secs)
            .map_err(|_| format!("{s:?} is too large"));
    }
    humantime::parse_duration(t)
        .map_err(|e| format!("{s:?} is not a duration ({e}): expected e.g. 90s, 5m, 2h30m or 1d"))
}

/// A duration of at least one second and at most `max`.
fn bounded(s: &str, max: std::time::Duration) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if d < std::time::Duration::from_secs(1) || d > max {
        return Err(format!(
            "{s:?} is out of range: from 1s to {}",
            humantime::format_duration(max)
        ));
    }
    Ok(d)
}

/// A batch duration target: 100ms to 60s.
fn batch_seconds(s: &str) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if d < std::time::Duration::from_millis(100) || d > std::time::Duration::from_secs(60) {
        return Err(format!("{s:?} is out of range: from 100ms to 60s"));
    }
    Ok(d)
}

/// A rest between server-side batches: 0s (none) to 10m.
fn batch_pause(s: &str) -> Result<std::time::Duration, String> {
    let d = duration(s)?;
    if d > std::time::Duration::from_secs(600) {
        return Err(format!("{s:?} is out of range: from 0s to 10m"));
    }
    Ok(d)
}

fn request_timeout(s: &str) -> Result<std::time::Duration, String> {
    bounded(s, std::time::Duration::from_secs(3600))
}

fn lease_ttl(s: &str) -> Result<std::time::Duration, String> {
    bounded(s, std::time::Duration::from_secs(86_400))
}

fn run_deadline(s: &str) -> Result<std::time::Duration, String> {
    bounded(s, std::time::Duration::from_secs(7 * 86_400))
}

/// `rest` or `rpc`, listed in `--help` as clap lists a value enum's.
fn engine() -> impl clap::builder::TypedValueParser<Value = Engine> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["rest", "rpc"]).map(|s| match s.as_str() {
        "rpc" => Engine::Rpc,
        _ => Engine::Rest,
    })
}

fn every(s: &str) -> Result<crate::schedule::Every, String> {
    crate::schedule::cron_expression(duration(s)?)
}

fn time_limit(s: &str) -> Result<std::time::Duration, String> {
    bounded(s, std::time::Duration::from_secs(86_400))
}

#[derive(Debug, Args)]
pub struct AdjustArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// The portal whose usage is corrected
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub portal: i64,

    /// The month the usage belongs to (YYYY-MM); the adjustment is booked in the open month, one an invoice can
    /// still show (docs/semantics.md, "Manual adjustments")
    #[arg(long, value_parser = month)]
    pub month: Month,

    /// Requests to add (negative to take away), at most 10^12 either way
    #[arg(long, allow_hyphen_values = true)]
    pub requests: i64,

    /// Of which successes [default: requests minus errors], at most 10^12 either way
    #[arg(long, allow_hyphen_values = true)]
    pub successes: Option<i64>,

    /// Of which errors [default: 0, or requests minus successes], at most 10^12 either way
    #[arg(long, allow_hyphen_values = true)]
    pub errors: Option<i64>,

    /// Why, for the record (billing reads it)
    #[arg(long, value_parser = reason)]
    pub reason: String,

    /// Idempotency key: the same key again books nothing (and a different adjustment under it is refused)
    #[arg(long = "id", value_name = "KEY", value_parser = idempotency_key)]
    pub id: String,
}

fn idempotency_key(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("an idempotency key cannot be empty".into());
    }
    if t.starts_with("late:") {
        return Err("keys starting with late: are the counted rows' own".into());
    }
    Ok(t.to_string())
}

#[derive(Debug, Args)]
pub struct CloseArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// The month to close (YYYY-MM)
    #[arg(long, value_parser = month)]
    pub month: Month,

    /// How long after the month's end it may close, by the database's clock (e.g. 72h, 3d, 0)
    #[arg(long, default_value = "72h", value_parser = grace, allow_hyphen_values = true)]
    pub grace: Duration,

    /// Check everything (grace, drift) and show the snapshot; catch up nothing and close nothing
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// Delete the raw rows of the closed months before this one (YYYY-MM); every one of them must be closed
    #[arg(long, value_parser = month)]
    pub before: Month,

    /// Show the months and how many rows would go; delete nothing
    #[arg(long)]
    pub dry_run: bool,

    /// Ids per batch (one transaction each)
    #[arg(long, default_value_t = DEFAULT_PRUNE_BATCH_IDS, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub batch_size: u64,
}

#[derive(Debug, Args)]
pub struct ReopenArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// The closed month to reopen (YYYY-MM)
    #[arg(long, value_parser = month)]
    pub month: Month,

    /// Why, for the record (billing reads it)
    #[arg(long, value_parser = reason)]
    pub reason: String,
}

/// A reason is some text, not blanks.
fn reason(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("a reason cannot be empty: say why, for the record".into());
    }
    Ok(t.to_string())
}

/// `72h`, `90m`, `3d`, `0`: a grace period, in the one duration syntax
/// (`2h30m` too); negative ones are refused by name (they would let a month
/// close before it ends), and more than a year is not a grace period.
fn grace(s: &str) -> Result<std::time::Duration, String> {
    if s.trim().starts_with('-') {
        return Err(format!(
            "{s:?}: a grace period cannot be negative (a month cannot close before it ends); use e.g. 72h, or 0"
        ));
    }
    let d = duration(s)?;
    if d > std::time::Duration::from_secs(366 * 86_400) {
        return Err(format!(
            "{s:?}: a grace period of more than a year is not one"
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_checked_from(std::iter::once("usage-agg").chain(args.split_whitespace()))
    }

    fn aggregate(args: &str) -> AggregateArgs {
        match parse(&format!("aggregate {args}")).unwrap().command {
            Command::Aggregate(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_idempotency_key_is_some_text_and_never_a_counted_rows_own() {
        assert!(idempotency_key(" ").is_err() && idempotency_key("late:1").is_err());
        assert_eq!(idempotency_key(" m-1 ").unwrap(), "m-1");
    }

    #[test]
    fn grace_is_a_duration_like_every_other_and_never_negative() {
        assert_eq!(grace("72h").unwrap().as_secs(), 72 * 3600);
        assert_eq!(grace("0").unwrap().as_secs(), 0);
        assert_eq!(grace("3d").unwrap().as_secs(), 3 * 86_400);
        assert_eq!(grace("2h30m").unwrap().as_secs(), 9000);
        assert!(grace("-1h").unwrap_err().contains("cannot be negative"));
        assert!(grace("2x").is_err() && grace("").is_err());
        assert!(grace("400d").unwrap_err().contains("more than a year"));
    }

    #[test]
    fn the_definition_is_consistent() {
        <Cli as clap::CommandFactory>::command().debug_assert();
    }

    #[test]
    fn each_subcommand_refuses_what_it_would_ignore() {
        for args in [
            "sql --json",
            "sql --quiet",
            "sql --ping-url http://x",
            "sql --env dev",
            "--json aggregate",
            "report --ping-url http://x",
            "report --portal 3 --top 5",
            "report --months 3",
            "report --json --format csv",
            "report --quiet --format csv",
            "status --page-size 10",
            "status --concurrency 2",
            "report --page-size 10",
            "report --concurrency 2",
            "sql --metrics-file m.prom",
            "report --metrics-file m.prom",
            "verify --metrics-file m.prom",
            "aggregate --json --quiet",
            "aggregate --engine rpc --full",
            "aggregate --engine rpc --month 2025-01",
            "aggregate --engine rpc --rebase",
            "aggregate --allow-decrease",
            "aggregate --rebase --allow-decrease",
            "aggregate --batch-size 10 --full",
            "aggregate --batch-rows 10 --month 2025-01",
            "aggregate --batch-ids 10 --rebase",
            "aggregate --batch-rows 10 --batch-ids 10",
            "schedule",
            "schedule --every 7m",
            "schedule --every 90s",
            "schedule --every 5m --remove",
            "schedule --show --remove",
            "schedule --show --time-limit 30s",
            "schedule --every 1m --time-limit 60s",
            "schedule --every 5m --page-size 10",
            "schedule --every 5m --ping-url http://x",
        ] {
            let e = parse(args).expect_err(args);
            assert!(e.use_stderr(), "{args}: an error, exit 64");
            assert_ne!(e.kind(), ErrorKind::DisplayHelp, "{args}");
        }
    }

    #[test]
    fn what_each_subcommand_honours_parses() {
        for args in [
            "sql",
            "sql --log-format json",
            "--log-format json sql",
            "report --portal 3 --months 6 --json",
            "report --month 2025-01 --top 5 --format csv",
            "report -q",
            "status --json --ping-url http://x --max-age 2h --deadline 30",
            "verify --quiet --ping-url http://x --page-size 10 --concurrency 2",
            "aggregate --engine rpc --batch-size 10 --dry-run",
            "aggregate --engine rest --full --allow-decrease",
            "aggregate --month 2025-01 --allow-decrease",
            "aggregate --rebase --ping-url http://x --json",
            "aggregate --metrics-file /var/lib/node_exporter/usage_agg.prom --dry-run",
            "status --metrics-file usage_agg_status.prom --max-age 2h",
            "schedule --every 5m",
            "schedule --every 1h --time-limit 10m --json",
            "schedule --remove --quiet",
            "schedule --show --json",
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args}: {e}"));
        }
    }

    #[test]
    fn batch_size_is_ids_per_batch_for_both_engines_with_each_engines_default() {
        let a = aggregate("");
        assert_eq!(a.batch_ids_for(Engine::Rest), DEFAULT_REST_BATCH_IDS);
        assert_eq!(
            a.batch_ids_for(Engine::Rpc),
            crate::engine::rpc::DEFAULT_BATCH_IDS
        );
        for flag in ["--batch-size", "--batch-rows", "--batch-ids"] {
            let a = aggregate(&format!("{flag} 700"));
            assert_eq!(
                (a.batch_ids_for(Engine::Rest), a.batch_ids_for(Engine::Rpc)),
                (700, 700),
                "{flag}"
            );
        }
        assert!(parse("aggregate --batch-size 0").is_err());
    }

    #[test]
    fn the_old_batch_names_are_hidden_from_the_help() {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        let help = cmd
            .find_subcommand_mut("aggregate")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--batch-size <IDS>"), "{help}");
        assert!(!help.contains("--batch-rows <"), "{help}");
        assert!(!help.contains("--batch-ids <"), "{help}");
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(duration("90"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(duration("15m"), Ok(std::time::Duration::from_secs(900)));
        assert_eq!(duration("2h"), Ok(std::time::Duration::from_secs(7200)));
        assert_eq!(duration("1d"), Ok(std::time::Duration::from_secs(86_400)));
        assert_eq!(duration("2h30m"), Ok(std::time::Duration::from_secs(9000)));
        assert_eq!(duration("5m"), Ok(std::time::Duration::from_secs(300)));
        assert!(duration("").is_err() && duration("soon").is_err() && duration("-1h").is_err());
        assert!(request_timeout("0s").is_err() && request_timeout("2h").is_err());
        assert_eq!(run_deadline("5m"), Ok(std::time::Duration::from_secs(300)));
    }
}
