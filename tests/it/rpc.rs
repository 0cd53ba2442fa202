//! The server-side engine (`--engine rpc`): the same contract as the REST
//! engine, interchangeable with it run to run.

use crate::common::*;

fn rpc(stack: &Stack, args: &[&str]) -> Run {
    let mut all = vec!["--engine", "rpc"];
    all.extend_from_slice(args);
    aggregate(stack, &all)
}

#[test]
fn alternating_engines_over_random_inserts_leaves_no_drift() {
    let stack = migrated_stack();
    let mut rng = Rng(4242);
    insert_random(&stack, &mut rng, 2_000, 80);
    // The first run is the rebuild whichever engine is asked for.
    rpc(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Mode: full rebuild (first run with the migration)");
    assert_no_drift(&stack);
    for round in 0..16 {
        let n = rng.below(3_000) as usize;
        insert_random(&stack, &mut rng, n, 80);
        let run = if round % 2 == 0 {
            rpc(&stack, &["--batch-ids", "700"])
        } else {
            aggregate(&stack, &["--batch-rows", "900"])
        };
        run.assert_status(0);
        if round % 2 == 0 {
            run.assert_stdout_has("Mode: server-side (--engine rpc)");
            run.assert_stdout_has(&format!("Found {n} requests"));
        }
        assert_no_drift(&stack);
    }
    assert_watermarks(&stack);
}

#[test]
fn bad_rows_are_skipped_counted_and_named_by_the_sql_engine_too() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    rpc(&stack, &[]).assert_status(0);
    let bad: i32 = stack
        .sql()
        .query_one("INSERT INTO usage_requests (portal_id, success, month_year) VALUES (-1, true, '2025-07') RETURNING id", &[])
        .unwrap()
        .get(0);
    insert_rows(&stack, 100, 3);
    rpc(&stack, &[])
        .assert_status(65)
        .assert_stdout_has("1 row rejected as bad data")
        .assert_stdout_has(&format!("ids {bad}"));
    assert_no_drift(&stack);
}

#[test]
fn it_finishes_what_a_killed_rest_run_left_half_written() {
    let stack = migrated_stack();
    let mut rng = Rng(77);
    insert_random(&stack, &mut rng, 1_000, 700);
    aggregate(&stack, &[]).assert_status(0);
    insert_random(&stack, &mut rng, 5_000, 700);
    let killed = aggregate_failing(&stack, "chunk=abort@1", &[]);
    assert_eq!(killed.status, -1, "{}", killed.stderr);
    assert_consistent(&stack);
    rpc(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
    assert_watermarks(&stack);
}

/// A backlog where every batch would touch every key: the first batch
/// books 1,000 ids and folds a sample read only, and the second takes the
/// rest, so each key is written twice at most (issue 22: a first batch of
/// 50,000 ids booked them all, and the next again). Before the sample's
/// migration, the run sizes from a first batch of 50,000 ids, as before,
/// and says which migration to apply.
#[test]
fn a_default_catch_up_samples_its_first_batch_and_books_the_rest_at_once() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 20);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 30_000, 20);
    let run = rpc(&stack, &["--json"]);
    run.assert_status(0);
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["batches"].as_u64(), Some(2), "{summary}");
    // 20 portals over three months: the run's distinct keys, summed from
    // what each batch booked first.
    assert_eq!(summary["keys_touched"].as_u64(), Some(60), "{summary}");
    assert_no_drift(&stack);

    let lean = migration("_usage_agg_lean_batch.sql");
    let old = stack_without(&[lean]);
    insert_rows(&old, 100, 20);
    aggregate(&old, &[]).assert_status(0);
    insert_rows(&old, 60_000, 20);
    let run = rpc(&old, &["--json"]);
    run.assert_status(0)
        .assert_stderr_has("predates 20261207230000_usage_agg_lean_batch.sql: apply it");
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(summary["batches"].as_u64(), Some(2), "{summary}");
    // The run's distinct keys, read back at the end there.
    assert_eq!(summary["keys_touched"].as_u64(), Some(60), "{summary}");
    assert_no_drift(&old);
}

