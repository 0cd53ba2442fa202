//! usage-agg's benchmark: builds datasets with SQL on a private stack, times
//! the engines against baselines of the same shape measured in the same run,
//! and prints a markdown report (issue 12's targets) on stdout. Progress
//! goes to stderr. Run it with `scripts/bench` (release build).
//!
//!     bench --bin target/release/usage-agg [--rows 1000000] [--wan-rows 1000000]
//!           [--runs 3] [--concurrency 4] [--wan-delay-ms 20] [--probe-inserts 2000]
//!           [--big [--big-rows 10000000]] [--only-reads]
//!
//! Every HTTP scan pages 1000 rows at a time against a server capped at
//! 1000 rows (Supabase's `max_rows`). What is measured, each against its
//! baseline:
//!
//! - the REST engine's full run (from an empty monthly table) against a
//!   transport-only fetch of the same pages at the same concurrency (C
//!   keyset streams over C equal id sub-ranges, as the engine's parallel
//!   scan does; bytes read, nothing parsed), and its CPU per raw row;
//! - an incremental catch-up of the second half of the rows against a
//!   `--full` rebuild of all of them, per row read;
//! - a dry run beside a cron-like run against the same dry run alone;
//! - the REST engine through a latency-injecting proxy (a WAN) at
//!   concurrency 1 to 16, against pages x round trip / concurrency;
//! - the p99 of single-row webhook inserts through the REST API during each
//!   engine's run against idle;
//! - the RPC engine on an instance whose role has a 2 s statement timeout;
//! - the RPC engine against bare SQL, and peak RSS at several sizes;
//! - `usage_current` against a whole-table count;
//! - `usage_portal_summary` (the app's usage page) by months and by rows
//!   above the cursor, against the same numbers counted from the raw rows.
//!   `--only-reads` measures these two alone (a minute or two).
//!
//! Every run must exit 0, and after every run that writes, the stored
//! totals are checked against the raw rows by SQL: a fast wrong run fails
//! the benchmark instead of passing it.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use stack::latency::LatencyProxy;
use stack::{Cluster, Stack};

/// Rows per page for every HTTP scan, the server's cap included:
/// Supabase's default `max_rows`.
const PAGE: u32 = stack::MAX_ROWS;
/// The flags of the "speed" runs: the engine's good-neighbour throttling
/// lifted. Dropped (with a note in the report) when the binary does not
/// know one of them.
const SPEED_FLAGS: &[&str] = &["--aggressive"];
/// The dataset's shape.
const PORTALS: i64 = 10_000;
const MONTHS: [&str; 3] = ["2025-05", "2025-06", "2025-07"];
/// The webhook probe's rows: a portal no dataset uses.
const PROBE_PORTAL: i64 = 999_999;
/// The concurrency levels of the WAN curve.
const WAN_LEVELS: [usize; 5] = [1, 2, 4, 8, 16];
/// The slowed instance's statement timeout (on the roles the REST server
/// connects and runs as).
const SLOW_TIMEOUT: &str = "2s";
/// The batch timed in SQL on the slowed instance's data, to show how far
/// over the timeout the default batch would be (a batch of 1,000,000 ids
/// that are as many keys takes about 20 s on 2 cores).
const SLOW_PROBE_BATCH: i64 = 100_000;
/// The migrations in the order they apply: every `supabase/migrations/*.sql`,
/// in name order (as `build.rs` lists them for the binary).
fn migrations() -> Vec<PathBuf> {
    let dir = stack::repo_root().join("supabase/migrations");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read supabase/migrations")
        .map(|e| e.expect("read supabase/migrations").path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    files
}

const USAGE: &str =
    "usage: bench [--bin PATH] [--rows N] [--wan-rows N] [--runs N] [--concurrency C] \
                     [--wan-delay-ms D] [--probe-inserts N] [--big] [--big-rows N] [--only-reads]";

struct Args {
    bin: PathBuf,
    rows: i64,
    wan_rows: i64,
    runs: usize,
    concurrency: usize,
    wan_delay_ms: u64,
    probe_inserts: usize,
    big: bool,
    big_rows: i64,
    only_reads: bool,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::from("target/release/usage-agg"),
        rows: 1_000_000,
        wan_rows: 1_000_000,
        runs: 3,
        concurrency: 4,
        wan_delay_ms: 20,
        probe_inserts: 2000,
        big: false,
        big_rows: 10_000_000,
        only_reads: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| panic!("{x} takes a value\n{USAGE}"))
        };
        fn num<T: std::str::FromStr>(flag: &str, v: String) -> T {
            v.parse()
                .unwrap_or_else(|_| panic!("{flag} takes a number, not {v:?}\n{USAGE}"))
        }
        match x.as_str() {
            "--bin" => a.bin = PathBuf::from(val()),
            "--rows" => a.rows = num(&x, val()),
            "--wan-rows" => a.wan_rows = num(&x, val()),
            "--runs" => a.runs = num(&x, val()),
            "--concurrency" => a.concurrency = num(&x, val()),
            "--wan-delay-ms" => a.wan_delay_ms = num(&x, val()),
            "--probe-inserts" => a.probe_inserts = num(&x, val()),
            "--big" => a.big = true,
            "--big-rows" => a.big_rows = num(&x, val()),
            "--only-reads" => a.only_reads = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other}\n{USAGE}"),
        }
    }
    assert!(a.rows >= 2000, "--rows must be at least 2000");
    assert!(a.wan_rows >= 1000, "--wan-rows must be at least 1000");
    assert!(a.runs >= 1, "--runs must be at least 1");
    assert!(
        (1..=32).contains(&a.concurrency),
        "--concurrency is 1 to 32, as usage-agg's"
    );
    // The CLI runs in a temporary directory (no .env.local of the
    // checkout's may leak in): its path must not be relative.
    a.bin =
        std::fs::canonicalize(&a.bin).unwrap_or_else(|e| panic!("--bin {}: {e}", a.bin.display()));
    a
}

impl Args {
    /// The command line that reruns this benchmark, every value spelled out.
    fn rerun(&self) -> String {
        format!(
            "scripts/bench --rows {} --wan-rows {} --runs {} --concurrency {} --wan-delay-ms {} --probe-inserts {}{}",
            self.rows,
            self.wan_rows,
            self.runs,
            self.concurrency,
            self.wan_delay_ms,
            self.probe_inserts,
            if self.big {
                format!(" --big --big-rows {}", self.big_rows)
            } else if self.only_reads {
                " --only-reads".to_string()
            } else {
                String::new()
            }
        )
    }
}

// ---------------------------------------------------------------------------
// Timings

/// Repeated timings, in seconds.
#[derive(Default, Clone)]
struct Timing(Vec<f64>);

impl Timing {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }

    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn min(&self) -> f64 {
        self.sorted()[0]
    }

    fn max(&self) -> f64 {
        *self.sorted().last().unwrap()
    }

    fn show(&self) -> String {
        if self.0.len() == 1 {
            return format!("{:.3} s (n=1)", self.0[0]);
        }
        format!(
            "{:.3} s (min {:.3}, max {:.3}, n={})",
            self.median(),
            self.min(),
            self.max(),
            self.0.len()
        )
    }
}

/// Nearest-rank percentile of latencies, in milliseconds.
fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

// ---------------------------------------------------------------------------
// Running usage-agg

/// One finished run of usage-agg.
struct Run {
    wall: Duration,
    /// User plus system CPU of the process (wait4's rusage).
    cpu: Duration,
    rss_kib: i64,
    code: i32,
    stdout: String,
    stderr: String,
    args: Vec<String>,
}

