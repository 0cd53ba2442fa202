//! The incremental engine and the migration: every row counted exactly once,
//! whatever order runs, crashes and commits happen in
//! (docs/semantics.md; each trap is a test here or in tests/trust.rs).

use crate::common::*;

/// `Rows read from the server: N` from a summary.
fn rows_read(run: &Run) -> u64 {
    run.stdout
        .lines()
        .find_map(|l| l.split("Rows read from the server: ").nth(1))
        .expect("a rows-read line")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn the_first_run_rebuilds_and_later_runs_count_only_new_rows() {
    let mut stack = Stack::new();
    insert_rows(&stack, 2_000, 20);
    // Counts left by the old script: stale, and without watermarks.
    stack
        .sql()
        .batch_execute(
            "INSERT INTO portal_usage_monthly (portal_id, month_year, request_count, success_count, error_count)
             VALUES (1000, '2025-05', 3, 0, 3)",
        )
        .unwrap();
    migrate(&mut stack);

    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Mode: full rebuild (first run with the migration)")
        .assert_stdout_has("Cursor: none -> 2000")
        .assert_stdout_has("Drift: 1 stored key disagreed with its own rows");
    assert_no_drift(&stack);
    assert_watermarks(&stack);

    insert_rows(&stack, 1_234, 20);
    let run = aggregate(&stack, &[]);
    run.assert_status(0)
        .assert_stdout_has("Mode: incremental")
        .assert_stdout_has("Cursor: 2000 -> 3234");
    assert_eq!(
        rows_read(&run),
        1_234,
        "an incremental run reads the new rows and nothing else"
    );
    assert_no_drift(&stack);
    assert_watermarks(&stack);
}

#[test]
fn twenty_rounds_of_random_inserts_leave_no_drift_and_cost_what_they_add() {
    let stack = migrated_stack();
    let mut rng = Rng(20261127);
    insert_random(&stack, &mut rng, 3_000, 50);
    aggregate(&stack, &[]).assert_status(0);
    for round in 0..20 {
        let k = rng.below(2_500) as usize;
        insert_random(&stack, &mut rng, k, 50);
        let run = aggregate(&stack, &["--batch-rows", "700"]);
        run.assert_status(0);
        assert_eq!(rows_read(&run), k as u64, "round {round}: rows read");
        assert_no_drift(&stack);
    }
    assert_watermarks(&stack);
}

#[test]
fn a_run_with_nothing_to_do_writes_one_line() {
    let stack = migrated_stack();
    insert_rows(&stack, 200, 3);
    aggregate(&stack, &[]).assert_status(0);
    let run = aggregate(&stack, &[]);
    run.assert_status(0)
        .assert_stdout_has("No pending requests to aggregate (DEV, cursor 200, ");
    assert_eq!(run.stdout.lines().count(), 1, "{}", run.stdout);
    assert_eq!(run.stderr, "");
    // Anything to say, and the whole summary is there.
    insert_rows(&stack, 5, 3);
    let run = aggregate(&stack, &[]);
    run.assert_stdout_has("Starting usage aggregation")
        .assert_stdout_has("Found 5 requests");
}

#[test]
fn a_run_with_nothing_new_changes_nothing_and_says_so() {
    let stack = migrated_stack();
    insert_rows(&stack, 500, 5);
    aggregate(&stack, &[]).assert_status(0);
    let before = table(&stack);
    let updated: String = stack
        .sql()
        .query_one(
            "SELECT max(updated_at)::text FROM portal_usage_monthly",
            &[],
        )
        .unwrap()
        .get(0);

    let run = aggregate(&stack, &["--verbose"]);
    run.assert_status(0)
        .assert_stdout_has("Found 0 requests")
        .assert_stdout_has("No pending requests to aggregate");
    assert_eq!(rows_read(&run), 0);
    assert_eq!(table(&stack), before);
    let after: String = stack
        .sql()
        .query_one(
            "SELECT max(updated_at)::text FROM portal_usage_monthly",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(updated, after, "no row was rewritten");
}

#[test]
fn a_run_killed_anywhere_is_finished_by_the_next_with_every_row_counted_once() {
    let stack = migrated_stack();
    let mut rng = Rng(7);
    insert_random(&stack, &mut rng, 1_500, 400);
    aggregate(&stack, &[]).assert_status(0);
    let points = ["page", "chunk", "before-cursor", "after-cursor"];
    let mut kills = 0;
    for iteration in 0..32 {
        let n = 300 + rng.below(1_500) as usize;
        insert_random(&stack, &mut rng, n, 400);
        let point = points[rng.below(points.len() as u64) as usize];
        let at = 1 + rng.below(3);
        // Small pages and batches: many places to die in one run.
        let killed = aggregate_failing(
            &stack,
            &format!("{point}=abort@{at}"),
            &["--page-size", "200", "--batch-rows", "400"],
        );
        assert!(
            killed.status == -1 || killed.status == 0,
            "iteration {iteration} ({point}@{at}): {}\n{}",
            killed.status,
            killed.stderr
        );
        kills += usize::from(killed.status == -1);
        if iteration % 4 == 0 {
            // Sometimes new rows land between the crash and the rerun.
            insert_random(&stack, &mut rng, 50, 400);
        }
        aggregate(&stack, &[]).assert_status(0);
        assert_no_drift(&stack);
    }
    assert!(
        kills >= 20,
        "only {kills} of 32 runs were killed: the failpoints are not being reached"
    );
    assert_watermarks(&stack);
}

#[test]
fn runs_started_together_agree() {
    let stack = migrated_stack();
    let mut rng = Rng(99);
    insert_random(&stack, &mut rng, 4_000, 300);
    aggregate(&stack, &[]).assert_status(0);
    for _ in 0..3 {
        insert_random(&stack, &mut rng, 3_000, 300);
        let children: Vec<_> = (0..4)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_usage-agg"))
                    .args(["aggregate", "--env", "dev", "--batch-rows", "500"])
                    .current_dir(workdir())
                    .env_clear()
                    .envs(stack.env())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let statuses: Vec<i32> = children
            .into_iter()
            .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
            .collect();
        assert!(statuses.iter().all(|s| *s == 0 || *s == 75), "{statuses:?}");
        assert!(
            statuses.contains(&0),
            "one of them did the work: {statuses:?}"
        );
        assert_no_drift(&stack);
    }
}

#[test]
fn a_run_that_read_rows_before_a_newer_run_wrote_them_does_not_count_them_twice() {
    let stack = migrated_stack();
    let mut rng = Rng(11);
    insert_random(&stack, &mut rng, 800, 30);
    aggregate(&stack, &[]).assert_status(0);
    insert_random(&stack, &mut rng, 3_000, 30);

    // The slow run has read a page of new rows, not yet what is stored.
    let slow = paused_run(&stack, "page");
    expire_lease(&stack);
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);

    // It resumes: the keys it read rows for were written meanwhile.
    resume(slow);
    assert_no_drift(&stack);
    assert_watermarks(&stack);
}

#[test]
fn a_run_whose_lease_expires_while_it_writes_cannot_undo_a_newer_run() {
    let stack = migrated_stack();
    let mut rng = Rng(5);
    insert_random(&stack, &mut rng, 1_000, 700);
    aggregate(&stack, &[]).assert_status(0);
    // Enough keys for several upsert chunks in one batch.
    insert_random(&stack, &mut rng, 6_000, 700);

    // The slow run has written one chunk and holds the rest, computed from
    // what was stored then. Its lease runs out; more rows arrive; a newer
    // run takes over and finishes.
    let slow = paused_run(&stack, "chunk");
    expire_lease(&stack);
    insert_random(&stack, &mut rng, 2_000, 700);
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);

    // The slow run resumes and writes its stale chunks: the guard keeps the
    // newer states.
    resume(slow);
    assert_no_drift(&stack);
    assert_watermarks(&stack);
}
#[test]
fn a_live_lease_makes_a_second_run_step_aside_with_who_and_since() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "UPDATE usage_aggregation_state SET lease_owner = 'usage-agg@cron-host:4242',
               lease_taken_at = now(), lease_expires_at = now() + interval '10 minutes'",
        )
        .unwrap();
    aggregate(&stack, &[])
        .assert_status(75)
        .assert_stderr_has("usage-agg@cron-host:4242")
        .assert_stderr_has("since");
}