#[test]
fn a_dry_run_reports_the_next_batch_and_writes_nothing() {
    let stack = migrated_stack();
    insert_rows(&stack, 500, 5);
    rpc(&stack, &[]).assert_status(0);
    insert_rows(&stack, 1_200, 5);
    let before = table(&stack);
    let cursor_before = cursor(&stack);
    rpc(&stack, &["--dry-run", "--batch-ids", "1000"])
        .assert_status(0)
        .assert_stdout_has("Found 1000 requests");
    assert_eq!(table(&stack), before);
    assert_eq!(cursor(&stack), cursor_before);
}

#[test]
fn a_run_racing_the_sql_engine_does_not_count_twice() {
    let stack = migrated_stack();
    let mut rng = Rng(12);
    insert_random(&stack, &mut rng, 800, 40);
    aggregate(&stack, &[]).assert_status(0);
    insert_random(&stack, &mut rng, 3_000, 40);

    // A REST run has read a page; the SQL engine finishes everything; the
    // REST run resumes and writes what it read.
    let slow = paused_run(&stack, "page");
    expire_lease(&stack);
    rpc(&stack, &["--batch-ids", "1000"]).assert_status(0);
    assert_no_drift(&stack);
    resume(slow);
    assert_no_drift(&stack);
}

#[test]
fn the_server_side_engines_figures_are_distinct_keys_and_rows_read_in_the_database() {
    let stack = migrated_stack();
    insert_rows(&stack, 600, 30);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 3000, 30);
    let keys = count(
        &stack,
        "SELECT count(DISTINCT (portal_id, month_year)) FROM usage_requests WHERE id > 600",
    );
    // Small batches: every key is in several of them.
    let run = aggregate(
        &stack,
        &["--engine", "rpc", "--batch-size", "500", "--verbose"],
    );
    run.assert_status(0)
        .assert_stdout_has(&format!("Portal-month combinations: {keys}"))
        .assert_stdout_has("Rows read in the database: 3000");
    assert!(
        !run.stdout.contains("Rows read from the server: 0"),
        "{}",
        run.stdout
    );
    assert_no_drift(&stack);
}

/// Found by an adversarial pass on a count summed per batch: keys whose
/// watermark a `--month` rebuild had left above the cursor were not counted
/// as the run's. The run's distinct keys are the monthly rows it left with
/// a watermark in its range (usage_agg_run_keys).
#[test]
fn a_multi_batch_run_counts_every_key_it_wrote_once() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-06", 3);
    aggregate(&stack, &[]).assert_status(0);
    for p in 1..=3 {
        insert_month(&stack, p, "2025-06", 2);
    }
    aggregate(&stack, &["--month", "2025-06"]).assert_status(0);
    for p in 1..=3 {
        insert_month(&stack, p, "2025-06", 4);
    }
    insert_month(&stack, 4, "2025-07", 4);
    let run = rpc(&stack, &["--batch-ids", "5", "--json"]);
    run.assert_status(0);
    assert_no_drift(&stack);
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(summary["batches"].as_u64() > Some(1), "{summary}");
    for field in ["keys_touched", "keys_written", "keys_to_write"] {
        assert_eq!(summary[field].as_u64(), Some(4), "{field}: {summary}");
    }
}

/// Found by an adversarial pass: a multi-batch run that booked only late
/// rows (their month closed) counted its keys from the monthly rows alone,
/// and said it aggregated 0 portal-month combinations.
#[test]
fn a_multi_batch_run_of_late_rows_counts_their_keys() {
    let stack = migrated_stack();
    for p in 1..=3 {
        insert_month(&stack, p, "2025-05", 1);
    }
    aggregate(&stack, &[]).assert_status(0);
    close_sql(&stack, "2025-05");
    for p in 1..=3 {
        insert_month(&stack, p, "2025-05", 3);
    }
    let run = rpc(&stack, &["--batch-ids", "3", "--json"]);
    run.assert_status(0);
    let summary: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(summary["batches"].as_u64() > Some(1), "{summary}");
    assert_eq!(summary["late_rows"].as_u64(), Some(9), "{summary}");
    for field in ["keys_touched", "keys_written"] {
        assert_eq!(summary[field].as_u64(), Some(3), "{field}: {summary}");
    }
}