impl Run {
    /// Panics unless the run exited 0, with the end of its stderr.
    fn ok(self) -> Run {
        if self.code != 0 {
            let tail: String = {
                let lines: Vec<&str> = self.stderr.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            panic!(
                "usage-agg {} exited {} (a run that fails cannot be timed):\n{tail}",
                self.args.join(" "),
                self.code
            );
        }
        self
    }

    /// The `--json` summary.
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "usage-agg {}: stdout is not one JSON object ({e}): {}",
                self.args.join(" "),
                self.stdout.chars().take(500).collect::<String>()
            )
        })
    }

    fn rows_read(&self) -> u64 {
        self.json()["rows_read"]
            .as_u64()
            .expect("the JSON summary has rows_read")
    }

    fn mode(&self) -> String {
        self.json()["mode"].as_str().unwrap_or("").to_string()
    }

    /// CPU per raw row read, in microseconds.
    fn cpu_us_per_row(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.rows_read().max(1) as f64
    }
}

/// A usage-agg process started and not yet waited for.
struct Running {
    pid: libc::pid_t,
    started: Instant,
    out: std::thread::JoinHandle<String>,
    err: std::thread::JoinHandle<String>,
    args: Vec<String>,
    _child: std::process::Child,
}

fn spawn_cli(bin: &Path, env: &[(String, String)], args: &[String]) -> Running {
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        // Nothing from the caller's environment may change the run.
        .env_remove("USAGE_AGG_PING_URL")
        .env_remove("USAGE_AGG_METRICS_FILE")
        .env_remove("USAGE_AGG_FAILPOINTS")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    Running {
        pid: child.id() as libc::pid_t,
        started,
        out,
        err,
        args: args.to_vec(),
        _child: child,
    }
}

impl Running {
    fn wait(self) -> Run {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be filled in.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, with valid pointers.
        let r = unsafe { libc::wait4(self.pid, &mut status, 0, &mut usage) };
        assert_eq!(r, self.pid, "wait4");
        let wall = self.started.elapsed();
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        Run {
            wall,
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            rss_kib: usage.ru_maxrss,
            code,
            stdout: self.out.join().unwrap(),
            stderr: self.err.join().unwrap(),
            args: self.args,
        }
    }
}

fn run_cli(bin: &Path, env: &[(String, String)], args: &[String]) -> Run {
    spawn_cli(bin, env, args).wait()
}

/// `aggregate --env dev --page-size 1000` and `extra`.
fn agg(extra: &[&str]) -> Vec<String> {
    let page = PAGE.to_string();
    ["aggregate", "--env", "dev", "--page-size", &page]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect()
}