#[test]
fn a_row_committed_late_with_a_smaller_id_is_counted_not_skipped() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);

    // A webhook transaction draws an id and stays open...
    let mut slow_writer = stack.sql();
    let mut tx = slow_writer.transaction().unwrap();
    let late_id: i32 = tx
        .query_one("INSERT INTO usage_requests (portal_id, success, month_year) VALUES (777, true, '2025-07') RETURNING id", &[])
        .unwrap()
        .get(0);
    // ...while later ids commit.
    insert_rows(&stack, 200, 3);
    let run = aggregate(&stack, &["--horizon-wait-ms", "100"]);
    run.assert_status(75).assert_stderr_has("still open");
    assert!(
        cursor(&stack).unwrap() < i64::from(late_id),
        "the cursor must not pass an id still in flight"
    );

    // It commits while a run waits for it: the run counts it.
    let waiter = std::thread::spawn({
        let env = stack.env();
        move || {
            usage_agg(
                &workdir(),
                &env,
                &["aggregate", "--env", "dev", "--horizon-wait-ms", "7000"],
            )
        }
    });
    let mut watcher = stack.sql();
    loop {
        let waiting: i64 = watcher
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%usage_agg_safe_horizon%' AND pid <> pg_backend_pid()", &[])
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        std::thread::yield_now();
    }
    tx.commit().unwrap();
    waiter.join().unwrap().assert_status(0);
    assert_no_drift(&stack);
    assert_eq!(
        count(
            &stack,
            "SELECT request_count::bigint FROM portal_usage_monthly WHERE portal_id = 777"
        ),
        1
    );
}

