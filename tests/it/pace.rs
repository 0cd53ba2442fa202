//! The pace (adaptive concurrency, the rows-per-second ceiling, rests
//! between pages and between server-side batches, server-side batches
//! sized by time) decides only when the next request goes: whatever it is
//! set to, the totals are the same to the last row, under inserts during
//! the run and kills anywhere.

use crate::common::*;

/// Runs `args` while another connection inserts rows, until the run ends.
fn run_while_inserting(
    stack: &Stack,
    rng: &mut Rng,
    env: &[(String, String)],
    args: &[&str],
) -> Run {
    use std::sync::atomic::{AtomicBool, Ordering};
    let done = AtomicBool::new(false);
    let mut inserter = Rng(rng.next());
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut batches = 0;
            while !done.load(Ordering::SeqCst) || batches == 0 {
                insert_random(stack, &mut inserter, 40, 200);
                batches += 1;
            }
            batches
        });
        let run = usage_agg(&workdir(), env, args);
        done.store(true, Ordering::SeqCst);
        assert!(writer.join().unwrap() > 0);
        run
    })
}

/// Each pace, killed at random points with rows arriving meanwhile, then
/// finished: no drift, and every watermark where it belongs.
fn survives_kills_and_inserts(pace: &[&str], seed: u64) {
    let stack = migrated_stack();
    let mut rng = Rng(seed);
    insert_random(&stack, &mut rng, 2_000, 200);
    let base = ["aggregate", "--env", "dev", "--page-size", "150"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter()
            .chain(pace)
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let first: Vec<String> = with(&[]);
    let first: Vec<&str> = first.iter().map(String::as_str).collect();
    usage_agg(&workdir(), &stack.env(), &first).assert_status(0);
    let points = ["page", "chunk", "before-cursor", "after-cursor"];
    let mut kills = 0;
    for _ in 0..6 {
        let n = 500 + rng.below(1_000) as usize;
        insert_random(&stack, &mut rng, n, 200);
        let point = points[rng.below(points.len() as u64) as usize];
        let env = failing(&stack, &format!("{point}=abort@{}", 1 + rng.below(3)));
        let args = with(&["--batch-size", "700"]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let killed = run_while_inserting(&stack, &mut rng, &env, &args);
        assert!(
            killed.status == -1 || killed.status == 0,
            "{pace:?} at {point}: {}\n{}",
            killed.status,
            killed.stderr
        );
        kills += usize::from(killed.status == -1);
        let finish = run_while_inserting(&stack, &mut rng, &stack.env(), &first);
        finish.assert_status(0);
        // Rows inserted during the finishing run may be above its horizon:
        // one more run, alone, and the table must match the rows exactly.
        usage_agg(&workdir(), &stack.env(), &first).assert_status(0);
        assert_no_drift(&stack);
    }
    assert!(kills >= 3, "{pace:?}: only {kills} of 6 runs were killed");
    assert_watermarks(&stack);
}

#[test]
fn the_default_pace_changes_no_total() {
    survives_kills_and_inserts(&[], 11);
}

#[test]
fn aggressive_at_high_concurrency_changes_no_total() {
    survives_kills_and_inserts(&["--aggressive", "--concurrency", "8"], 12);
}

#[test]
fn a_rows_per_second_ceiling_changes_no_total() {
    survives_kills_and_inserts(
        &["--max-rows-per-second", "40000", "--concurrency", "3"],
        13,
    );
}

#[test]
fn server_side_batches_sized_by_time_and_rested_between_change_no_total() {
    let stack = migrated_stack();
    let mut rng = Rng(14);
    insert_random(&stack, &mut rng, 2_000, 200);
    aggregate(&stack, &[]).assert_status(0);
    let mut kills = 0;
    for round in 0..6 {
        let n = 3_000 + rng.below(3_000) as usize;
        insert_random(&stack, &mut rng, n, 200);
        let env = failing(&stack, &format!("page=abort@{}", 1 + rng.below(2)));
        // Alternately a fixed small batch with a fixed rest, and batches
        // sized by time with the default rest (as long as each batch took).
        let args: &[&str] = if round % 2 == 0 {
            &[
                "aggregate",
                "--env",
                "dev",
                "--engine",
                "rpc",
                "--batch-size",
                "1000",
                "--batch-pause",
                "5ms",
            ]
        } else {
            &[
                "aggregate",
                "--env",
                "dev",
                "--engine",
                "rpc",
                "--batch-seconds",
                "100ms",
            ]
        };
        let killed = run_while_inserting(&stack, &mut rng, &env, args);
        assert!(
            killed.status == -1 || killed.status == 0,
            "{}",
            killed.stderr
        );
        kills += usize::from(killed.status == -1);
        run_while_inserting(&stack, &mut rng, &stack.env(), args).assert_status(0);
        aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
        assert_no_drift(&stack);
    }
    assert!(kills >= 3, "only {kills} of 6 runs were killed");
    assert_watermarks(&stack);
}

/// `aggregate --env dev` with these space-separated arguments.
fn aggregate_line(stack: &Stack, line: &str) -> Run {
    aggregate(stack, &line.split(' ').collect::<Vec<_>>())
}

fn summary(run: &Run) -> serde_json::Value {
    run.assert_status(0);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

#[test]
fn the_summary_says_how_the_pace_went() {
    let stack = migrated_stack();
    insert_rows(&stack, 6_000, 50);
    let flat = summary(&aggregate_line(
        &stack,
        "--json --page-size 100 --aggressive --concurrency 3",
    ));
    assert_eq!(
        flat["peak_concurrency"], 3,
        "--aggressive: all of --concurrency from the start"
    );
    assert_eq!(flat["concurrency_cuts"], 0);
    insert_rows(&stack, 600, 50);
    aggregate_line(&stack, "--verbose --aggressive --concurrency 2")
        .assert_status(0)
        .assert_stdout_has("Pace: up to 2 requests in flight");
    insert_rows(&stack, 6_000, 50);
    let paced = summary(&aggregate_line(
        &stack,
        "--json --page-size 100 --concurrency 3",
    ));
    let peak = paced["peak_concurrency"].as_u64().unwrap();
    assert!((1..=3).contains(&peak), "{paced}");
    assert_no_drift(&stack);

    // Server-side: rests between batches by default, none when aggressive.
    insert_rows(&stack, 5_000, 50);
    let rested = summary(&aggregate_line(
        &stack,
        "--json --engine rpc --batch-size 1000 --batch-pause 20ms",
    ));
    assert_eq!(rested["batches"], 5, "{rested}");
    assert_eq!(
        rested["batch_rest_seconds"], 0.08,
        "a rest between batches, none after the last"
    );
    insert_rows(&stack, 5_000, 50);
    let eager = summary(&aggregate_line(
        &stack,
        "--json --engine rpc --batch-size 1000 --aggressive",
    ));
    assert_eq!(
        (
            eager["batches"].as_u64(),
            eager["batch_rest_seconds"].as_f64()
        ),
        (Some(5), Some(0.0))
    );
    assert!(eager["batch_seconds_max"].as_f64().unwrap() > 0.0);
    insert_rows(&stack, 2_000, 50);
    aggregate_line(
        &stack,
        "--verbose --engine rpc --batch-size 1000 --batch-pause 10ms",
    )
    .assert_status(0)
    .assert_stdout_has("Pace: 2 batches, the longest")
    .assert_stdout_has("rested 0.01 s between them");
    assert_no_drift(&stack);
}

#[test]
fn a_rows_per_second_ceiling_holds() {
    let stack = migrated_stack();
    insert_rows(&stack, 3_000, 20);
    let started = std::time::Instant::now();
    aggregate(
        &stack,
        &["--page-size", "500", "--max-rows-per-second", "1000"],
    )
    .assert_status(0);
    // 2,500 rows are read before the last page is asked for: at 1,000 a
    // second, not before 2.5 s. (A lower bound only: it cannot be faster.)
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
    assert_no_drift(&stack);
}

#[test]
fn pace_flags_that_contradict_each_other_or_the_engine_are_refused() {
    let stack = migrated_stack();
    for (args, says) in [
        (
            &["--aggressive", "--max-rows-per-second", "10"][..],
            "--max-rows-per-second",
        ),
        (
            &["--engine", "rpc", "--aggressive", "--batch-pause", "1s"][..],
            "--batch-pause",
        ),
        (&["--batch-pause", "1s"][..], "add --engine rpc"),
        (&["--max-rows-per-second", "0"][..], "--max-rows-per-second"),
        (
            &["--engine", "rpc", "--batch-pause", "soon"][..],
            "--batch-pause",
        ),
    ] {
        aggregate(&stack, args)
            .assert_status(64)
            .assert_stderr_has(says);
    }
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_monthly"),
        0,
        "nothing written"
    );
}

/// A slow run (a long rest, a low ceiling) keeps its lease through its
/// waits: a run started after the lease would have lapsed unrenewed still
/// finds it held, and steps aside (75).
fn keeps_its_lease_while_it_waits(args: &[&str]) {
    let stack = migrated_stack();
    insert_rows(&stack, 500, 20);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 3_000, 20);
    let mut all = vec!["aggregate", "--env", "dev", "--lease-ttl", "1s"];
    all.extend_from_slice(args);
    let slow = std::process::Command::new(env!("CARGO_BIN_EXE_usage-agg"))
        .args(&all)
        .current_dir(workdir())
        .env_clear()
        .envs(stack.env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Watch the lease: once the time the first lease seen would have run
    // out is past (by the database's clock), a lease still held was renewed.
    let mut db = stack.sql();
    let first = loop {
        let row = db
            .query_one("SELECT lease_owner IS NOT NULL, lease_expires_at::text FROM usage_aggregation_state", &[])
            .unwrap();
        if row.get::<_, bool>(0) {
            break row.get::<_, String>(1);
        }
    };
    while !db
        .query_one(
            "SELECT now() > $1::text::timestamptz + interval '300 ms'",
            &[&first],
        )
        .unwrap()
        .get::<_, bool>(0)
    {}
    aggregate(&stack, &[])
        .assert_status(75)
        .assert_stderr_has("lease");
    let out = slow.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
}

#[test]
fn a_run_resting_between_server_side_batches_keeps_its_lease() {
    keeps_its_lease_while_it_waits(&[
        "--engine",
        "rpc",
        "--batch-size",
        "1000",
        "--batch-pause",
        "2s",
    ]);
}

#[test]
fn a_run_under_a_low_rows_per_second_ceiling_keeps_its_lease() {
    keeps_its_lease_while_it_waits(&[
        "--max-rows-per-second",
        "1000",
        "--page-size",
        "1000",
        "--concurrency",
        "1",
    ]);
}

#[test]
fn a_table_with_ids_near_the_top_of_bigint_is_read_whole_at_any_concurrency() {
    let mut stack = migrated_stack();
    stack.ddl(
        "ALTER TABLE usage_requests ALTER COLUMN id TYPE bigint;
         ALTER SEQUENCE usage_requests_id_seq AS bigint;
         SELECT setval('usage_requests_id_seq', 300000000000000000);",
    );
    insert_rows(&stack, 700, 30);
    // The first run rebuilds from id 0: 32 ranges over 3e17 ids, where
    // 64-bit arithmetic for their bounds wrapped and dropped the last.
    let run = aggregate(&stack, &["--json", "--concurrency", "32"]);
    assert_eq!(summary(&run)["rows_read"], 700);
    assert_no_drift(&stack);
    verify(&stack);
}

fn verify(stack: &Stack) {
    usage_agg(
        &workdir(),
        &stack.env(),
        &["verify", "--env", "dev", "--concurrency", "32"],
    )
    .assert_status(0);
}

/// A pace slower than `--deadline` allows stops at the deadline (75),
/// naming it, not minutes later at the next request, and not blaming the
/// network; the next run finishes the job.
#[test]
fn a_slow_pace_stops_at_the_deadline_not_past_it() {
    let stack = migrated_stack();
    insert_rows(&stack, 500, 20);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 5_000, 20);
    // Each a pace slower than the deadline: a ceiling (REST, dry, RPC), a
    // rest between batches, and verify.
    for line in [
        "aggregate --max-rows-per-second 1",
        "aggregate --dry-run --max-rows-per-second 1",
        "aggregate --engine rpc --batch-size 1000 --max-rows-per-second 1",
        "aggregate --engine rpc --batch-size 1000 --batch-pause 10m",
        "verify --max-rows-per-second 1",
    ] {
        let mut args: Vec<&str> = line.split(' ').collect();
        args.splice(1..1, ["--env", "dev", "--deadline", "2s"]);
        let args = &args[..];
        let started = std::time::Instant::now();
        let run = usage_agg(&workdir(), &stack.env(), args);
        run.assert_status(75).assert_stderr_has("--deadline");
        assert!(
            !run.stderr.contains("could not be reached"),
            "{args:?}: {}",
            run.stderr
        );
        // Generous: it must stop near 2 s, where it once ran for minutes.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{args:?}: {:?}",
            started.elapsed()
        );
    }
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
}