#[test]
fn server_side_batches_are_sized_by_time_unless_a_size_is_given() {
    let stack = migrated_stack();
    insert_rows(&stack, 600, 30);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 5000, 30);
    // Sized by time (the rule itself: the test below):
    // the totals are the same whatever the sizes.
    let run = aggregate(
        &stack,
        &["--engine", "rpc", "--batch-seconds", "100ms", "--verbose"],
    );
    run.assert_status(0);
    let batches: u64 = run
        .stdout
        .lines()
        .find_map(|l| l.split("server-side (--engine rpc), ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("a batch count");
    assert!(batches >= 1, "{}", run.stdout);
    assert_no_drift(&stack);
    // Refused where it means nothing.
    aggregate(&stack, &["--batch-seconds", "1s"])
        .assert_status(64)
        .assert_stderr_has("--engine rpc");
    aggregate(
        &stack,
        &[
            "--engine",
            "rpc",
            "--batch-seconds",
            "1s",
            "--batch-size",
            "100",
        ],
    )
    .assert_status(64);
    aggregate(&stack, &["--engine", "rpc", "--batch-seconds", "10ms"]).assert_status(64);
}

/// The one sizing rule (`usage_agg_next_batch_ids`), on random batches: the
/// bounds hold, more time to spend never means a smaller batch, a batch
/// that took exactly the aim is asked for again, rows that are each their
/// own key grow in proportion to the time, and rows that repeat their keys
/// grow faster than in proportion (the keys are written once either way).
#[test]
fn the_sizing_rule_keeps_its_bounds_and_grows_faster_when_rows_repeat_keys() {
    let stack = migrated_stack();
    let mut db = stack.sql();
    let mut next = |ids: i64,
                    rows: i64,
                    keys: i64,
                    fold: f64,
                    book: f64,
                    fixed: f64,
                    aim: Option<f64>|
     -> Option<i64> {
        db.query_one(
            "SELECT usage_agg_next_batch_ids($1, $2, $3, $4, $5, $6, $7)",
            &[&ids, &rows, &keys, &fold, &book, &fixed, &aim],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(
        next(100_000, 100_000, 30_000, 100.0, 600.0, 5.0, None),
        None,
        "a fixed size"
    );
    let mut rng = Rng(2207);
    for case in 0..300 {
        let ids = 1_000 + rng.below(5_000_000) as i64;
        let rows = (ids as u64 * (1 + rng.below(100)) / 100) as i64;
        let keys = 1 + rng.below(rows.max(1) as u64) as i64;
        let fold = 1.0 + rng.below(2_000) as f64;
        let book = 1.0 + rng.below(5_000) as f64;
        let fixed = rng.below(20) as f64;
        let aim = 100.0 + rng.below(10_000) as f64;
        let what = format!("case {case}: {ids} ids, {rows} rows, {keys} keys, {fold}+{book}+{fixed} ms, aim {aim} ms");
        let n = next(ids, rows, keys, fold, book, fixed, Some(aim)).expect(&what);
        let (lo, hi) = (
            (ids / 4).clamp(1_000, 50_000_000),
            (ids * 64).clamp(1_000, 50_000_000),
        );
        assert!(n >= lo && n <= hi, "{what}: {n} outside [{lo}, {hi}]");
        let more = next(ids, rows, keys, fold, book, fixed, Some(aim * 2.0)).unwrap();
        assert!(more >= n, "{what}: twice the time gives {more} < {n}");
        let took = fold + book + fixed;
        let again = next(ids, rows, keys, fold, book, fixed, Some(took)).unwrap();
        if ids / 4 >= 1_000 {
            assert!(
                (again - ids).abs() <= ids / 50 + 1,
                "{what}: a batch that took the aim ({took} ms) is asked for again, not {again}"
            );
        }
    }
    // Each row its own key: in proportion (the fixed part aside).
    assert_eq!(
        next(100_000, 100_000, 100_000, 200.0, 800.0, 0.0, Some(2_000.0)),
        Some(200_000)
    );
    // The same time, but 300,000 rows on 30,000 keys: the keys are already
    // written by this batch's size, so twice the time is far more rows.
    let repeated = next(300_000, 300_000, 30_000, 400.0, 600.0, 0.0, Some(2_000.0)).unwrap();
    assert!(repeated > 600_000, "{repeated}");
}