#[test]
fn bad_rows_are_skipped_once_and_never_block_the_cursor() {
    let stack = migrated_stack();
    insert_rows(&stack, 200, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, success, month_year) VALUES (0, true, '2025-07'), (5, true, '2025-00');",
        )
        .unwrap();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[])
        .assert_status(65)
        .assert_stdout_has("2 rows rejected as bad data");
    assert_no_drift(&stack);
    aggregate(&stack, &["--verbose"])
        .assert_status(0)
        .assert_stdout_has("Found 0 requests");
}

#[test]
fn the_migration_applies_twice_and_the_guard_refuses_to_lower_a_watermark() {
    let mut stack = migrated_stack();
    migrate(&mut stack);
    insert_rows(&stack, 400, 4);
    aggregate(&stack, &[]).assert_status(0);
    migrate(&mut stack);
    assert_no_drift(&stack);

    let mut db = stack.sql();
    let before = table(&stack);
    db.batch_execute(
        "UPDATE portal_usage_monthly SET request_count = 0, last_request_id = last_request_id - 1",
    )
    .unwrap();
    assert_eq!(
        table(&stack),
        before,
        "a write that lowers the watermark is a no-op"
    );
    insert_rows(&stack, 10, 4);
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
}

#[test]
fn without_the_migration_it_recomputes_and_names_the_migration_once() {
    let stack = Stack::new();
    insert_rows(&stack, 300, 3);
    let run = aggregate(&stack, &[]);
    run.assert_status(0)
        .assert_stdout_has("migration is not applied")
        .assert_stdout_has(MIGRATION);
    assert_eq!(run.all().matches("migration is not applied").count(), 1);
    assert_no_drift(&stack);
}

