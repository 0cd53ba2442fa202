//! usage-agg's benchmark: builds datasets with SQL on a private stack, times
//! the engines against baselines measured in the same run, records peak RSS,
//! and prints ratios. Run it with `scripts/bench` (release build).
//!
//!     bench --bin target/release/usage-agg [--rows 1000000] [--runs 3]
//!
//! Baselines: a bare page-fetch loop over the same pages with no
//! aggregation (the cost of the transport alone), and bare SQL
//! `INSERT ... SELECT ... GROUP BY ... ON CONFLICT` (the floor).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use stack::{Cluster, Stack};

/// Rows per page for every HTTP scan: the server's cap is raised to match
/// (Supabase allows it), so the engine and the baseline page alike.
const PAGE: u32 = 10_000;
const MIGRATIONS: [&str; 4] = [
    "supabase/migrations/20261127120000_usage_agg_incremental.sql",
    "supabase/migrations/20261130120000_usage_agg_trust.sql",
    "supabase/migrations/20261201090000_usage_agg_periods.sql",
    "supabase/migrations/20261201100000_usage_agg_schedule.sql",
];

struct Args {
    bin: PathBuf,
    rows: i64,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        bin: PathBuf::from("target/release/usage-agg"),
        rows: 1_000_000,
        runs: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{x} takes a value"));
        match x.as_str() {
            "--bin" => a.bin = PathBuf::from(val()),
            "--rows" => a.rows = val().parse().expect("--rows N"),
            "--runs" => a.runs = val().parse().expect("--runs N"),
            other => {
                panic!("unknown argument {other}; usage: bench [--bin PATH] [--rows N] [--runs N]")
            }
        }
    }
    a
}

/// Median and spread of several timings.
struct Timing(Vec<Duration>);

impl Timing {
    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    }

    fn show(&self) -> String {
        let v: Vec<f64> = self.0.iter().map(Duration::as_secs_f64).collect();
        let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        format!(
            "{:.3} s (min {:.3}, max {:.3}, n={})",
            self.median(),
            min,
            max,
            v.len()
        )
    }
}

/// Runs usage-agg against the stack; returns wall time and peak RSS (KiB).
fn run_cli(bin: &PathBuf, stack: &Stack, args: &[&str]) -> (Duration, i64) {
    let started = Instant::now();
    let child = Command::new(bin)
        .args(args)
        .envs(stack.env())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("run usage-agg");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value to be filled in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, with valid pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    let took = started.elapsed();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "usage-agg {args:?} failed: {status}"
    );
    std::mem::forget(child);
    (took, usage.ru_maxrss)
}