/// The speed flags this binary knows, and a note for each it does not.
fn speed_flags(bin: &Path) -> (Vec<&'static str>, Vec<String>) {
    let mut known = Vec::new();
    let mut notes = Vec::new();
    for flag in SPEED_FLAGS {
        let out = Command::new(bin)
            .args(["aggregate", flag, "--help"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            known.push(*flag);
        } else if stderr.contains("unexpected argument") {
            notes.push(format!(
                "this usage-agg does not know `{flag}` (exit {}): the \"speed\" runs ran without it",
                out.status.code().unwrap_or(-1)
            ));
        } else {
            panic!("usage-agg aggregate {flag} --help failed: {stderr}");
        }
    }
    (known, notes)
}

// ---------------------------------------------------------------------------
// Datasets and ground truth

fn dataset(cluster: &Cluster, rows: i64, portals: i64, months: &[&str]) -> Stack {
    let mut s = Stack::on(cluster);
    for m in migrations() {
        let out = s.psql_file(&m);
        assert!(
            out.status.success(),
            "{}: {}",
            m.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let started = Instant::now();
    let mut db = s.sql();
    // In pieces of at most 5M rows: one statement per piece.
    let mut left = rows;
    while left > 0 {
        let n = left.min(5_000_000);
        stack::insert_sample_rows(&mut db, n, portals, months);
        left -= n;
    }
    db.batch_execute("VACUUM ANALYZE usage_requests").unwrap();
    eprintln!(
        "bench: {rows} rows ({portals} portals, {} months) loaded in {:.1} s",
        months.len(),
        started.elapsed().as_secs_f64()
    );
    s
}

fn database_name(stack: &Stack) -> String {
    stack.database_url.rsplit('/').next().unwrap().to_string()
}

/// Stops the stack's server and drops its database (disk for the next).
fn discard(cluster: &Cluster, stack: Stack) {
    let name = database_name(&stack);
    drop(stack);
    let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls).unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .unwrap();
}

fn max_id(stack: &Stack) -> i64 {
    stack
        .sql()
        .query_one(
            "SELECT coalesce(max(id), 0)::bigint FROM usage_requests",
            &[],
        )
        .unwrap()
        .get(0)
}

/// Portal-months in the raw rows.
fn distinct_keys(stack: &Stack) -> i64 {
    stack
        .sql()
        .query_one(
            "SELECT count(*) FROM (SELECT DISTINCT portal_id, month_year FROM usage_requests) k",
            &[],
        )
        .unwrap()
        .get(0)
}

fn count_rows(stack: &Stack) -> i64 {
    stack
        .sql()
        .query_one("SELECT count(*) FROM usage_requests", &[])
        .unwrap()
        .get(0)
}

/// An empty monthly table and no job state (the next run is the first
/// rebuild), or a cursor at `cursor` with an empty monthly table (every
/// row above it is new to the RPC engine).
fn reset(stack: &Stack, cursor: Option<i64>) {
    let mut db = stack.sql();
    db.batch_execute("TRUNCATE portal_usage_monthly").unwrap();
    db.batch_execute("DELETE FROM usage_aggregation_state")
        .unwrap();
    db.batch_execute("VACUUM ANALYZE portal_usage_monthly")
        .unwrap();
    if let Some(c) = cursor {
        db.execute(
            "INSERT INTO usage_aggregation_state (job, cursor_id) VALUES ('default', $1::bigint)",
            &[&c],
        )
        .unwrap();
    }
}

/// The state a run that counted every row up to id `upto` leaves: each
/// key's totals and watermark from its rows at or below it, the cursor at
/// it. Rows above it are the backlog.
fn counted_upto(stack: &Stack, upto: i64) {
    reset(stack, None);
    let mut db = stack.sql();
    db.execute(
        "INSERT INTO portal_usage_monthly (portal_id, month_year, request_count, success_count, error_count, last_request_at, last_request_id)
         SELECT portal_id, month_year, count(*), count(*) FILTER (WHERE success), count(*) FILTER (WHERE NOT success),
                max(request_timestamp), max(id)
         FROM usage_requests WHERE id <= $1::bigint GROUP BY 1, 2",
        &[&upto],
    )
    .unwrap();
    db.execute(
        "INSERT INTO usage_aggregation_state (job, cursor_id) VALUES ('default', $1::bigint)",
        &[&upto],
    )
    .unwrap();
    db.batch_execute("VACUUM ANALYZE portal_usage_monthly")
        .unwrap();
}

/// Checks the stored totals against the raw rows by SQL: every key's
/// requests, successes and errors equal its rows' at or below the cursor,
/// no key more or less, and the cursor covers `at_least` (the newest id
/// committed before the run started). Returns the cursor.
fn check_totals(stack: &Stack, at_least: i64, what: &str) -> i64 {
    let row = stack
        .sql()
        .query_one(
            "WITH s AS (SELECT cursor_id FROM usage_aggregation_state WHERE job = 'default'),
                  raw AS (SELECT portal_id, month_year, count(*)::bigint AS r,
                                 count(*) FILTER (WHERE success)::bigint AS ok,
                                 count(*) FILTER (WHERE NOT success)::bigint AS err
                          FROM usage_requests WHERE id <= (SELECT cursor_id FROM s) GROUP BY 1, 2),
                  m AS (SELECT portal_id, month_year, request_count::bigint AS r, success_count::bigint AS ok,
                               error_count::bigint AS err
                        FROM portal_usage_monthly)
             SELECT (SELECT count(*) FROM (SELECT * FROM raw EXCEPT SELECT * FROM m) a)
                  + (SELECT count(*) FROM (SELECT * FROM m EXCEPT SELECT * FROM raw) b),
                    (SELECT cursor_id FROM s)::bigint,
                    (SELECT coalesce(sum(r), 0) FROM raw)::bigint,
                    (SELECT coalesce(sum(r), 0) FROM m)::bigint",
            &[],
        )
        .unwrap();
    let (differ, cursor, raw, stored): (i64, Option<i64>, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let cursor = cursor.unwrap_or_else(|| panic!("{what}: no cursor after the run"));
    assert_eq!(
        differ, 0,
        "{what}: {differ} keys differ from their raw rows (stored {stored} requests, raw {raw} up to the cursor {cursor})"
    );
    assert!(
        cursor >= at_least,
        "{what}: the cursor {cursor} is below {at_least}, the newest id before the run"
    );
    cursor
}

/// The floor: the same aggregation as one SQL statement.
fn bare_sql(stack: &Stack) -> Duration {
    let mut db = stack.sql();
    db.batch_execute("TRUNCATE portal_usage_monthly").unwrap();
    let started = Instant::now();
    db.batch_execute(
        "INSERT INTO portal_usage_monthly AS t (portal_id, month_year, request_count, success_count, error_count, last_request_at, last_request_id)
         SELECT portal_id, month_year, count(*), count(*) FILTER (WHERE success), count(*) FILTER (WHERE NOT success),
                max(request_timestamp), max(id)
         FROM usage_requests GROUP BY 1, 2
         ON CONFLICT (portal_id, month_year) DO UPDATE SET
           request_count = t.request_count + excluded.request_count,
           success_count = t.success_count + excluded.success_count,
           error_count = t.error_count + excluded.error_count,
           last_request_at = greatest(t.last_request_at, excluded.last_request_at),
           last_request_id = excluded.last_request_id",
    )
    .unwrap();
    started.elapsed()
}

/// One server-side batch of `ids` ids from cursor 0, in SQL (no HTTP, no
/// role timeout), rolled back.
fn one_batch_in_sql(stack: &Stack, ids: i64) -> Duration {
    reset(stack, Some(0));
    let mut db = stack.sql();
    let mut tx = db.transaction().unwrap();
    let started = Instant::now();
    tx.query_one(
        "SELECT usage_agg_rpc_batch('default', $1, 2000, false)",
        &[&ids],
    )
    .unwrap();
    let took = started.elapsed();
    tx.rollback().unwrap();
    took
}

// ---------------------------------------------------------------------------
// The transport alone

/// What a transport-only scan saw.
struct Fetched {
    took: Duration,
    rows: u64,
    bytes: u64,
}

/// The transport alone, shaped as the engine's parallel scan: `c` keyset
/// streams over `c` equal sub-ranges of (after, upto], each asking
/// `id=gt.X&order=id.asc&limit=min(1000, end - X)` and stopping at its
/// range's end, on `c` threads sharing one client. Bytes are read; nothing
/// is parsed but the last id of a page (found from the end) and the rows
/// counted by their opening braces.
fn transport(rest_url: &str, key: &str, after: i64, upto: i64, c: usize) -> Fetched {
    let http = reqwest::blocking::Client::builder()
        .user_agent("usage-agg-bench")
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let n = c.max(1) as i64;
    let span = (upto - after).max(0);
    let started = Instant::now();
    let (rows, bytes) = std::thread::scope(|s| {
        let streams: Vec<_> = (0..n)
            .map(|i| {
                let lo = after + span * i / n;
                let hi = after + span * (i + 1) / n;
                let http = &http;
                s.spawn(move || {
                    let (mut pos, mut rows, mut bytes) = (lo, 0u64, 0u64);
                    while pos < hi {
                        let limit = (PAGE as i64).min(hi - pos);
                        let body = http
                            .get(format!(
                                "{rest_url}/usage_requests?select=id,portal_id,month_year,success,request_timestamp&id=gt.{pos}&order=id.asc&limit={limit}"
                            ))
                            .header("apikey", key)
                            .bearer_auth(key)
                            .send()
                            .and_then(|r| r.error_for_status())
                            .and_then(|r| r.bytes())
                            .unwrap_or_else(|e| panic!("transport fetch after id {pos}: {e}"));
                        bytes += body.len() as u64;
                        let (Some(last), above) = tail_ids(&body, hi) else {
                            break;
                        };
                        // Rows past the range's end belong to the next range.
                        rows += body.iter().filter(|&&b| b == b'{').count() as u64 - above;
                        if last >= hi {
                            break;
                        }
                        pos = last;
                    }
                    (rows, bytes)
                })
            })
            .collect();
        streams
            .into_iter()
            .map(|h| h.join().unwrap())
            .fold((0, 0), |(r, b), (r1, b1)| (r + r1, b + b1))
    });
    Fetched {
        took: started.elapsed(),
        rows,
        bytes,
    }
}

/// A page's last id, and how many of its rows are above `hi` (the end of
/// the stream's range), read backwards from the end of the body: only the
/// last row's id unless the page crosses the range's end.
fn tail_ids(body: &[u8], hi: i64) -> (Option<i64>, u64) {
    let (mut last, mut above, mut end) = (None, 0, body.len());
    while let Some(p) = memrfind(&body[..end], b"\"id\":") {
        let id = body[p + 5..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .fold(0i64, |n, b| n * 10 + i64::from(b - b'0'));
        last.get_or_insert(id);
        if id <= hi {
            break;
        }
        above += 1;
        end = p;
    }
    (last, above)
}

fn memrfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

// ---------------------------------------------------------------------------
// The webhook probe

/// `YYYY-MM-DDTHH:MM:SS.ffffff`, UTC, now.
fn now_timestamp() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let secs = d.as_secs() as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_micros()
    )
}

/// Sequential single-row inserts through the REST API, as the webhook
/// does, until `stop` (or `limit` inserts): (start, latency) of each.
fn insert_loop(
    rest_url: &str,
    key: &str,
    stop: &AtomicBool,
    limit: Option<usize>,
    first: Option<mpsc::Sender<()>>,
) -> Vec<(Instant, Duration)> {
    let http = reqwest::blocking::Client::builder()
        .user_agent("usage-agg-bench-webhook")
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = format!("{rest_url}/usage_requests");
    let mut out = Vec::new();
    let mut first = first;
    while !stop.load(Ordering::SeqCst) && limit.is_none_or(|l| out.len() < l) {
        let body = format!(
            r#"{{"portal_id":{PROBE_PORTAL},"month_year":"2025-07","success":true,"request_timestamp":"{}"}}"#,
            now_timestamp()
        );
        let started = Instant::now();
        let status = http
            .post(&url)
            .header("apikey", key)
            .bearer_auth(key)
            .header("Content-Type", "application/json")
            .header("Prefer", "return=minimal")
            .body(body)
            .send()
            .map(|r| r.status().as_u16())
            .unwrap_or_else(|e| panic!("webhook probe insert: {e}"));
        let took = started.elapsed();
        assert_eq!(status, 201, "webhook probe insert answered {status}");
        out.push((started, took));
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
    }
    out
}

/// `n` probe inserts on an idle stack.
fn probe_idle(stack: &Stack, n: usize) -> Vec<Duration> {
    let stop = AtomicBool::new(false);
    let v = insert_loop(&stack.rest_url, &stack.key, &stop, Some(n), None);
    remove_probe_rows(stack);
    v.into_iter().map(|(_, d)| d).collect()
}

/// `n` probe inserts while one thread of this process spins on a CPU: the
/// control for the probes during runs. On a machine whose cores the
/// server, the database and the probe share, it is what any job that keeps
/// one core busy costs the webhook, whatever it does with the core.
fn probe_beside_a_busy_core(stack: &Stack, n: usize) -> Vec<Duration> {
    let stop = Arc::new(AtomicBool::new(false));
    let spinner = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        })
    };
    let v = insert_loop(
        &stack.rest_url,
        &stack.key,
        &AtomicBool::new(false),
        Some(n),
        None,
    );
    stop.store(true, Ordering::SeqCst);
    spinner.join().expect("the spinner");
    remove_probe_rows(stack);
    v.into_iter().map(|(_, d)| d).collect()
}

