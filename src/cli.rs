//! The command line. One subcommand a file under `commands/`.

use clap::{Args, Parser, Subcommand};

use crate::aggregation::Month;
use crate::config::EnvChoice;

/// Rolls usage_requests up into portal_usage_monthly over Supabase's REST
/// API (PostgREST): every row counted exactly once, safe to rerun.
#[derive(Debug, Parser)]
#[command(
    name = "usage-agg",
    version,
    about,
    long_about = None,
    after_help = "Exit statuses: 0 done; 64 bad arguments; 65 rows rejected as bad data, keys left unwritten or \
                  (verify) keys that differ; 69 server unreachable or failing; 70 internal error; 75 try again later \
                  (lease held, writers in flight, deadline; status: too long since a success); 77 key refused; \
                  78 configuration or schema, plain http to another host (allowed only with \
                  USAGE_AGG_ALLOW_INSECURE_HTTP=1), or a redirect (never followed). README.md explains each."
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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Aggregate new usage_requests rows into portal_usage_monthly
    Aggregate(AggregateArgs),
    /// Recompute from raw rows and compare with portal_usage_monthly; write nothing
    Verify(VerifyArgs),
    /// Show the job's state: cursor, backlog, lease, last run; a cron health check with --max-age
    Status(StatusArgs),
    /// Show usage from portal_usage_monthly: one portal by month, or the top portals of a month
    Report(ReportArgs),
    /// Print the migration SQL (to paste into Supabase's SQL editor)
    Sql,
    /// Close a billing month: catch up, check its keys against their raw rows, record it closed with a snapshot
    Close(crate::commands::close::CloseArgs),
    /// Reopen a closed month, recorded with who, when and why
    Reopen(crate::commands::reopen::ReopenArgs),
    /// Book a signed manual correction, with its reason, once per idempotency key
    Adjust(crate::commands::adjust::AdjustArgs),
    /// Delete the raw rows of closed months (their totals stay checkable), in resumable batches
    Prune(crate::commands::prune::PruneArgs),
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
        if let Command::Aggregate(a) = &cli.command {
            a.check()?;
        }
        Ok(cli)
    }
}

/// What a subcommand prints on stdout.
#[derive(Debug, Args)]
pub struct Output {
    /// Print the result as one JSON object on stdout instead of the text (fields: README.md)
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
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub connection: Connection,

    #[command(flatten)]
    pub output: Output,

    /// One portal's usage, month by month
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    pub portal: Option<i64>,

    /// How many months back (with --portal)
    #[arg(long, default_value_t = 12, requires = "portal", value_parser = clap::value_parser!(u16).range(1..=240))]
    pub months: u16,

    /// The month for the top portals (default: the newest month in the table)
    #[arg(long, value_parser = month, conflicts_with = "portal")]
    pub month: Option<Month>,

    /// How many portals in the top list (not with --portal)
    #[arg(long, default_value_t = 10, conflicts_with = "portal", value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub top: u16,

    /// With --portal: its current month right now (stored totals, late adjustments and the rows no run has
    /// counted yet), exact between runs
    #[arg(long, requires = "portal", conflicts_with = "months")]
    pub live: bool,

    /// Output format (--json is --format json)
    #[arg(long, value_enum, default_value = "table", conflicts_with_all = ["json", "quiet"])]
    pub format: ReportFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    Rest,
    Rpc,
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
pub struct Connection {
    /// Which project: dev, prod, or auto (prod when APP_ENV, else NODE_ENV, is production or prod)
    #[arg(long, value_enum, default_value = "auto")]
    pub env: EnvChoice,

    /// Seconds before a single request is abandoned (and tried again)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout: u64,

    /// Tries again after a transient failure (network, 502/503/504, ...) at most this many times per request
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(0..=100))]
    pub max_retries: u16,

    /// Seconds the whole run may take; past it, no request is started or retried (exit 75)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub deadline: Option<u64>,
}

/// How raw rows are read: the subcommands that page through them
/// (`aggregate`, `verify`).
#[derive(Debug, Args)]
pub struct Scan {
    /// Rows asked for per page (the server may cap it lower, which is fine)
    #[arg(long, default_value_t = crate::engine::DEFAULT_PAGE_SIZE, value_parser = page_size)]
    pub page_size: usize,

    /// Id ranges scanned at once (the server answers requests in parallel)
    #[arg(long, default_value_t = crate::engine::DEFAULT_CONCURRENCY, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub concurrency: u16,
}

/// The REST engine's ids per batch when `--batch-size` is not given.
pub const DEFAULT_REST_BATCH_IDS: u64 = 100_000;

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

    /// Read everything and show what would be written; write nothing (not even the lease)
    #[arg(long)]
    pub dry_run: bool,

    /// rest: page rows over PostgREST and aggregate here; rpc: aggregate in the database, batch by batch
    /// (new rows only: not with --full, --month or --rebase)
    #[arg(long, value_enum, default_value = "rest")]
    pub engine: Engine,

    /// Ids per batch of new rows, both engines: the counts are written and the cursor moved after each
    /// (one transaction each with --engine rpc) [default: 100000 (rest), 1000000 (rpc)]. The old names
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

    /// Seconds the lease lasts without renewal (renewed after each batch)
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub lease_ttl: u64,

    /// After the run, close every month past this grace after its end (e.g. 72h), each only if its keys agree
    /// with their raw rows
    #[arg(long, value_name = "GRACE", value_parser = crate::periods::parse_grace, allow_hyphen_values = true,
          conflicts_with_all = ["dry_run", "month", "rebase"])]
    pub auto_close: Option<std::time::Duration>,

    /// Milliseconds to wait for inserts in flight before counting up to the newest id
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=7000))]
    pub horizon_wait_ms: u64,
}

impl AggregateArgs {
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
            return Ok(());
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
        let mut cmd = <Cli as clap::CommandFactory>::command();
        cmd.build();
        let sub = cmd
            .find_subcommand_mut("aggregate")
            .expect("aggregate is a subcommand");
        Err(sub.error(
            clap::error::ErrorKind::ArgumentConflict,
            format!(
                "the argument '--engine rpc' cannot be used with '{rebuild}': the server-side engine counts \
                 only new rows, and rebuilds run in the REST engine (drop --engine rpc)"
            ),
        ))
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

/// `90`, `90s`, `15m`, `2h`, `1d`.
fn duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration: expected a number with s, m, h or d, e.g. 90m");
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.trim().len()),
    );
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(bad()),
    };
    Ok(std::time::Duration::from_secs(secs))
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
        assert!(duration("2w").is_err() && duration("").is_err());
    }
}