#[test]
fn verify_finds_hand_made_drift_and_full_repairs_it_raising_silently_lowering_only_when_allowed() {
    let stack = migrated_stack();
    insert_rows(&stack, 900, 3);
    aggregate(&stack, &[]).assert_status(0);
    usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"])
        .assert_status(0)
        .assert_stdout_has("agrees");

    stack
        .sql()
        .batch_execute(
            "UPDATE portal_usage_monthly SET request_count = request_count - 2, success_count = success_count - 2
               WHERE portal_id = 1000 AND month_year = '2025-05';
             UPDATE portal_usage_monthly SET error_count = error_count + 7, request_count = request_count + 7
               WHERE portal_id = 1002 AND month_year = '2025-06';",
        )
        .unwrap();
    let verify = usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"]);
    verify.assert_status(65).assert_stdout_has("2 keys differ");
    assert!(
        verify
            .stdout
            .lines()
            .any(|l| l.contains("1000") && l.contains("2025-05")),
        "{}",
        verify.stdout
    );
    assert!(
        verify
            .stdout
            .lines()
            .any(|l| l.contains("1002") && l.contains("2025-06")),
        "{}",
        verify.stdout
    );
    usage_agg(
        &workdir(),
        &stack.env(),
        &["verify", "--env", "dev", "--month", "2025-07"],
    )
    .assert_status(0);

    // --full fixes what raises a count, and refuses to lower one.
    let raised = "SELECT error_count::bigint FROM portal_usage_monthly WHERE portal_id = 1002 AND month_year = '2025-06'";
    let raised_before = count(&stack, raised);
    let full = aggregate(&stack, &["--full"]);
    full.assert_status(65)
        .assert_stdout_has("Drift: 2 stored keys")
        .assert_stdout_has("--allow-decrease");
    assert_eq!(
        count(&stack, raised),
        raised_before,
        "--full must not lower a count without --allow-decrease"
    );
    let key_1000 = |rows: Vec<Row>| rows.into_iter().find(|r| r.0 == 1000 && r.1 == "2025-05");
    assert_eq!(
        key_1000(table(&stack)),
        key_1000(ground_truth(&stack)),
        "the lowered key was raised to its rows"
    );
    aggregate(&stack, &["--month", "2025-06", "--allow-decrease"])
        .assert_status(0)
        .assert_stdout_has("rebuild of 2025-06");
    assert_no_drift(&stack);
    usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"]).assert_status(0);
}

#[test]
fn a_dry_run_takes_no_lease_and_writes_nothing() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 50, 3);
    let state_before: String = stack
        .sql()
        .query_one(
            "SELECT row_to_json(s)::text FROM usage_aggregation_state s",
            &[],
        )
        .unwrap()
        .get(0);
    let table_before = table(&stack);
    aggregate(&stack, &["--dry-run"])
        .assert_status(0)
        .assert_stdout_has("would be written")
        .assert_stdout_has("(was ");
    let state_after: String = stack
        .sql()
        .query_one(
            "SELECT row_to_json(s)::text FROM usage_aggregation_state s",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(state_before, state_after);
    assert_eq!(table_before, table(&stack));
}

#[test]
fn sql_prints_the_migration() {
    let run = usage_agg(&workdir(), &[], &["sql"]);
    run.assert_status(0);
    // Every migration, in order, each whole: pasting it all applies them.
    let mut at = 0;
    for m in MIGRATIONS.iter() {
        let sql = std::fs::read_to_string(stack::repo_root().join(m)).unwrap();
        let found = run.stdout[at..]
            .find(&sql)
            .unwrap_or_else(|| panic!("{m} missing or out of order"));
        at += found + sql.len();
    }
}

#[test]
fn a_late_row_for_a_past_month_is_counted_into_that_month() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             VALUES (1000, '2024-12-31 23:59:59', false, '2024-12'), (1000, '2025-05-02 08:00:00', true, '2025-05')",
        )
        .unwrap();
    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Found 2 requests");
    assert_no_drift(&stack);
    let dec: (i64, i64) = {
        let row = stack
            .sql()
            .query_one("SELECT request_count::bigint, error_count::bigint FROM portal_usage_monthly WHERE portal_id = 1000 AND month_year = '2024-12'", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(dec, (1, 1));
}

#[test]
fn a_dry_run_beside_a_running_run_says_so_and_waits_unless_forced() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 300, 3);
    let running = paused_run(&stack, "page");
    let before = table(&stack);
    aggregate(&stack, &["--dry-run"])
        .assert_status(75)
        .assert_stderr_has("usage-agg: notice: another run holds the lease");
    aggregate(&stack, &["--dry-run", "--force"])
        .assert_status(0)
        .assert_stdout_has("Dry run");
    assert_eq!(table(&stack), before, "a dry run writes nothing");
    resume(running);
    assert_no_drift(&stack);
    usage_agg(&workdir(), &[], &["aggregate", "--force"]).assert_status(64);
}