/// The transport alone: the same keyset pages, bytes read, the last id found
/// by a byte scan, nothing parsed or folded.
fn bare_fetch(stack: &Stack) -> (Duration, u64) {
    let http = reqwest::blocking::Client::builder()
        .user_agent("usage-agg-bench")
        .build()
        .unwrap();
    let started = Instant::now();
    let (mut after, mut rows) = (0i64, 0u64);
    loop {
        let url = format!(
            "{}/usage_requests?select=id,portal_id,month_year,success,request_timestamp&id=gt.{after}&order=id.asc&limit={PAGE}",
            stack.rest_url
        );
        let body = http
            .get(url)
            .header("apikey", &stack.key)
            .bearer_auth(&stack.key)
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        let Some(pos) = memrfind(&body, b"\"id\":") else {
            break;
        };
        let digits: String = body[pos + 5..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .map(|b| *b as char)
            .collect();
        after = digits.parse().unwrap();
        rows += body.windows(5).filter(|w| w == b"\"id\":").count() as u64;
    }
    (started.elapsed(), rows)
}

fn memrfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
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

fn reset(stack: &Stack, cursor: Option<i64>) {
    let mut db = stack.sql();
    db.batch_execute("TRUNCATE portal_usage_monthly").unwrap();
    db.batch_execute("DELETE FROM usage_aggregation_state")
        .unwrap();
    db.batch_execute("VACUUM ANALYZE portal_usage_monthly")
        .unwrap();
    if let Some(c) = cursor {
        db.execute(
            "INSERT INTO usage_aggregation_state (job, cursor_id) VALUES ('default', $1)",
            &[&c],
        )
        .unwrap();
    }
}

fn dataset(cluster: &Cluster, rows: i64) -> Stack {
    let mut s = Stack::with_max_rows(cluster, PAGE);
    for m in MIGRATIONS {
        let out = s.psql_file(&stack::repo_root().join(m));
        assert!(
            out.status.success(),
            "{m}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let started = Instant::now();
    stack::insert_sample_rows(
        &mut s.sql(),
        rows,
        10_000,
        &["2025-05", "2025-06", "2025-07"],
    );
    s.sql()
        .batch_execute("VACUUM ANALYZE usage_requests")
        .unwrap();
    eprintln!(
        "bench: {rows} rows loaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    s
}

/// usage_current's cost for one portal's month, with `tail` good rows above
/// the cursor (no run has counted them), on top of all the history: the
/// function reads the primary key's range above the cursor, so its time
/// should follow the tail, not the history. Baseline: the same portal's
/// rows counted from the whole table (what a quota check without it does).
fn usage_current_cost(stack: &Stack, runs: usize) -> Vec<(i64, Duration, Duration)> {
    let mut db = stack.sql();
    let newest: i64 = db
        .query_one(
            "SELECT coalesce(max(id), 0)::bigint FROM usage_requests",
            &[],
        )
        .unwrap()
        .get(0);
    reset(stack, Some(newest));
    let mut out = Vec::new();
    let mut inserted = 0;
    for tail in [0i64, 1_000, 100_000] {
        stack::insert_sample_rows(&mut db, tail - inserted, 10_000, &["2025-07"]);
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
        let current = time(&mut db, "SELECT * FROM usage_current(42, '2025-07')");
        let scan = time(
            &mut db,
            "SELECT count(*) FROM usage_requests WHERE portal_id = 42 AND month_year = '2025-07'",
        );
        out.push((tail, current, scan));
    }
    out
}

fn main() {
    let a = args();
    let page = PAGE.to_string();
    eprintln!("bench: starting a private PostgreSQL 15 and postrust...");
    let cluster = Cluster::start();
    let big = dataset(&cluster, a.rows);
    let rows = a.rows;

    // The transport alone.
    let mut fetch = Vec::new();
    for _ in 0..a.runs {
        let (t, n) = bare_fetch(&big);
        assert_eq!(n as i64, rows, "the bare fetch must see every row");
        fetch.push(t);
    }
    let fetch = Timing(fetch);

    // The REST engine, a full run from nothing (the first run's rebuild).
    let mut rest = Vec::new();
    let mut rss_big = 0;
    for _ in 0..a.runs {
        reset(&big, None);
        let (t, rss) = run_cli(
            &a.bin,
            &big,
            &["aggregate", "--env", "dev", "--page-size", &page],
        );
        rest.push(t);
        rss_big = rss_big.max(rss);
    }
    let rest = Timing(rest);

    // The same full run at other concurrency levels, to choose the default.
    let mut by_concurrency = Vec::new();
    for c in ["1", "2"] {
        let mut times = Vec::new();
        for _ in 0..a.runs {
            reset(&big, None);
            let (t, _) = run_cli(
                &a.bin,
                &big,
                &[
                    "aggregate",
                    "--env",
                    "dev",
                    "--page-size",
                    &page,
                    "--concurrency",
                    c,
                ],
            );
            times.push(t);
        }
        by_concurrency.push((c, Timing(times)));
    }

    // An incremental run after 1,000 new rows.
    let mut incr = Vec::new();
    for _ in 0..a.runs {
        stack::insert_sample_rows(&mut big.sql(), 1_000, 10_000, &["2025-07"]);
        let (t, _) = run_cli(
            &a.bin,
            &big,
            &["aggregate", "--env", "dev", "--page-size", &page],
        );
        incr.push(t);
    }
    let incr = Timing(incr);

    // The RPC engine over every row, batch by batch.
    let mut rpc = Vec::new();
    for _ in 0..a.runs {
        reset(&big, Some(0));
        let (t, _) = run_cli(
            &a.bin,
            &big,
            &["aggregate", "--env", "dev", "--engine", "rpc"],
        );
        rpc.push(t);
    }
    let rpc = Timing(rpc);

    // The floor.
    let sql = Timing((0..a.runs).map(|_| bare_sql(&big)).collect());

    // One batch's time, for the batch size.
    reset(&big, Some(0));
    let mut db = big.sql();
    let started = Instant::now();
    db.query_one(
        "SELECT usage_agg_rpc_batch('default', 1000000, 2000, false)",
        &[],
    )
    .unwrap();
    let batch = started.elapsed();
    drop(db);

    // Peak RSS at a tenth of the rows (same portals and months: same keys).
    let small_rows = rows / 10;
    let small = dataset(&cluster, small_rows);
    let mut rss_small = 0;
    for _ in 0..a.runs {
        reset(&small, None);
        let (_, rss) = run_cli(
            &a.bin,
            &small,
            &["aggregate", "--env", "dev", "--page-size", &page],
        );
        rss_small = rss_small.max(rss);
    }
    // usage_current, last: it leaves rows above the cursor.
    let current = usage_current_cost(&big, a.runs);

    let keys: i64 = big
        .sql()
        .query_one(
            "SELECT count(*) FROM (SELECT DISTINCT portal_id, month_year FROM usage_requests) k",
            &[],
        )
        .unwrap()
        .get(0);
    drop(big);
    drop(small);
    cluster.stop();

    let ratio = |a: f64, b: f64| a / b;
    println!(
        "## Figures ({rows} raw rows, {keys} portal-months, pages of {PAGE}, {} runs each)\n",
        a.runs
    );
    println!("| measurement | time |");
    println!("|---|---|");
    println!("| bare page fetch (transport alone) | {} |", fetch.show());
    println!(
        "| REST engine, full run (first rebuild), default --concurrency 4 | {} |",
        rest.show()
    );
    for (c, t) in &by_concurrency {
        println!(
            "| REST engine, full run, --concurrency {c} | {} |",
            t.show()
        );
    }
    println!(
        "| REST engine, incremental after 1,000 new rows | {} |",
        incr.show()
    );
    println!(
        "| RPC engine, full run (batches of 1,000,000) | {} |",
        rpc.show()
    );
    println!(
        "| bare SQL INSERT ... SELECT ... GROUP BY ... ON CONFLICT | {} |",
        sql.show()
    );
    println!(
        "| one RPC batch of 1,000,000 ids (in SQL, no HTTP) | {:.3} s |",
        batch.as_secs_f64()
    );
    println!("| peak RSS, REST full run, {rows} rows | {} KiB |", rss_big);
    println!(
        "| peak RSS, REST full run, {small_rows} rows | {} KiB |",
        rss_small
    );
    for (tail, t, scan) in &current {
        println!(
            "| usage_current, one portal-month, {tail} rows above the cursor (whole-table count of it: {:.1} ms) | {:.2} ms |",
            scan.as_secs_f64() * 1000.0,
            t.as_secs_f64() * 1000.0
        );
    }
    println!();
    println!("| ratio | value | target |");
    println!("|---|---|---|");
    let show = |name: &str, v: f64, target: &str, ok: bool| {
        println!(
            "| {name} | {v:.3} | {target} {} |",
            if ok { "(met)" } else { "(MISSED)" }
        );
    };
    let r1 = ratio(rest.median(), fetch.median());
    if let Some((_, one)) = by_concurrency.iter().find(|(c, _)| *c == "1") {
        let r = ratio(one.median(), fetch.median());
        println!("| REST engine --concurrency 1 / bare fetch (both one stream) | {r:.3} | (for reference) |");
    }
    show("REST engine / bare fetch", r1, "< 1.1", r1 < 1.1);
    let r2 = ratio(incr.median(), rest.median());
    show("incremental / full", r2, "< 0.05", r2 < 0.05);
    let r3 = ratio(rpc.median(), sql.median());
    show("RPC engine / bare SQL", r3, "< 1.5", r3 < 1.5);
    let r4 = rss_big as f64 / rss_small as f64;
    show(
        &format!("RSS({rows}) / RSS({small_rows})"),
        r4,
        "< 1.1",
        r4 < 1.1,
    );
}