/// Runs usage-agg with the probe inserting beside it from before the run
/// starts until it ends (the probe thread is stopped and joined when the
/// process has been waited for). Returns the run and the latencies of the
/// inserts that started and ended within it.
fn probe_during(bin: &Path, stack: &Stack, args: &[String], what: &str) -> (Run, Vec<Duration>) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let handle = {
        let (url, key, stop) = (stack.rest_url.clone(), stack.key.clone(), stop.clone());
        std::thread::spawn(move || insert_loop(&url, &key, &stop, None, Some(tx)))
    };
    // The probe's connection is open and warm before the run starts.
    rx.recv().expect("the webhook probe's first insert");
    let before = max_id(stack);
    let running = spawn_cli(bin, &stack.env(), args);
    let started = running.started;
    let run = running.wait();
    let ended = started + run.wall;
    stop.store(true, Ordering::SeqCst);
    let samples = handle.join().expect("the webhook probe");
    let run = run.ok();
    check_totals(stack, before, what);
    let during: Vec<Duration> = samples
        .into_iter()
        .filter(|(s, d)| *s >= started && *s + *d <= ended)
        .map(|(_, d)| d)
        .collect();
    remove_probe_rows(stack);
    (run, during)
}

/// The probe's rows out of the table again: the next measurements see the
/// dataset alone.
fn remove_probe_rows(stack: &Stack) {
    let mut db = stack.sql();
    db.execute(
        "DELETE FROM usage_requests WHERE portal_id = $1",
        &[&PROBE_PORTAL],
    )
    .unwrap();
    db.batch_execute("VACUUM ANALYZE usage_requests").unwrap();
}

// ---------------------------------------------------------------------------
// usage_current

/// usage_current's cost for one portal's month, with `tail` good rows above
/// the cursor (no run has counted them), on top of all the history: the
/// function reads the primary key's range above the cursor, so its time
/// should follow the tail, not the history. Baseline: the same portal's
/// rows counted from the whole table (what a quota check without it does).
fn usage_current_cost(stack: &Stack, runs: usize) -> Vec<(i64, Duration, Duration)> {
    let mut db = stack.sql();
    reset(stack, Some(max_id(stack)));
    let mut out = Vec::new();
    let mut inserted = 0;
    for tail in [0i64, 1_000, 100_000] {
        stack::insert_sample_rows(&mut db, tail - inserted, PORTALS, &["2025-07"]);
        inserted = tail;
        let time = |db: &mut postgres::Client, sql: &str| {
            let mut v: Vec<Duration> = (0..runs.max(5))
                .map(|_| {
                    let started = Instant::now();
                    db.query_one(sql, &[]).unwrap();
                    started.elapsed()
                })
                .collect();
            v.sort();
            v[v.len() / 2]
        };
        let current = time(&mut db, "SELECT * FROM usage_current(1042, '2025-07')");
        let scan = time(
            &mut db,
            "SELECT count(*) FROM usage_requests WHERE portal_id = 1042 AND month_year = '2025-07'",
        );
        out.push((tail, current, scan));
    }
    out
}

/// usage_portal_summary's cost for one portal, by the months asked for
/// and the good rows above the cursor (`tail`), with every key counted up
/// to the cursor: it reads the window's monthly rows and adjustments by
/// index, and usage_current's range of the primary key above the cursor,
/// so its time should follow months + tail, not history. Baseline: the
/// same portal's months counted from the raw rows (what an app without it
/// does). Returns (tail, months, summary, baseline).
fn portal_summary_cost(stack: &Stack, runs: usize) -> Vec<(i64, i32, Duration, Duration)> {
    let mut db = stack.sql();
    let counted = max_id(stack);
    counted_upto(stack, counted);
    let mut out = Vec::new();
    let mut inserted = 0;
    for tail in [0i64, 1_000, 100_000] {
        stack::insert_sample_rows(&mut db, tail - inserted, PORTALS, &["2025-07"]);
        inserted = tail;
        let time = |db: &mut postgres::Client, sql: &str| {
            let mut v: Vec<Duration> = (0..runs.max(5))
                .map(|_| {
                    let started = Instant::now();
                    db.query_one(sql, &[]).unwrap();
                    started.elapsed()
                })
                .collect();
            v.sort();
            v[v.len() / 2]
        };
        let baseline = time(
            &mut db,
            "SELECT count(*) FROM (SELECT month_year, count(*), count(*) FILTER (WHERE success)
                                     FROM usage_requests WHERE portal_id = 1042 GROUP BY 1) m",
        );
        for months in [12, 24, 240] {
            let t = time(
                &mut db,
                &format!("SELECT usage_portal_summary(1042, {months})"),
            );
            out.push((tail, months, t, baseline));
        }
    }
    // What it answered is what the rows say.
    let v: serde_json::Value = serde_json::from_str(
        &db.query_one("SELECT usage_portal_summary(1042, 240)::text", &[])
            .unwrap()
            .get::<_, String>(0),
    )
    .unwrap();
    let stored: i64 = v["months"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["requests"].as_i64().unwrap())
        .sum();
    let truth: i64 = db
        .query_one(
            "SELECT count(*) FROM usage_requests WHERE portal_id = 1042 AND id <= $1::bigint",
            &[&counted],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        stored, truth,
        "usage_portal_summary's months against the raw rows"
    );
    out
}

fn print_summary_cost(rows: &[(i64, i32, Duration, Duration)]) {
    for (tail, months, t, baseline) in rows {
        println!(
            "| usage_portal_summary, one portal, {months} months, {tail} rows above the cursor (its months counted from the raw rows: {:.1} ms) | {:.2} ms |",
            ms(*baseline),
            ms(*t)
        );
    }
}

// ---------------------------------------------------------------------------
// The machine

fn machine(bin: &Path, cluster: &Cluster) -> Vec<String> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "model not reported".into());
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let pg: String = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls)
        .and_then(|mut c| c.query_one("SELECT version()", &[]))
        .map(|r| r.get(0))
        .unwrap_or_else(|_| "unknown".into());
    let postrust = stack::postrust_bin();
    let postrust_version = postrust
        .components()
        .filter_map(|c| c.as_os_str().to_str())
        .find_map(|c| c.strip_prefix("postrust-"))
        .map(|v| format!("postrust-server {v}"))
        .unwrap_or_else(|| "postrust-server, version unknown (POSTRUST_BIN)".into());
    let cli_version = Command::new(bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(stack::repo_root())
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    vec![
        format!("- {cpus} CPUs ({model}), {:.1} GiB of memory, Linux {kernel}", mem_kib as f64 / 1048576.0),
        format!("- load average at the start: {}", read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")),
        format!("- {pg}; a private cluster on this machine, fsync off"),
        format!("- {postrust_version} as the REST server, max_rows {PAGE} (Supabase's default)"),
        format!(
            "- {cli_version} ({}); the benchmark ran from a checkout at commit {commit}{}",
            bin.display(),
            if dirty { " with uncommitted changes" } else { "" },
        ),
        "- the server, the database, the CLI and the webhook probe share these CPUs: HTTP figures measure the whole stack".into(),
    ]
}

// ---------------------------------------------------------------------------
// The report

/// One line of the ratio table.
struct Ratio {
    name: String,
    value: Option<f64>,
    target: String,
    /// None: for reference, no target.
    met: Option<bool>,
    digits: usize,
}

fn ratio(name: impl Into<String>, value: f64, target: f64) -> Ratio {
    Ratio {
        name: name.into(),
        value: Some(value),
        target: format!("<= {target}"),
        met: Some(value <= target),
        digits: 3,
    }
}

fn reference(name: impl Into<String>, value: f64) -> Ratio {
    Ratio {
        name: name.into(),
        value: Some(value),
        target: "(for reference)".into(),
        met: None,
        digits: 3,
    }
}

fn not_run(name: impl Into<String>, target: &str, why: &str) -> Ratio {
    Ratio {
        name: name.into(),
        value: None,
        target: format!("{target} ({why})"),
        met: None,
        digits: 3,
    }
}

fn print_ratios(rows: &[Ratio]) {
    println!("| ratio | value | target |");
    println!("|---|---|---|");
    for r in rows {
        let value = match r.value {
            Some(v) if v.is_finite() => format!("{v:.*}", r.digits),
            Some(_) => "n/a".into(),
            None => "not run".into(),
        };
        let mark = match r.met {
            Some(true) => " (met)",
            Some(false) => " (MISSED)",
            None => "",
        };
        println!("| {} | {value} | {}{mark} |", r.name, r.target);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The RPC runs on the slowed instance.
struct Slowed {
    rows: i64,
    keys: i64,
    one_batch: Duration,
    /// Each run, and whether its totals were checked right (only a run
    /// that exited 0 is checked).
    runs: Vec<(Run, bool)>,
}

/// One point of the WAN curve.
struct WanPoint {
    c: usize,
    engine: Duration,
    transport: Duration,
    /// The run's requests by method and path.
    routes: std::collections::BTreeMap<String, usize>,
}

fn main() {
    let a = args();
    let bin = a.bin.clone();
    let (speed, speed_notes) = speed_flags(&bin);
    for n in &speed_notes {
        eprintln!("bench: note: {n}");
    }
    let c_str = a.concurrency.to_string();
    // The engine as fast as it goes, at the benchmark's concurrency.
    let fast = |extra: &[&str]| {
        let mut v: Vec<&str> = speed.clone();
        v.extend(["--concurrency", &c_str, "--json"]);
        v.extend(extra);
        agg(&v)
    };
    // How the speed runs are spelled in the report.
    let fast_label = format!("{} --concurrency {}", speed.join(" "), a.concurrency)
        .trim()
        .to_string();

    eprintln!("bench: starting a private PostgreSQL 15 and postrust...");
    let cluster = Cluster::start();
    let machine = machine(&bin, &cluster);
    let main_ds = dataset(&cluster, a.rows, PORTALS, &MONTHS);
    let rows = a.rows;
    if a.only_reads {
        eprintln!("bench: usage_current");
        let current = usage_current_cost(&main_ds, a.runs);
        eprintln!("bench: usage_portal_summary");
        let summary = portal_summary_cost(&main_ds, a.runs);
        println!("# usage-agg benchmark: the reads an app makes (--only-reads)\n");
        for line in &machine {
            println!("{line}");
        }
        println!("\nRerun: `{}`", a.rerun());
        println!(
            "\n{rows} rows, {PORTALS} portals, months {}; median of {} calls each.\n",
            MONTHS.join(", "),
            a.runs.max(5)
        );
        println!("| what | time |\n|---|---|");
        for (tail, t, scan) in &current {
            println!(
                "| usage_current, one portal-month, {tail} rows above the cursor (whole-table count of it: {:.1} ms) | {:.2} ms |",
                ms(*scan),
                ms(*t)
            );
        }
        print_summary_cost(&summary);
        discard(&cluster, main_ds);
        return;
    }
    let keys = distinct_keys(&main_ds);

    // 1-3. The REST engine's full run (from an empty monthly table: the
    // first rebuild, every key written) against the transport alone at the
    // same concurrency, alternated so that the machine's other load falls
    // on both alike.
    let upto = max_id(&main_ds);
    let (mut fetch, mut rest, mut cpu_per_row) = (Timing::default(), Timing::default(), Vec::new());
    let mut rss_rows = 0;
    let mut fetched_bytes = 0;
    for i in 0..a.runs {
        eprintln!(
            "bench: transport and full run at concurrency {} ({}/{})",
            a.concurrency,
            i + 1,
            a.runs
        );
        let f = transport(&main_ds.rest_url, &main_ds.key, 0, upto, a.concurrency);
        assert_eq!(
            f.rows as i64, rows,
            "the transport fetch must see every row"
        );
        fetch.push(f.took);
        fetched_bytes = f.bytes;
        reset(&main_ds, None);
        let r = run_cli(&bin, &main_ds.env(), &fast(&[])).ok();
        assert_eq!(
            r.mode(),
            "first_rebuild",
            "a run from nothing is the first rebuild"
        );
        assert_eq!(
            r.rows_read() as i64,
            rows,
            "the full run reads every row once"
        );
        check_totals(&main_ds, upto, "REST full run");
        rest.push(r.wall);
        cpu_per_row.push(r.cpu_us_per_row());
        rss_rows = rss_rows.max(r.rss_kib);
    }
    cpu_per_row.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let cpu_us = cpu_per_row[cpu_per_row.len() / 2];

    // 7. The webhook probe: idle, then during each engine's run.
    eprintln!("bench: webhook probe, idle ({} inserts)", a.probe_inserts);
    let idle = probe_idle(&main_ds, a.probe_inserts);
    eprintln!("bench: webhook probe beside one busy core (the control)");
    let busy_core = probe_beside_a_busy_core(&main_ds, a.probe_inserts);
    eprintln!("bench: webhook probe during a full REST run, default flags");
    reset(&main_ds, None);
    let (_, during_rest) = probe_during(
        &bin,
        &main_ds,
        &agg(&["--json"]),
        "REST full run beside the probe",
    );
    eprintln!("bench: webhook probe during a full REST run, {fast_label}");
    reset(&main_ds, None);
    let (_, during_fast) = probe_during(
        &bin,
        &main_ds,
        &fast(&[]),
        "fast REST full run beside the probe",
    );
    eprintln!("bench: webhook probe during an RPC catch-up of every row");
    reset(&main_ds, Some(0));
    let rpc_default: Vec<String> = ["aggregate", "--env", "dev", "--engine", "rpc", "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    // The RPC engine as fast as it goes (no pause between batches), for
    // the comparison with bare SQL.
    let rpc_fast: Vec<String> = rpc_default
        .iter()
        .cloned()
        .chain(speed.iter().map(|f| f.to_string()))
        .collect();
    let (_, during_rpc) = probe_during(
        &bin,
        &main_ds,
        &rpc_default,
        "RPC catch-up beside the probe",
    );

    // 9. The RPC engine over every row against bare SQL, alternated.
    let rpc_label = format!("--engine rpc {}", speed.join(" "))
        .trim()
        .to_string();
    let (mut rpc, mut sql) = (Timing::default(), Timing::default());
    let mut rpc_batches = None;
    for i in 0..a.runs {
        eprintln!("bench: RPC engine and bare SQL ({}/{})", i + 1, a.runs);
        reset(&main_ds, Some(0));
        let r = run_cli(&bin, &main_ds.env(), &rpc_fast).ok();
        assert_eq!(r.rows_read() as i64, rows, "the RPC run counts every row");
        check_totals(&main_ds, upto, "RPC catch-up");
        rpc_batches = r.json()["batches"].as_u64().or(rpc_batches);
        rpc.push(r.wall);
        sql.push(bare_sql(&main_ds));
    }
    let batch_1m = one_batch_in_sql(&main_ds, 1_000_000);

    // 4. An incremental catch-up of the second half against a --full
    // rebuild of all rows, with the same flags, per row read; alternated.
    let half: i64 = main_ds
        .sql()
        .query_one(
            "SELECT id::bigint FROM usage_requests ORDER BY id OFFSET $1 LIMIT 1",
            &[&(rows / 2 - 1)],
        )
        .unwrap()
        .get(0);
    let backlog = rows - rows / 2;
    // A table of `backlog` rows, for a --full over as many rows as the
    // catch-up reads.
    let same_n = dataset(&cluster, backlog, PORTALS, &MONTHS);
    run_cli(&bin, &same_n.env(), &fast(&[])).ok();
    let mut full_same_n = Timing::default();
    let (mut incr, mut full) = (Timing::default(), Timing::default());
    let (mut incr_rows, mut full_rows) = (0u64, 0u64);
    for i in 0..a.runs {
        eprintln!(
            "bench: incremental catch-up of {backlog} rows and --full over {rows} ({}/{})",
            i + 1,
            a.runs
        );
        counted_upto(&main_ds, half);
        let r = run_cli(&bin, &main_ds.env(), &fast(&[])).ok();
        assert_eq!(r.mode(), "incremental");
        incr_rows = r.rows_read();
        assert_eq!(
            incr_rows as i64, backlog,
            "the catch-up reads the backlog only"
        );
        check_totals(&main_ds, upto, "incremental catch-up");
        incr.push(r.wall);
        let r = run_cli(&bin, &main_ds.env(), &fast(&["--full"])).ok();
        assert_eq!(r.mode(), "full_rebuild");
        full_rows = r.rows_read();
        assert_eq!(full_rows as i64, rows, "--full reads every row");
        check_totals(&main_ds, upto, "--full rebuild");
        full.push(r.wall);
        let r = run_cli(&bin, &same_n.env(), &fast(&["--full"])).ok();
        assert_eq!(r.rows_read() as i64, backlog, "--full reads every row");
        check_totals(&same_n, max_id(&same_n), "--full rebuild over as many rows");
        full_same_n.push(r.wall);
    }
    discard(&cluster, same_n);

    // 5. A dry run beside a cron-like run over the same backlog, against
    // the dry run alone (default flags for both, as cron and a person run
    // them).
    let dry: Vec<String> = agg(&["--dry-run", "--force", "--quiet"]);
    let cron: Vec<String> = agg(&["--json"]);
    let (mut alone, mut beside) = (Timing::default(), Timing::default());
    counted_upto(&main_ds, half);
    for i in 0..a.runs {
        eprintln!("bench: dry run alone ({}/{})", i + 1, a.runs);
        alone.push(run_cli(&bin, &main_ds.env(), &dry).ok().wall);
    }
    for i in 0..a.runs {
        eprintln!(
            "bench: dry run beside a cron-like run ({}/{})",
            i + 1,
            a.runs
        );
        counted_upto(&main_ds, half);
        let cron_run = spawn_cli(&bin, &main_ds.env(), &cron);
        let dry_run = spawn_cli(&bin, &main_ds.env(), &dry);
        let (cron_run, dry_run) = (cron_run.wait(), dry_run.wait());
        cron_run.ok();
        beside.push(dry_run.ok().wall);
        check_totals(&main_ds, upto, "cron-like run beside a dry run");
    }

    // 6. The WAN: the REST engine through the latency proxy at each
    // concurrency, with the transport alone through it for reference.
    let wan_ds_own = (a.wan_rows != rows).then(|| dataset(&cluster, a.wan_rows, PORTALS, &MONTHS));
    let wan_ds = wan_ds_own.as_ref().unwrap_or(&main_ds);
    let wan_upto = max_id(wan_ds);
    let wan_count = count_rows(wan_ds);
    let each_way = Duration::from_millis(a.wan_delay_ms);
    let proxy = LatencyProxy::start(&wan_ds.rest_url, each_way);
    let wan_env: Vec<(String, String)> = wan_ds
        .env()
        .into_iter()
        .map(|(k, v)| {
            if v == wan_ds.rest_url {
                (k, proxy.url.clone())
            } else {
                (k, v)
            }
        })
        .collect();
    let mut wan = Vec::new();
    for c in WAN_LEVELS {
        eprintln!(
            "bench: WAN ({} ms each way), concurrency {c}",
            a.wan_delay_ms
        );
        reset(wan_ds, None);
        let cs = c.to_string();
        let mut v: Vec<&str> = speed.clone();
        v.extend(["--concurrency", &cs, "--json"]);
        let before = proxy.requests_by_route();
        let r = run_cli(&bin, &wan_env, &agg(&v)).ok();
        let mut routes = proxy.requests_by_route();
        for (k, n) in &before {
            *routes.get_mut(k).unwrap() -= n;
        }
        routes.retain(|_, n| *n > 0);
        assert_eq!(
            r.rows_read() as i64,
            wan_count,
            "the WAN run reads every row"
        );
        check_totals(wan_ds, wan_upto, "WAN run");
        let f = transport(&proxy.url, &wan_ds.key, 0, wan_upto, c);
        assert_eq!(
            f.rows as i64, wan_count,
            "the transport through the proxy sees every row"
        );
        wan.push(WanPoint {
            c,
            engine: r.wall,
            transport: f.took,
            routes,
        });
    }
    drop(proxy);
    if let Some(ds) = wan_ds_own {
        discard(&cluster, ds);
    }

    // 11. usage_current and usage_portal_summary, last on this dataset:
    // they leave rows above the cursor.
    eprintln!("bench: usage_current");
    let current = usage_current_cost(&main_ds, a.runs);
    eprintln!("bench: usage_portal_summary");
    let summary = portal_summary_cost(&main_ds, a.runs);
    discard(&cluster, main_ds);

    // 10. Peak RSS at a tenth of the rows (same portals and months: same keys).
    let small_rows = rows / 10;
    let small = dataset(&cluster, small_rows, PORTALS, &MONTHS);
    let small_upto = max_id(&small);
    let small_keys = distinct_keys(&small);
    let mut rss_small = 0;
    for i in 0..a.runs {
        eprintln!(
            "bench: peak RSS at {small_rows} rows ({}/{})",
            i + 1,
            a.runs
        );
        reset(&small, None);
        let r = run_cli(&bin, &small.env(), &fast(&[])).ok();
        check_totals(&small, small_upto, "REST full run, a tenth of the rows");
        rss_small = rss_small.max(r.rss_kib);
    }
    discard(&cluster, small);

    // 8. The RPC engine on a slowed instance: the roles the REST server
    // logs in and runs as get a 2 s statement timeout (new connections:
    // the server is restarted), over a dataset where every row is a key of
    // its own, so a batch of the default 1,000,000 ids writes as many keys.
    eprintln!("bench: RPC on a slowed instance ({SLOW_TIMEOUT} statement timeout)");
    let slow_rows = rows;
    let mut slow_ds = dataset(&cluster, slow_rows, slow_rows, &["2025-07"]);
    let slow_keys = distinct_keys(&slow_ds);
    let one_batch = one_batch_in_sql(&slow_ds, SLOW_PROBE_BATCH);
    let db = database_name(&slow_ds);
    slow_ds
        .sql()
        .batch_execute(&format!(
            "ALTER ROLE authenticator IN DATABASE {db} SET statement_timeout = '{SLOW_TIMEOUT}';
             ALTER ROLE service_role IN DATABASE {db} SET statement_timeout = '{SLOW_TIMEOUT}';"
        ))
        .unwrap();
    slow_ds.reload_schema(); // a restart: every connection new, with the timeout
    let seen: String = {
        let url = slow_ds
            .database_url
            .replacen("postgres@", "authenticator@", 1);
        postgres::Client::connect(&url, postgres::NoTls)
            .unwrap()
            .query_one("SHOW statement_timeout", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(
        seen, SLOW_TIMEOUT,
        "the REST server's role must have the timeout"
    );
    let slow_upto = max_id(&slow_ds);
    // Several runs: whether a run survives the timeout may depend on timing.
    let slow_runs = (0..a.runs)
        .map(|i| {
            eprintln!("bench: RPC on the slowed instance ({}/{})", i + 1, a.runs);
            reset(&slow_ds, Some(0));
            let run = run_cli(&bin, &slow_ds.env(), &rpc_default);
            let totals_ok = run.code == 0 && {
                check_totals(&slow_ds, slow_upto, "RPC on the slowed instance");
                true
            };
            (run, totals_ok)
        })
        .collect();
    let slowed = Slowed {
        rows: slow_rows,
        keys: slow_keys,
        one_batch,
        runs: slow_runs,
    };
    discard(&cluster, slow_ds);

    // 10. With --big: the same at big_rows rows.
    let big = a.big.then(|| {
        let big_ds = dataset(&cluster, a.big_rows, PORTALS, &MONTHS);
        let big_upto = max_id(&big_ds);
        eprintln!("bench: REST full run at {} rows", a.big_rows);
        reset(&big_ds, None);
        let r = run_cli(&bin, &big_ds.env(), &fast(&[])).ok();
        check_totals(&big_ds, big_upto, "REST full run, big");
        let (mut rpc, mut sql) = (Timing::default(), Timing::default());
        for i in 0..a.runs {
            eprintln!(
                "bench: RPC engine and bare SQL at {} rows ({}/{})",
                a.big_rows,
                i + 1,
                a.runs
            );
            reset(&big_ds, Some(0));
            let rr = run_cli(&bin, &big_ds.env(), &rpc_fast).ok();
            check_totals(&big_ds, big_upto, "RPC catch-up, big");
            rpc.push(rr.wall);
            sql.push(bare_sql(&big_ds));
        }
        discard(&cluster, big_ds);
        (r.wall, r.rss_kib, rpc, sql)
    });
    let load_end = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    drop(cluster);

    // The report.
    let rerun = a.rerun();
    println!("# usage-agg benchmark\n");
    println!("## The machine\n");
    for l in &machine {
        println!("{l}");
    }
    println!(
        "- load average at the end: {}",
        load_end
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("\nRerun: `{rerun}`\n");
    println!(
        "Dataset: {rows} raw rows, {PORTALS} portals, {} months ({keys} portal-months), about 5% errors; \
         pages of {PAGE} rows, the server's cap {PAGE}; {} runs of each short measurement (median, min, max). \
         \"Speed\" runs: `{fast_label}`.",
        MONTHS.len(),
        a.runs,
    );
    for n in &speed_notes {
        println!("\n**Note:** {n}.");
    }

    println!("\n## Figures\n");
    println!("| measurement | time |");
    println!("|---|---|");
    let c = a.concurrency;
    println!(
        "| transport alone: {c} keyset streams over {c} id ranges, bytes read ({:.1} MB), nothing parsed | {} |",
        fetched_bytes as f64 / 1e6,
        fetch.show()
    );
    println!(
        "| REST engine, full run from an empty monthly table (first rebuild), {fast_label} | {} |",
        rest.show()
    );
    println!("| its client CPU (user + system) per raw row, median | {cpu_us:.3} µs |");
    println!(
        "| REST engine, incremental catch-up of {backlog} new rows (the first {} counted), same flags | {} |",
        rows / 2,
        incr.show()
    );
    println!(
        "| REST engine, --full over all {rows} rows, same flags | {} |",
        full.show()
    );
    println!(
        "| REST engine, --full over a table of {backlog} rows, same flags | {} |",
        full_same_n.show()
    );
    println!(
        "| dry run (--dry-run --force), default flags, alone, over the {backlog}-row backlog | {} |",
        alone.show()
    );
    println!(
        "| the same dry run beside a cron-like run (`aggregate`, default flags) started with it | {} |",
        beside.show()
    );
    println!(
        "| RPC engine, catch-up of every row, `{}` (batches: {}) | {} |",
        rpc_label,
        rpc_batches.map_or("n/a".into(), |b| b.to_string()),
        rpc.show()
    );
    println!(
        "| bare SQL INSERT ... SELECT ... GROUP BY ... ON CONFLICT | {} |",
        sql.show()
    );
    println!(
        "| one RPC batch of 1,000,000 ids (in SQL, no HTTP) | {:.3} s |",
        batch_1m.as_secs_f64()
    );
    println!("| peak RSS, REST full run, {rows} rows ({keys} portal-months) | {rss_rows} KiB |");
    println!("| peak RSS, REST full run, {small_rows} rows ({small_keys} portal-months) | {rss_small} KiB |");
    if let Some((t, rss, rpc, sql)) = &big {
        let n = a.big_rows;
        println!(
            "| REST full run, {n} rows (once) | {:.3} s |",
            t.as_secs_f64()
        );
        println!("| peak RSS, REST full run, {n} rows | {rss} KiB |");
        println!(
            "| RPC engine, catch-up of {n} rows, `{rpc_label}` | {} |",
            rpc.show()
        );
        println!("| bare SQL, {n} rows | {} |", sql.show());
    }
    for (tail, t, scan) in &current {
        println!(
            "| usage_current, one portal-month, {tail} rows above the cursor (whole-table count of it: {:.1} ms) | {:.2} ms |",
            ms(*scan),
            ms(*t)
        );
    }
    print_summary_cost(&summary);

    // The ratios.
    let mut ratios = vec![
        ratio(
            format!("REST full run / transport alone, both at concurrency {c} (median / median)"),
            rest.median() / fetch.median(),
            1.2,
        ),
        ratio(
            format!("REST full run / transport alone, both at concurrency {c} (best / best)"),
            rest.min() / fetch.min(),
            1.2,
        ),
        reference(
            format!("REST --full (keys already right) / transport alone, concurrency {c} (median / median)"),
            full.median() / fetch.median(),
        ),
        Ratio {
            name: "client CPU per raw row, REST full run (µs)".into(),
            value: Some(cpu_us),
            target: "<= 0.5".into(),
            met: Some(cpu_us <= 0.5),
            digits: 3,
        },
        ratio(
            format!("incremental catch-up of {backlog} rows / --full over a table of {backlog} rows"),
            incr.median() / full_same_n.median(),
            1.1,
        ),
        ratio(
            format!("incremental catch-up per row ({backlog} rows) / --full per row ({rows} rows)"),
            (incr.median() / incr_rows as f64) / (full.median() / full_rows as f64),
            1.1,
        ),
        ratio(
            "dry run beside a cron-like run / alone (median / median)",
            beside.median() / alone.median(),
            2.0,
        ),
        ratio("RPC engine / bare SQL", rpc.median() / sql.median(), 1.5),
        ratio(
            if keys == small_keys {
                format!("RSS({rows}) / RSS({small_rows})")
            } else {
                format!("RSS({rows}) / RSS({small_rows}) (not the same keys: {keys} and {small_keys})")
            },
            rss_rows as f64 / rss_small as f64,
            1.1,
        ),
    ];
    match &big {
        Some((_, rss, rpc, sql)) => {
            ratios.push(ratio(
                format!("RSS({}) / RSS({rows})", a.big_rows),
                *rss as f64 / rss_rows as f64,
                1.1,
            ));
            ratios.push(ratio(
                format!("RPC engine / bare SQL at {} rows", a.big_rows),
                rpc.median() / sql.median(),
                1.3,
            ));
        }
        None => {
            ratios.push(not_run(
                format!("RSS({}) / RSS({rows})", a.big_rows),
                "<= 1.1",
                "use --big",
            ));
            ratios.push(not_run(
                format!("RPC engine / bare SQL at {} rows", a.big_rows),
                "<= 1.3",
                "use --big",
            ));
        }
    }
    println!("\n## Ratios\n");
    print_ratios(&ratios);

    // The webhook probe.
    let p99_idle = percentile_ms(&idle, 0.99);
    println!("\n## Webhook inserts beside the runs\n");
    println!(
        "Sequential single-row inserts through the REST API (`POST /usage_requests`, `Prefer: return=minimal`, \
         portal {PROBE_PORTAL}, month 2025-07), straight to the REST server; during a run, the inserts that \
         started and ended within it. Each run once.\n"
    );
    println!("| while | inserts | p50 | p99 | p99 / idle p99 | target |");
    println!("|---|---|---|---|---|---|");
    let line = |what: &str, v: &[Duration], target: Option<f64>| {
        let p99 = percentile_ms(v, 0.99);
        let r = p99 / p99_idle;
        let t = match target {
            Some(t) if r.is_finite() => {
                format!("<= {t} ({})", if r <= t { "met" } else { "MISSED" })
            }
            Some(t) => format!("<= {t} (no inserts within the run)"),
            None => "(for reference)".into(),
        };
        println!(
            "| {what} | {} | {:.2} ms | {p99:.2} ms | {r:.2} | {t} |",
            v.len(),
            percentile_ms(v, 0.5),
        );
    };
    println!(
        "| idle | {} | {:.2} ms | {p99_idle:.2} ms | 1 | |",
        idle.len(),
        percentile_ms(&idle, 0.5)
    );
    line(
        "one CPU kept busy by a spinning thread, nothing else (the control: what keeping one core busy costs here)",
        &busy_core,
        None,
    );
    line("a full REST run, default flags", &during_rest, Some(2.0));
    line(
        &format!("a full REST run, {fast_label}"),
        &during_fast,
        None,
    );
    line(
        &format!("an RPC catch-up of all {rows} rows, default flags"),
        &during_rpc,
        Some(2.0),
    );

    // The WAN curve.
    let rtt = 2 * a.wan_delay_ms;
    let wan_label = format!("{} --concurrency N", speed.join(" "))
        .trim()
        .to_string();
    let pages = (a.wan_rows + i64::from(PAGE) - 1) / i64::from(PAGE);
    println!(
        "\n## Through a WAN ({} ms added each way, round trip {rtt} ms)\n",
        a.wan_delay_ms
    );
    println!(
        "The REST engine's full run from an empty monthly table, `{wan_label}`, over {} rows ({pages} pages), \
         through a latency-injecting proxy (keep-alive, every connection on its own thread); model = pages x \
         round trip / concurrency. The transport alone through the same proxy, at the same concurrency, for \
         reference. Each once.\n",
        a.wan_rows
    );
    println!("| concurrency | run time | model | run / model | target | transport alone | run / transport | requests |");
    println!("|---|---|---|---|---|---|---|---|");
    let fastest = wan
        .iter()
        .map(|p| p.engine.as_secs_f64())
        .fold(f64::INFINITY, f64::min);
    for p in &wan {
        let model = pages as f64 * rtt as f64 / 1000.0 / p.c as f64;
        let r = p.engine.as_secs_f64() / model;
        println!(
            "| {} | {:.3} s | {model:.3} s | {r:.3} | <= 1.3 ({}) | {:.3} s | {:.3} | {} |",
            p.c,
            p.engine.as_secs_f64(),
            if r <= 1.3 { "met" } else { "MISSED" },
            p.transport.as_secs_f64(),
            p.engine.as_secs_f64() / p.transport.as_secs_f64(),
            p.routes.values().sum::<usize>()
        );
    }
    if let Some(knee) = wan.iter().find(|p| p.engine.as_secs_f64() <= 1.1 * fastest) {
        println!(
            "\nThe knee: concurrency {} is the lowest within 10% of the fastest run ({fastest:.3} s).",
            knee.c
        );
    }
    if let Some(p) = wan.iter().find(|p| p.c == c).or(wan.last()) {
        let pages_read = p.routes.get("GET /usage_requests").copied().unwrap_or(0);
        let others: Vec<String> = p
            .routes
            .iter()
            .filter(|(k, _)| k.as_str() != "GET /usage_requests")
            .map(|(k, n)| format!("`{k}` {n}"))
            .collect();
        println!(
            "\nThe run at concurrency {}: {pages_read} pages of raw rows, and {} other requests ({}), each a round trip.",
            p.c,
            p.routes.values().sum::<usize>() - pages_read,
            others.join(", ")
        );
    }

    // The slowed instance.
    println!("\n## RPC on a slowed instance\n");
    println!(
        "statement_timeout = '{SLOW_TIMEOUT}' on the roles the REST server logs in and runs as (authenticator, \
         service_role; new connections), {} rows that are {} keys (one per row: a batch of ids writes as many \
         keys), `aggregate --engine rpc --json` with default flags (the batch size its own); one \
         batch of {SLOW_PROBE_BATCH} ids takes {:.3} s there in SQL without the timeout. {} runs; \"n/a\": the \
         summary has no such field.\n",
        slowed.rows,
        slowed.keys,
        slowed.one_batch.as_secs_f64(),
        slowed.runs.len()
    );
    println!("| run | exit status | totals right (SQL) | run time | batches | longest batch | batches halved |");
    println!("|---|---|---|---|---|---|---|");
    let mut longest_all: Option<f64> = None;
    for (i, (run, totals_ok)) in slowed.runs.iter().enumerate() {
        let j: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_default();
        let field = |k: &str| -> String {
            match &j[k] {
                serde_json::Value::Null => "n/a".into(),
                other => other.to_string(),
            }
        };
        let longest = j["batch_seconds_max"].as_f64();
        if let Some(l) = longest {
            longest_all = Some(longest_all.map_or(l, |m: f64| m.max(l)));
        }
        println!(
            "| {} | {} | {} | {:.3} s | {} | {} | {} |",
            i + 1,
            run.code,
            if *totals_ok {
                "yes"
            } else {
                "not checked: the run failed"
            },
            run.wall.as_secs_f64(),
            field("batches"),
            longest.map_or("n/a".into(), |s| format!("{s:.3} s")),
            field("batches_halved"),
        );
    }
    let all_ok = slowed.runs.iter().all(|(r, ok)| r.code == 0 && *ok);
    println!();
    print_ratios(&[
        Ratio {
            name: "runs that exited 0 with the right totals".into(),
            value: Some(
                slowed
                    .runs
                    .iter()
                    .filter(|(r, ok)| r.code == 0 && *ok)
                    .count() as f64,
            ),
            target: format!("all {}", slowed.runs.len()),
            met: Some(all_ok),
            digits: 0,
        },
        match longest_all {
            Some(l) => Ratio {
                name: "longest batch of any run (s)".into(),
                value: Some(l),
                target: format!("<= 1 (the --batch-seconds aim; the timeout is {SLOW_TIMEOUT})"),
                met: Some(l <= 1.0),
                digits: 3,
            },
            None => Ratio {
                name: "longest batch of any run (s)".into(),
                value: Some(f64::NAN),
                target: "<= 1 (no batch_seconds_max in the summary)".into(),
                met: None,
                digits: 3,
            },
        },
    ]);
    if let Some((run, _)) = slowed.runs.iter().find(|(r, _)| r.code != 0) {
        let tail: Vec<&str> = run.stderr.lines().collect();
        println!(
            "\nThe first failed run's stderr ended:\n\n```\n{}\n```",
            tail[tail.len().saturating_sub(10)..].join("\n")
        );
    }
    println!("\nRerun: `{rerun}`");
}
