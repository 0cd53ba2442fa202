//! Billing-grade months (issue 11; docs/semantics.md, "Closed months"):
//! closing, the closed month's rows that never change, late rows booked as
//! adjustments exactly once by both engines, manual adjustments, usage right
//! now, retention. Ground truth is SQL on a direct connection.

use crate::common::*;

const ENGINES: [&str; 2] = ["rest", "rpc"];

/// The invariant `verify` checks, by SQL: for every key, its monthly row
/// plus its late adjustments equals its good raw rows plus those prune
/// deleted. Returns the keys that differ.
fn invariant_breaks(stack: &Stack) -> Vec<String> {
    stack
        .sql()
        .query(
            "WITH raw AS (
               SELECT portal_id, month_year, count(*) AS n, count(*) FILTER (WHERE success) AS s
                 FROM usage_requests
                WHERE month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$' AND portal_id > 0
                GROUP BY 1, 2
               UNION ALL
               SELECT portal_id, month_year, request_count, success_count FROM usage_agg_pruned
             ), truth AS (
               SELECT portal_id, month_year, sum(n) AS n, sum(s) AS s FROM raw GROUP BY 1, 2
             ), stored AS (
               SELECT portal_id, month_year, sum(n) AS n, sum(s) AS s FROM (
                 SELECT portal_id, month_year::text, request_count::bigint AS n, success_count::bigint AS s
                   FROM portal_usage_monthly
                 UNION ALL
                 SELECT portal_id, month_year, request_count, success_count
                   FROM portal_usage_adjustments WHERE source = 'late') x
                GROUP BY 1, 2
             )
             SELECT portal_id || ':' || month_year || ' rows ' || coalesce(t.n, 0) || ' stored ' || coalesce(s.n, 0)
               FROM truth t FULL JOIN stored s USING (portal_id, month_year)
              WHERE coalesce(t.n, 0) <> coalesce(s.n, 0) OR coalesce(t.s, 0) <> coalesce(s.s, 0)
              ORDER BY 1 LIMIT 10",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[track_caller]
fn assert_invariant(stack: &Stack) {
    let breaks = invariant_breaks(stack);
    assert!(
        breaks.is_empty(),
        "monthly + late adjustments differ from the raw rows: {breaks:?}"
    );
}

/// Every monthly row of the closed months, as a text per row.
fn closed_rows(stack: &Stack) -> Vec<String> {
    stack
        .sql()
        .query(
            "SELECT m::text FROM portal_usage_monthly m
              WHERE month_year IN (SELECT month_year FROM usage_agg_closed_months WHERE closed)
              ORDER BY portal_id, month_year",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The closed months' rows are still `frozen`.
#[track_caller]
fn assert_unchanged(stack: &Stack, frozen: &[String], what: &str) {
    let now = closed_rows(stack);
    if now != frozen {
        let gone: Vec<_> = frozen.iter().filter(|r| !now.contains(r)).take(3).collect();
        let new: Vec<_> = now.iter().filter(|r| !frozen.contains(r)).take(3).collect();
        panic!("{what}: closed months' rows changed: were {gone:?}, now {new:?}");
    }
}

fn late_rows(stack: &Stack) -> i64 {
    count(
        stack,
        "SELECT coalesce(sum(request_count), 0)::bigint FROM portal_usage_adjustments WHERE source = 'late'",
    )
}

/// The months `insert_random` draws from, in order.
fn months_2024() -> Vec<String> {
    (1..=12).map(|m| format!("2024-{m:02}")).collect()
}

#[test]
fn late_rows_of_closed_months_land_in_adjustments_exactly_once_in_both_engines() {
    for (i, engine) in ENGINES.into_iter().enumerate() {
        let stack = migrated_stack();
        let mut rng = Rng(300 + i as u64);
        insert_random(&stack, &mut rng, 3_000, 60);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        for m in &months_2024()[..6] {
            close_sql(&stack, m);
        }
        let mut frozen = closed_rows(&stack);
        for round in 0..8 {
            // Random months across 2024-2025: about a quarter of the rows are
            // late rows of a closed month.
            let n = 200 + rng.below(1_500) as usize;
            insert_random(&stack, &mut rng, n, 60);
            // Both engines, alternating, on top of each other's adjustments.
            let e = if round % 2 == 0 {
                engine
            } else {
                ENGINES[1 - i]
            };
            aggregate(&stack, &["--engine", e, "--batch-size", "500"])
                .assert_status(0)
                .assert_stdout_has("rows of closed months booked as late adjustments");
            assert_invariant(&stack);
            assert_unchanged(&stack, &frozen, &format!("{engine} round {round}"));
            if round == 3 {
                // Closing later months moves the booking month forward.
                for m in &months_2024()[6..] {
                    close_sql(&stack, m);
                }
                frozen = closed_rows(&stack);
            }
        }
        let booked: Vec<String> = stack
            .sql()
            .query(
                "SELECT DISTINCT booked_month FROM portal_usage_adjustments ORDER BY 1",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(booked, ["2024-07", "2025-01"], "{engine}");
        assert!(
            late_rows(&stack) > 500,
            "{engine}: late rows were exercised"
        );
        usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"]).assert_status(0);
    }
}

#[test]
fn a_run_killed_anywhere_on_the_adjustment_path_leaves_every_row_counted_once_in_both_engines() {
    let stack = migrated_stack();
    let mut rng = Rng(77);
    insert_random(&stack, &mut rng, 1_500, 300);
    aggregate(&stack, &[]).assert_status(0);
    for m in &months_2024() {
        close_sql(&stack, m);
    }
    let frozen = closed_rows(&stack);
    let rest_points = ["page", "chunk", "before-cursor", "after-cursor"];
    let mut kills = [0; 2];
    for iteration in 0..40 {
        let engine = ENGINES[iteration % 2];
        let n = 300 + rng.below(1_200) as usize;
        insert_random(&stack, &mut rng, n, 300);
        let (point, at) = if engine == "rest" {
            (rest_points[rng.below(4) as usize], 1 + rng.below(3))
        } else {
            // The server-side engine: killed between its batches.
            ("page", 1 + rng.below(3))
        };
        let killed = aggregate_failing(
            &stack,
            &format!("{point}=abort@{at}"),
            &[
                "--engine",
                engine,
                "--page-size",
                "200",
                "--batch-size",
                "300",
            ],
        );
        assert!(
            killed.status == -1 || killed.status == 0,
            "iteration {iteration} ({engine} {point}@{at}): {}\n{}",
            killed.status,
            killed.stderr
        );
        kills[iteration % 2] += usize::from(killed.status == -1);
        if iteration % 4 == 0 {
            insert_random(&stack, &mut rng, 50, 300);
        }
        // Finished by the other engine every other time.
        let next = ENGINES[(iteration / 2) % 2];
        aggregate(&stack, &["--engine", next]).assert_status(0);
        assert_invariant(&stack);
        assert_unchanged(&stack, &frozen, &format!("iteration {iteration}"));
    }
    assert!(
        kills[0] >= 12 && kills[1] >= 12,
        "only {kills:?} of 20 runs per engine were killed: the failpoints are not being reached"
    );
    assert!(late_rows(&stack) > 3_000);
    usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"]).assert_status(0);
}

#[test]
fn a_project_without_the_periods_migration_is_told_to_apply_it() {
    let mut stack = Stack::new();
    migrate_file(&mut stack, MIGRATIONS[0]);
    migrate_file(&mut stack, MIGRATIONS[1]);
    insert_rows(&stack, 50, 2);
    for args in [&[][..], &["--engine", "rpc"][..]] {
        aggregate(&stack, args)
            .assert_status(78)
            .assert_stderr_has("usage_agg_rule_book.sql is missing")
            .assert_stderr_has("`usage-agg sql | psql");
    }
}

fn usage(stack: &Stack, args: &[&str]) -> Run {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--env", "dev"]);
    usage_agg(&workdir(), &stack.env(), &all)
}

/// The database's current month (UTC), and the one before it.
fn this_and_last_month(stack: &Stack) -> (String, String) {
    let r = stack
        .sql()
        .query_one(
            "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM'),
                    to_char((now() AT TIME ZONE 'UTC') - interval '1 month', 'YYYY-MM')",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn closing_is_refused_inside_the_grace_window_and_with_drift_twice_is_a_no_op_and_reopen_is_recorded(
) {
    let stack = migrated_stack();
    let (now_month, last_month) = this_and_last_month(&stack);
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-05", 3);
    insert_month(&stack, 1, &now_month, 4);
    aggregate(&stack, &[]).assert_status(0);

    // Inside the grace window: the current month has not even ended; the
    // last month is still within a 300-day grace. Exit 64, naming when.
    usage(&stack, &["close", "--month", &now_month])
        .assert_status(64)
        .assert_stderr_has("cannot close yet")
        .assert_stderr_has("the earliest it can close is");
    usage(
        &stack,
        &["close", "--month", &last_month, "--grace", "300d"],
    )
    .assert_status(64)
    .assert_stderr_has("still inside its grace period");
    usage(&stack, &["close", "--month", "2099-01"])
        .assert_status(64)
        .assert_stderr_has("has not even begun");

    // Drift: a counted row deleted behind the job's back. Exit 65, the key
    // named, the month left open.
    stack
        .sql()
        .batch_execute("DELETE FROM usage_requests WHERE id = (SELECT min(id) FROM usage_requests WHERE portal_id = 2)")
        .unwrap();
    usage(&stack, &["close", "--month", "2025-05"])
        .assert_status(65)
        .assert_stderr_has("2:2025-05");
    assert_eq!(
        count(&stack, "SELECT count(*) FROM usage_agg_closed_months"),
        0
    );
    aggregate(&stack, &["--month", "2025-05", "--allow-decrease"]).assert_status(0);

    // A dry run checks and writes nothing; then it closes, catching up first.
    usage(&stack, &["close", "--month", "2025-05", "--dry-run"])
        .assert_status(0)
        .assert_stdout_has("Dry run: 2025-05 can close");
    assert_eq!(
        count(&stack, "SELECT count(*) FROM usage_agg_closed_months"),
        0
    );
    insert_month(&stack, 3, "2025-05", 2);
    let run = usage(&stack, &["close", "--month", "2025-05", "--json"]);
    run.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["outcome"], "closed");
    assert_eq!(
        (v["keys"].as_i64(), v["requests"].as_i64()),
        (Some(3), Some(9))
    );
    assert_eq!(v["caught_up_rows"], 2);
    let by = v["closed_by"].as_str().unwrap().to_string();
    assert!(by.contains('@'), "{by}");

    // Twice: a no-op that says so.
    usage(&stack, &["close", "--month", "2025-05"])
        .assert_status(0)
        .assert_stdout_has("2025-05 is already closed");
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM usage_agg_period_events WHERE event = 'close'"
        ),
        1
    );

    // Closed: no hand edit either.
    let edit = stack.sql().batch_execute(
        "UPDATE portal_usage_monthly SET request_count = 0 WHERE month_year = '2025-05'",
    );
    assert!(format!("{:?}", edit.unwrap_err()).contains("2025-05 is closed"));

    // Reopen: refused without a reason; recorded with one.
    usage(&stack, &["reopen", "--month", "2025-05"]).assert_status(64);
    usage(&stack, &["reopen", "--month", "2025-05", "--reason", "  "])
        .assert_status(64)
        .assert_stderr_has("a reason cannot be empty");
    usage(
        &stack,
        &[
            "reopen",
            "--month",
            "2025-05",
            "--reason",
            "invoice disputed by portal 2",
        ],
    )
    .assert_status(0)
    .assert_stdout_has("Reopened 2025-05");
    let r = stack
        .sql()
        .query_one(
            "SELECT e.by, e.reason, c.closed, c.reopen_reason, e.at IS NOT NULL
               FROM usage_agg_period_events e JOIN usage_agg_closed_months c USING (month_year)
              WHERE e.event = 'reopen'",
            &[],
        )
        .unwrap();
    let (who, why, closed, reason, when): (String, String, bool, String, bool) =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
    assert!(who.contains('@') && when);
    assert_eq!(
        (why.as_str(), closed, reason.as_str()),
        (
            "invoice disputed by portal 2",
            false,
            "invoice disputed by portal 2"
        )
    );
    usage(
        &stack,
        &["reopen", "--month", "2025-05", "--reason", "again"],
    )
    .assert_status(0)
    .assert_stdout_has("2025-05 is not closed; nothing to do");

    // Open again: its new rows go to its monthly rows.
    insert_month(&stack, 1, "2025-05", 2);
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 0);
}

#[test]
fn bad_input_gets_a_clear_message_and_exit_64() {
    for (args, needle) in [
        (
            &["close", "--month", "2025-05", "--grace", "-1h"][..],
            "cannot be negative",
        ),
        (&["close", "--month", "2025-13"][..], "is not a month"),
        (&["close"][..], "--month"),
        (&["reopen", "--month", "2025-05"][..], "--reason"),
    ] {
        usage_agg(&workdir(), &[], args)
            .assert_status(64)
            .assert_stderr_has(needle);
    }
}

#[test]
fn adjust_books_once_per_id_signed_and_verify_shows_it_apart() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 6);
    insert_month(&stack, 2, "2025-06", 2);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);

    let adjust = |extra: &[&str]| {
        let mut args = vec!["adjust", "--portal", "1", "--month", "2025-05"];
        args.extend_from_slice(extra);
        usage(&stack, &args)
    };
    let refund = [
        "--requests",
        "-2",
        "--reason",
        "refund: duplicate webhook deliveries",
        "--id",
        "r-1",
    ];
    adjust(&refund)
        .assert_status(0)
        .assert_stdout_has("Booked manual adjustment r-1")
        .assert_stdout_has("-2 requests")
        .assert_stdout_has("in 2025-06's invoice");
    adjust(&refund)
        .assert_status(0)
        .assert_stdout_has("was already booked");
    adjust(&["--requests", "-3", "--reason", "x", "--id", "r-1"])
        .assert_status(64)
        .assert_stderr_has("already used for a different adjustment");
    let booked = stack
        .sql()
        .query_one(
            "SELECT count(*), sum(request_count)::bigint, min(booked_month), min(reason), bool_and(created_at <= now())
               FROM portal_usage_adjustments WHERE source = 'manual'",
            &[],
        )
        .unwrap();
    let (n, total, month, reason, timed): (i64, i64, String, String, bool) = (
        booked.get(0),
        booked.get(1),
        booked.get(2),
        booked.get(3),
        booked.get(4),
    );
    assert_eq!((n, total, month.as_str(), timed), (1, -2, "2025-06", true));
    assert!(reason.starts_with("refund"));

    // Bad input: a portal with no usage, a month in the future, no reason.
    usage(
        &stack,
        &[
            "adjust",
            "--portal",
            "99999",
            "--month",
            "2025-05",
            "--requests",
            "1",
            "--reason",
            "r",
            "--id",
            "x-1",
        ],
    )
    .assert_status(64)
    .assert_stderr_has("portal 99999 has no usage recorded");
    usage(
        &stack,
        &[
            "adjust",
            "--portal",
            "1",
            "--month",
            "2099-01",
            "--requests",
            "1",
            "--reason",
            "r",
            "--id",
            "x-2",
        ],
    )
    .assert_status(64)
    .assert_stderr_has("2099-01 is in the future");
    usage(
        &stack,
        &[
            "adjust",
            "--portal",
            "1",
            "--month",
            "2025-05",
            "--requests",
            "1",
            "--id",
            "x-3",
        ],
    )
    .assert_status(64)
    .assert_stderr_has("--reason");
    usage(
        &stack,
        &[
            "adjust",
            "--portal",
            "1",
            "--month",
            "2025-05",
            "--requests",
            "5",
            "--successes",
            "1",
            "--errors",
            "1",
            "--reason",
            "r",
            "--id",
            "x-4",
        ],
    )
    .assert_status(64)
    .assert_stderr_has("add up to 2, not --requests 5");
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_adjustments"),
        1
    );

    // History is never edited.
    let edit = stack.sql().batch_execute(
        "UPDATE portal_usage_adjustments SET request_count = -1, success_count = -1",
    );
    assert!(format!("{:?}", edit.unwrap_err()).contains("never edited"));

    // verify: the manual adjustment apart, the closed month against its snapshot.
    usage(&stack, &["verify"])
        .assert_status(0)
        .assert_stdout_has("Closed months: 1 checked")
        .assert_stdout_has("Manual adjustments: 1 entries, -2 requests");
    // Closing 2025-06 freezes what is booked in it too: an edit past the
    // trigger shows.
    usage(&stack, &["close", "--month", "2025-06"]).assert_status(0);
    assert_eq!(
        count(
            &stack,
            "SELECT booked_request_count FROM usage_agg_closed_months WHERE month_year = '2025-06'"
        ),
        -2
    );
    let tamper = |n: i64| {
        stack
            .sql()
            .batch_execute(&format!(
                "ALTER TABLE portal_usage_adjustments DISABLE TRIGGER usage_agg_guard_adjustment;
                 UPDATE portal_usage_adjustments SET request_count = {n}, success_count = {n} WHERE idempotency_key = 'r-1';
                 ALTER TABLE portal_usage_adjustments ENABLE TRIGGER usage_agg_guard_adjustment;"
            ))
            .unwrap()
    };
    tamper(-5);
    usage(&stack, &["verify"])
        .assert_status(65)
        .assert_stdout_has("2025-06: closed with -2 requests of adjustments booked in it; now -5");
    tamper(-2);
    usage(&stack, &["verify"])
        .assert_status(0)
        .assert_stdout_has("Closed months: 2 checked");
    stack
        .sql()
        .batch_execute(
            "ALTER TABLE portal_usage_monthly DISABLE TRIGGER usage_agg_closed_month_update;
             UPDATE portal_usage_monthly SET request_count = 60, success_count = 60 WHERE month_year = '2025-05';
             ALTER TABLE portal_usage_monthly ENABLE TRIGGER usage_agg_closed_month_update;",
        )
        .unwrap();
    let run = usage(&stack, &["verify", "--json"]);
    run.assert_status(65);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["snapshot_mismatches"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["manual_adjustments"]["requests"], -2);
}

#[test]
fn usage_current_equals_the_truth_while_inserts_and_runs_go_on() {
    let stack = migrated_stack();
    let (now_month, _) = this_and_last_month(&stack);
    insert_month(&stack, 7, "2025-05", 20);
    insert_month(&stack, 8, &now_month, 30);
    insert_month(&stack, 7, &now_month, 10);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 7, "2025-05", 3);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(late_rows(&stack), 3);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inserter = std::thread::spawn({
        let db = stack.database_url.clone();
        let now_month = now_month.clone();
        let stop = stop.clone();
        move || {
            let mut c = postgres::Client::connect(&db, postgres::NoTls).unwrap();
            let mut rng = Rng(5);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let month = if rng.below(3) == 0 {
                    "2025-05"
                } else {
                    now_month.as_str()
                };
                let n = 1 + rng.below(20);
                c.batch_execute(&format!(
                    "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
                     SELECT 7, now(), g % 5 <> 0, '{month}' FROM generate_series(1, {n}) g"
                ))
                .unwrap();
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        }
    });
    let runner = std::thread::spawn({
        let env = stack.env();
        let stop = stop.clone();
        move || {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let engine = ENGINES[i % 2];
                let run = usage_agg(
                    &workdir(),
                    &env,
                    &[
                        "aggregate",
                        "--env",
                        "dev",
                        "--engine",
                        engine,
                        "--batch-size",
                        "40",
                    ],
                );
                assert!(
                    matches!(run.status, 0 | 75),
                    "{}\n{}",
                    run.stdout,
                    run.stderr
                );
                i += 1;
            }
            i
        }
    });
    // Each check is one statement, so one snapshot: usage_current and the
    // raw rows, whatever the runs and inserts are doing.
    let mut db = stack.sql();
    for i in 0..150 {
        for month in [now_month.as_str(), "2025-05"] {
            let r = db
                .query_one(
                    "SELECT (SELECT row(request_count, success_count, error_count)::text FROM usage_current(7, $1)),
                            (SELECT row(count(*), count(*) FILTER (WHERE success), count(*) FILTER (WHERE NOT success))::text
                               FROM usage_requests WHERE portal_id = 7 AND month_year = $1)",
                    &[&month],
                )
                .unwrap();
            let (current, truth): (String, String) = (r.get(0), r.get(1));
            assert_eq!(current, truth, "check {i}, {month}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    inserter.join().unwrap();
    assert!(
        runner.join().unwrap() >= 2,
        "runs went on during the checks"
    );
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);

    // Over REST, as `report --live` and an app's quota check call it.
    let truth = count(
        &stack,
        &format!("SELECT count(*) FROM usage_requests WHERE portal_id = 7 AND month_year = '{now_month}'"),
    );
    insert_month(&stack, 7, &now_month, 4);
    let run = usage(&stack, &["report", "--portal", "7", "--live", "--json"]);
    run.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["rows"][0]["requests"].as_i64(), Some(truth + 4), "{v}");
    assert_eq!(v["rows"][0]["month"], now_month.as_str());

    // service_role alone may call it: it reads any portal's usage, past row
    // level security, so a signed-in user of the app may not (issue 18).
    let mut db = stack.sql();
    db.batch_execute("SET ROLE service_role; SELECT * FROM usage_current(7); RESET ROLE")
        .unwrap();
    for role in ["anon", "authenticated"] {
        let refused = stack
            .sql()
            .batch_execute(&format!("SET ROLE {role}; SELECT * FROM usage_current(7)"));
        assert!(
            format!("{:?}", refused.unwrap_err()).contains("permission denied"),
            "{role}"
        );
    }
}

fn billed_total(stack: &Stack) -> i64 {
    count(
        stack,
        "SELECT (SELECT coalesce(sum(request_count), 0) FROM portal_usage_monthly)::bigint
              + (SELECT coalesce(sum(request_count), 0) FROM portal_usage_adjustments)::bigint",
    )
}

#[test]
fn prune_keeps_closed_months_checkable_resumes_after_a_kill_and_full_leaves_them_alone() {
    let stack = migrated_stack();
    let mut rng = Rng(909);
    insert_random(&stack, &mut rng, 4_000, 50);
    aggregate(&stack, &[]).assert_status(0);
    for m in months_2024() {
        close_sql(&stack, &m);
    }
    insert_random(&stack, &mut rng, 600, 50);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert!(late_rows(&stack) > 0);
    let frozen = closed_rows(&stack);
    let total = billed_total(&stack);
    let raw_2024 = "SELECT count(*) FROM usage_requests WHERE month_year < '2025-01'";
    let before = count(&stack, raw_2024);

    // Open months before the limit are named and refused.
    usage(&stack, &["prune", "--before", "2025-03"])
        .assert_status(64)
        .assert_stderr_has("months before 2025-03 are open: 2025-01, 2025-02");
    let dry = usage(
        &stack,
        &["prune", "--before", "2025-01", "--dry-run", "--json"],
    );
    dry.assert_status(0);
    let v: serde_json::Value = serde_json::from_str(dry.stdout.trim()).unwrap();
    assert_eq!(v["rows_left"].as_i64(), Some(before), "{v}");
    assert_eq!(count(&stack, raw_2024), before);

    // Killed after its second batch: what it deleted is booked, verify
    // agrees, and the next prune resumes where it stopped.
    let killed = usage_agg(
        &workdir(),
        &failing(&stack, "page=abort@2"),
        &[
            "prune",
            "--env",
            "dev",
            "--before",
            "2025-01",
            "--batch-size",
            "500",
        ],
    );
    assert_eq!(killed.status, -1, "{}", killed.stderr);
    let left = count(&stack, raw_2024);
    assert!(left < before && left > 0, "{left} of {before}");
    assert_eq!(
        count(
            &stack,
            "SELECT min(pruned_through) FROM usage_agg_closed_months"
        ),
        1_000
    );
    assert_invariant(&stack);
    usage(&stack, &["verify"]).assert_status(0);
    usage(
        &stack,
        &["prune", "--before", "2025-01", "--batch-size", "500"],
    )
    .assert_status(0)
    .assert_stdout_has("Pruned");
    assert_eq!(count(&stack, raw_2024), 0);
    assert_invariant(&stack);
    assert_eq!(billed_total(&stack), total, "the totals never drop");
    assert_unchanged(&stack, &frozen, "after the prune");
    usage(&stack, &["verify"])
        .assert_status(0)
        .assert_stdout_has("Pruned rows: ");

    // A rebuild leaves the pruned months as they were.
    aggregate(&stack, &["--full"])
        .assert_status(0)
        .assert_stdout_has("Closed months left as they are: 2024-01");
    assert_unchanged(&stack, &frozen, "after --full");
    aggregate(&stack, &["--month", "2024-03"])
        .assert_status(0)
        .assert_stdout_has("Closed months left as they are: 2024-03");

    // Late rows after the prune are booked, checked, and pruned in turn.
    insert_random(&stack, &mut rng, 300, 50);
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);
    usage(&stack, &["verify"]).assert_status(0);
    usage(&stack, &["prune", "--before", "2025-01"]).assert_status(0);
    assert_eq!(count(&stack, raw_2024), 0);
    assert_invariant(&stack);
    usage(&stack, &["verify"]).assert_status(0);
    assert_unchanged(&stack, &frozen, "at the end");
}

#[test]
fn aggregate_auto_close_closes_every_month_past_its_grace_unless_it_drifts() {
    let stack = migrated_stack();
    let (now_month, _) = this_and_last_month(&stack);
    for (p, m) in [
        (1, "2025-04"),
        (1, "2025-05"),
        (2, "2025-06"),
        (1, now_month.as_str()),
    ] {
        insert_month(&stack, p, m, 3);
    }
    aggregate(&stack, &[]).assert_status(0);
    // 2025-06 drifts: a counted row deleted behind the job's back.
    stack
        .sql()
        .batch_execute("DELETE FROM usage_requests WHERE id = (SELECT min(id) FROM usage_requests WHERE month_year = '2025-06')")
        .unwrap();
    insert_month(&stack, 3, "2025-05", 2);
    let run = aggregate(&stack, &["--auto-close", "72h", "--json"]);
    run.assert_status(65);
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(
        v["auto_closed"],
        serde_json::json!(["2025-04", "2025-05"]),
        "{v}"
    );
    assert_eq!(v["auto_close_refused"][0]["month"], "2025-06", "{v}");
    assert!(v["auto_close_refused"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("2:2025-06"));
    assert_eq!(
        count(
            &stack,
            "SELECT keys FROM usage_agg_closed_months WHERE month_year = '2025-05'"
        ),
        2,
        "caught up before closing"
    );

    aggregate(&stack, &["--month", "2025-06", "--allow-decrease"]).assert_status(0);
    aggregate(&stack, &["--auto-close", "72h"])
        .assert_status(0)
        .assert_stdout_has("Closed 2025-06");
    aggregate(&stack, &["--auto-close", "72h"]).assert_status(0);
    let closed: Vec<String> = stack
        .sql()
        .query(
            "SELECT month_year FROM usage_agg_closed_months WHERE closed ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        closed,
        ["2025-04", "2025-05", "2025-06"],
        "the current month stays open"
    );
    usage_agg(&workdir(), &[], &["aggregate", "--auto-close", "-1h"])
        .assert_status(64)
        .assert_stderr_has("cannot be negative");
    usage_agg(
        &workdir(),
        &[],
        &["aggregate", "--auto-close", "72h", "--dry-run"],
    )
    .assert_status(64);
}

#[test]
fn status_and_report_show_closed_months_adjustments_and_the_billed_total() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-04", 5);
    insert_month(&stack, 1, "2025-05", 4);
    insert_month(&stack, 2, "2025-05", 2);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-04"]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-04", 3);
    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("3 rows of closed months booked as late adjustments");
    usage(
        &stack,
        &[
            "adjust",
            "--portal",
            "1",
            "--month",
            "2025-05",
            "--requests",
            "-1",
            "--reason",
            "goodwill",
            "--id",
            "g-1",
        ],
    )
    .assert_status(0);

    // Booked in 2025-06, the month after the newest closed one.
    let csv = usage(
        &stack,
        &[
            "report", "--portal", "1", "--month", "2025-06", "--months", "3", "--format", "csv",
        ],
    );
    csv.assert_status(0);
    let lines: Vec<&str> = csv.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "portal_id,month,requests,successes,errors,success_rate,late_adjustments,manual_adjustments,billed",
            "1,2025-06,0,0,0,,3,-1,2",
            "1,2025-05,4,4,0,100.0,0,0,4",
            "1,2025-04,5,5,0,100.0,0,0,5",
        ]
    );
    usage(&stack, &["report", "--portal", "1", "--month", "2025-06"])
        .assert_status(0)
        .assert_stdout_has("billed = requests + adjustments booked in that month");
    let top: serde_json::Value = serde_json::from_str(
        usage(&stack, &["report", "--month", "2025-05", "--json"])
            .stdout
            .trim(),
    )
    .unwrap();
    assert_eq!(top["rows"][0]["billed"], 4, "{top}");

    let run = usage(&stack, &["status"]);
    run.assert_status(0)
        .assert_stdout_has("Closed months: 2 (2025-04, 2025-05); newest closed 2025-05")
        .assert_stdout_has("Prunable:      14 raw rows of closed months are still there (`usage-agg prune --before 2025-06`)");
    let v: serde_json::Value =
        serde_json::from_str(usage(&stack, &["status", "--json"]).stdout.trim()).unwrap();
    assert_eq!(
        (v["newest_closed"].as_str(), v["prunable_rows"].as_i64()),
        (Some("2025-05"), Some(14))
    );
    assert_eq!(v["closed_months"].as_array().unwrap().len(), 2);
    usage(
        &stack,
        &["reopen", "--month", "2025-05", "--reason", "audit"],
    )
    .assert_status(0);
    usage(&stack, &["status"])
        .assert_status(0)
        .assert_stdout_has("Reopened:      2025-05 by ")
        .assert_stdout_has("Closable:      2025-05");

    // Without the periods migration, status says so, as the runs would (78).
    let mut old = Stack::new();
    migrate_file(&mut old, MIGRATIONS[0]);
    migrate_file(&mut old, MIGRATIONS[1]);
    usage_agg(&workdir(), &old.env(), &["status", "--env", "dev"])
        .assert_status(78)
        .assert_stdout_has("the periods migration is not applied");
}

#[test]
fn a_rebase_keeps_closed_months_totals_and_books_their_later_rows_late() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-04", 5);
    insert_month(&stack, 1, "2025-05", 3);
    aggregate(&stack, &[]).assert_status(0);
    close_sql(&stack, "2025-04");
    insert_month(&stack, 1, "2025-04", 2);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_eq!(late_rows(&stack), 2);

    // A dev reset that keeps the totals: raw rows gone, ids from 1 again.
    stack
        .sql()
        .batch_execute("DELETE FROM usage_requests; ALTER SEQUENCE usage_requests_id_seq RESTART")
        .unwrap();
    insert_month(&stack, 1, "2025-05", 2);
    aggregate(&stack, &[])
        .assert_status(65)
        .assert_stderr_has("--rebase");
    aggregate(&stack, &["--rebase"])
        .assert_status(0)
        .assert_stdout_has("Closed months left as they are: 2025-04");
    let closed = stack
        .sql()
        .query_one(
            "SELECT request_count::bigint, last_request_id FROM portal_usage_monthly WHERE month_year = '2025-04'",
            &[],
        )
        .unwrap();
    // Counts kept; the watermark at the rebase's horizon (the new cursor):
    // every row of a closed month up to it is booked.
    let cursor = count(&stack, "SELECT cursor_id FROM usage_aggregation_state");
    assert_eq!(
        (closed.get::<_, i64>(0), closed.get::<_, i64>(1)),
        (5, cursor),
        "counts kept, watermark at the horizon"
    );
    assert_eq!(
        count(
            &stack,
            "SELECT max(last_request_id) FROM portal_usage_adjustments"
        ),
        cursor
    );
    assert_eq!(late_rows(&stack), 2, "booked adjustments stay");
    assert_eq!(
        count(
            &stack,
            "SELECT request_count::bigint FROM portal_usage_monthly WHERE month_year = '2025-05'"
        ),
        2,
        "an open month is rebuilt from its rows"
    );
    // Rows of the closed month that come now are booked late, once.
    insert_month(&stack, 1, "2025-04", 4);
    aggregate(&stack, &[]).assert_status(0);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_eq!(late_rows(&stack), 6);
    usage(&stack, &["status"]).assert_status(0);
}

/// Found by an adversarial pass: a REST run that read "2025-05 closed",
/// then stalled past its lease while the month was reopened and closed
/// again (the close's catch-up counting the late rows into the monthly
/// row), wrote its late adjustment with the same rows: billed twice, exit 0.
#[test]
fn a_stale_run_cannot_book_late_rows_a_reopen_and_second_close_already_counted() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-05", 3); // late rows of the closed month
    insert_month(&stack, 2, "2025-06", 1); // an open key: the monthly chunk comes first
    let stale = paused_run_with(&stack, "chunk", &["--engine", "rest"]);
    expire_lease(&stack);
    usage(
        &stack,
        &[
            "reopen",
            "--month",
            "2025-05",
            "--reason",
            "customer dispute",
        ],
    )
    .assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    // The stale run's rows are booked where the months are now, by the rule
    // book in the database, which finds them counted by the second close.
    let (status, out) = stale.finish();
    assert_eq!(status, 0, "the stale run books nothing twice\n{out}");
    assert_invariant(&stack);
    let billed = billed_total(&stack);
    let truth = count(&stack, "SELECT count(*) FROM usage_requests");
    assert_eq!(billed, truth, "billed once");
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);
}

/// `CALL usage_agg_run_scheduled()` on a direct connection: Ok, or the
/// error's message.
fn call_scheduled(stack: &Stack) -> Result<(), String> {
    stack
        .sql()
        .simple_query("CALL public.usage_agg_run_scheduled()")
        .map(|_| ())
        .map_err(|e| {
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_string())
        })
}

/// Issue 17, case 1: the REST engine and the server-side batch kept a late
/// adjustment's `counted_from_id` differently, so after a month was closed,
/// booked late, reopened, counted and closed again, every server-side batch
/// and scheduled run failed for good (P0001 "... already counted in its
/// monthly row"). One rule book books for every engine now.
#[test]
fn a_month_closed_twice_keeps_every_engine_booking_its_late_rows() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-05", 1);
    aggregate(&stack, &["--engine", "rest"]).assert_status(0);
    usage(
        &stack,
        &["reopen", "--month", "2025-05", "--reason", "dispute"],
    )
    .assert_status(0);
    insert_month(&stack, 1, "2025-05", 2);
    aggregate(&stack, &["--engine", "rest"]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    assert_invariant(&stack);
    for engine in ["rpc", "rest", "rpc"] {
        insert_month(&stack, 1, "2025-05", 1);
        insert_month(&stack, 2, "2025-06", 1);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        assert_invariant(&stack);
    }
    insert_month(&stack, 1, "2025-05", 1);
    call_scheduled(&stack).expect("the scheduled run books the late row");
    assert_invariant(&stack);
    assert_eq!(
        billed_total(&stack),
        count(&stack, "SELECT count(*) FROM usage_requests"),
        "billed once"
    );
}

/// Issue 17, case 2: `--rebase` took every row of a closed month at or
/// below the new cursor as counted, so rows committed after the last run
/// were on no invoice, with exit 0. Now they are booked late, once; and a
/// second rebase books nothing more.
#[test]
fn a_rebase_books_a_closed_months_uncounted_rows_late_instead_of_dropping_them() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    // Committed, not yet counted, when an operator runs a rebase.
    insert_month(&stack, 1, "2025-05", 3);
    insert_month(&stack, 2, "2025-06", 2);
    aggregate(&stack, &["--rebase"])
        .assert_status(0)
        .assert_stdout_has("3 rows of closed months committed but never counted");
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 3);
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 3, "a second rebase books nothing more");
    usage(&stack, &["verify"]).assert_status(0);
}

/// Issue 17, case 2, after a prune: the closed month's raw rows are gone
/// (their counts are in the pruned record), the sequence restarts, and new
/// rows of that month take the freed ids. `aggregate` refuses (65); the
/// rebase then books the new rows late, instead of taking them as counted.
#[test]
fn a_rebase_after_a_prune_and_a_sequence_restart_books_the_new_rows_of_a_closed_month() {
    let mut stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    usage(&stack, &["prune", "--before", "2025-06"]).assert_status(0);
    stack.ddl("ALTER SEQUENCE usage_requests_id_seq RESTART WITH 1");
    insert_month(&stack, 1, "2025-05", 3);
    aggregate(&stack, &[]).assert_status(65);
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 3);
}

/// Prune deletes a closed month's rows up to the cursor as counted. After a
/// sequence restart, new rows of that month take ids below the cursor and
/// are counted by no one until `--rebase`: a prune then deleted them, and
/// the rebase booked them from the pruned record with the latest request
/// time of the rows still there (found by the model-based test, seed
/// 2654341). The prune refuses (65) and deletes nothing; after the rebase it
/// prunes, and the billed latest time is the rows' latest.
#[test]
fn prune_refuses_while_a_sequence_restart_leaves_rows_below_the_cursor_uncounted() {
    let mut stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 1, "2025-06", 8);
    // Ids 14 and 15 are handed out and gone, so the cursor passes them.
    insert_month(&stack, 1, "2025-06", 2);
    stack
        .sql()
        .batch_execute("DELETE FROM usage_requests WHERE id > 13")
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    stack.ddl("ALTER SEQUENCE usage_requests_id_seq RESTART WITH 14");
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, month_year, success, request_timestamp)
             VALUES (1, '2025-05', true, '2025-05-31 23:00:00')",
        )
        .unwrap();
    let rows = || -> i64 {
        stack
            .sql()
            .query_one("SELECT count(*) FROM usage_requests", &[])
            .unwrap()
            .get(0)
    };
    let before = rows();
    usage(&stack, &["prune", "--before", "2025-06"])
        .assert_status(65)
        .assert_stderr_has("refused to prune")
        .assert_stderr_has("--rebase");
    assert_eq!(rows(), before, "nothing deleted");
    aggregate(&stack, &["--rebase"]).assert_status(0);
    usage(&stack, &["prune", "--before", "2025-06"]).assert_status(0);
    assert_invariant(&stack);
    let latest: String = stack
        .sql()
        .query_one(
            "SELECT max(at)::text FROM (
               SELECT last_request_at AS at FROM portal_usage_monthly WHERE month_year = '2025-05'
               UNION ALL
               SELECT last_request_at FROM portal_usage_adjustments WHERE month_year = '2025-05') x",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(latest, "2025-05-31 23:00:00");
    usage(&stack, &["verify"]).assert_status(0);
}

/// The restore of a deleted monthly row counted the key's rows up to the
/// cursor but took away its whole late adjustment, which counted rows above
/// the cursor (a run booked them and died before it moved the cursor):
/// billed 5 against 7 rows, exit 0 (an adversarial pass). Now each key is
/// counted up to its highest watermark.
#[test]
fn a_restored_key_counts_the_late_rows_a_killed_run_booked_above_the_cursor() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 3);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-05", 2);
    insert_month(&stack, 2, "2025-06", 1);
    let killed = aggregate_failing(&stack, "before-cursor=abort@1", &["--full"]);
    assert_eq!(killed.status, -1, "{}{}", killed.stdout, killed.stderr);
    assert_eq!(
        late_rows(&stack),
        2,
        "the late rows are booked, the cursor not moved"
    );
    usage(
        &stack,
        &["reopen", "--month", "2025-05", "--reason", "dispute"],
    )
    .assert_status(0);
    stack
        .sql()
        .batch_execute(
            "DELETE FROM portal_usage_monthly WHERE portal_id = 1 AND month_year = '2025-05'",
        )
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);
    usage(&stack, &["verify"]).assert_status(0);
}

/// A transaction that inserted a row at or below the cursor holds the job's
/// state row until it ends (the trigger that records the reset wrote it):
/// a run waited on it until the statement timeout and exited 69 as if the
/// server had failed. It now exits 75 within seconds, naming the prepared
/// transaction to end; once it is ended, the rebase repairs the reset.
#[test]
fn a_prepared_insert_below_the_cursor_blocks_the_lease_with_exit_75_naming_it() {
    let mut stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 3);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-06"]).assert_status(0);
    usage(&stack, &["prune", "--before", "2025-07"]).assert_status(0);
    // Ids 1.. are free again, below the cursor (8).
    stack.ddl("ALTER SEQUENCE usage_requests_id_seq RESTART WITH 1");
    let mut c = stack.sql();
    c.batch_execute(
        "BEGIN; INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
         VALUES (1, '2025-05-31 23:00:00', true, '2025-05'); PREPARE TRANSACTION 'held-below-cursor'",
    )
    .unwrap();
    // 75, not 69: it did not wait for the statement timeout.
    aggregate(&stack, &["--rebase"])
        .assert_status(75)
        .assert_stderr_has("held-below-cursor")
        .assert_stderr_has("COMMIT PREPARED");
    c.batch_execute("COMMIT PREPARED 'held-below-cursor'")
        .unwrap();
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_invariant(&stack);
    assert_eq!(
        late_rows(&stack),
        1,
        "the row of the closed month is booked late, once"
    );
    usage(&stack, &["verify"]).assert_status(0);
}

/// `report --month` lists every portal billed in that month, including one
/// billed only through adjustments booked there (a customer that churned,
/// whose late rows land on its next invoice); before, the top list left it
/// out and the month's total with it (an adversarial pass). Also a month
/// with adjustments and no monthly row at all.
#[test]
fn report_of_a_month_lists_portals_billed_only_through_adjustments() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-05", 4);
    insert_month(&stack, 2, "2025-06", 3);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-05", 2);
    aggregate(&stack, &[]).assert_status(0);
    let billed_by_sql = |month: &str| {
        count(
            &stack,
            &format!(
                "SELECT ((SELECT coalesce(sum(request_count), 0) FROM portal_usage_monthly WHERE month_year = '{month}')
                      + (SELECT coalesce(sum(request_count), 0) FROM portal_usage_adjustments
                          WHERE booked_month = '{month}'))::bigint"
            ),
        )
    };
    let billed_in_report = |args: &[&str]| -> (i64, usize, String) {
        let mut a = vec!["report"];
        a.extend_from_slice(args);
        a.push("--json");
        let r = usage(&stack, &a);
        r.assert_status(0);
        let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        let rows = v["rows"].as_array().unwrap();
        (
            rows.iter().map(|row| row["billed"].as_i64().unwrap()).sum(),
            rows.len(),
            v["title"].as_str().unwrap().to_string(),
        )
    };
    let (billed, portals, title) = billed_in_report(&["--month", "2025-06"]);
    assert_eq!((billed, portals), (billed_by_sql("2025-06"), 2), "{title}");
    assert_eq!(title, "All 2 portals by requests, 2025-06");
    // --top 1: the portal with requests first, and the title says "Top".
    let (_, portals, title) = billed_in_report(&["--month", "2025-06", "--top", "1"]);
    assert_eq!(
        (portals, title.as_str()),
        (1, "Top 1 portal by requests, 2025-06")
    );
    // A month billed only through adjustments.
    usage(&stack, &["close", "--month", "2025-06"]).assert_status(0);
    insert_month(&stack, 2, "2025-06", 1);
    aggregate(&stack, &[]).assert_status(0);
    let (billed, _, _) = billed_in_report(&["--month", "2025-07"]);
    assert_eq!(billed, billed_by_sql("2025-07"));
    assert_eq!(billed, 1);
}

/// A closed month whose raw rows are fewer than billed (deleted by hand),
/// with a new one among them, cannot tell new rows from old ones: the
/// rebase refuses the key, recorded, and every run exits 65 naming the
/// repair, instead of dropping the new row.
#[test]
fn a_rebase_refuses_a_closed_month_with_fewer_rows_than_billed() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "DELETE FROM usage_requests WHERE id IN (
               SELECT id FROM usage_requests WHERE month_year = '2025-05' ORDER BY id LIMIT 2)",
        )
        .unwrap();
    insert_month(&stack, 1, "2025-05", 1);
    aggregate(&stack, &["--rebase"])
        .assert_status(65)
        .assert_stdout_has("fewer raw rows than billed");
    aggregate(&stack, &[]).assert_status(65);
    assert_eq!(
        late_rows(&stack),
        0,
        "nothing booked that cannot be told apart"
    );
}

/// `usage_agg_adjust(...)`'s answer, called as another client would.
fn adjust_sql(stack: &Stack, month: &str, counts: (i64, i64, i64), key: &str) -> serde_json::Value {
    let text: String = stack
        .sql()
        .query_one(
            "SELECT usage_agg_adjust(1, $1, $2, $3, $4, 'as another client', $5, 'test')::text",
            &[&month, &counts.0, &counts.1, &counts.2, &key],
        )
        .unwrap()
        .get(0);
    serde_json::from_str(&text).unwrap()
}

fn adjust_cli(stack: &Stack, month: &str, counts: &[&str], id: &str) -> Run {
    let mut args = vec!["adjust", "--portal", "1", "--month", month];
    args.extend_from_slice(counts);
    args.extend_from_slice(&["--reason", "correction", "--id", id]);
    usage(stack, &args)
}

/// Issue 17, case 4: any i64 was booked, and every sum billing reads
/// wrapped (`report`, `verify`) or failed for good (`close`, 22003).
#[test]
fn adjustment_amounts_are_bounded_and_no_sum_billing_reads_wraps() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 6);
    aggregate(&stack, &[]).assert_status(0);
    let manual = "SELECT count(*) FROM portal_usage_adjustments";

    // The client refuses, naming the bound, before anything is sent; its
    // own sums do not wrap (i64::MAX minus -1 used to reach the server).
    let max = i64::MAX.to_string();
    for counts in [
        &["--requests", max.as_str()][..],
        &["--requests", max.as_str(), "--successes", "-1"][..],
        &["--requests", "-9223372036854775808"][..],
        &["--requests", "1000000000001"][..],
        &["--requests", "1", "--errors", max.as_str()][..],
        &[
            "--requests",
            "1000000000000",
            "--successes",
            "-1000000000000",
        ][..],
    ] {
        adjust_cli(&stack, "2025-05", counts, "big")
            .assert_status(64)
            .assert_stderr_has("is out of bounds")
            .assert_stderr_has("at most 1000000000000 (10^12)");
    }
    assert_eq!(count(&stack, manual), 0, "nothing written");

    // The database refuses the same, whoever calls it, and answers why.
    for (i, counts) in [
        (i64::MAX, i64::MAX, 0),
        (i64::MAX, i64::MAX - 1, 1),
        (i64::MIN, 0, i64::MIN),
        (1, i64::MAX, i64::MIN + 2),
        (1_000_000_000_001, 1_000_000_000_001, 0),
        (0, 1_000_000_000_001, -1_000_000_000_001),
    ]
    .into_iter()
    .enumerate()
    {
        let answer = adjust_sql(&stack, "2025-05", counts, &format!("sql-{i}"));
        assert_eq!(answer["refused"], "amount_bound", "{counts:?}: {answer}");
        assert_eq!(answer["bound"], 1_000_000_000_000_i64, "{answer}");
    }
    // Written to the table directly, past the function: the CHECK.
    let direct = stack.sql().batch_execute(
        "INSERT INTO portal_usage_adjustments (portal_id, month_year, booked_month, source, request_count,
                                               success_count, reason, idempotency_key)
         VALUES (1, '2025-05', '2025-05', 'manual', 9223372036854775807, 9223372036854775807, 'r', 'direct')",
    );
    assert!(
        format!("{:?}", direct.unwrap_err()).contains("portal_usage_adjustments_manual_bound"),
        "the CHECK refuses it"
    );
    assert_eq!(count(&stack, manual), 0, "nothing written");

    // At the bound: booked, and every sum of them holds.
    for (id, n) in [("b-1", "1000000000000"), ("b-2", "1000000000000")] {
        adjust_cli(&stack, "2025-05", &["--requests", n], id).assert_status(0);
    }
    let v: serde_json::Value = serde_json::from_str(
        usage(
            &stack,
            &["report", "--portal", "1", "--month", "2025-05", "--json"],
        )
        .assert_status(0)
        .stdout
        .trim(),
    )
    .unwrap();
    assert_eq!(v["rows"][0]["billed"], 2_000_000_000_006_i64, "{v}");
    usage(&stack, &["verify"])
        .assert_status(0)
        .assert_stdout_has("Manual adjustments: 2 entries, +2000000000000 requests");
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    assert_eq!(
        count(
            &stack,
            "SELECT booked_request_count FROM usage_agg_closed_months WHERE month_year = '2025-05'"
        ),
        2_000_000_000_000
    );

    // A database where such amounts were booked before the bound: they stay
    // (history is never edited), and `report` and `verify` refuse to show a
    // wrapped total (65, naming why) instead of printing a negative one.
    let mut old = stack_without(&[RULES_MIGRATION]);
    insert_month(&old, 1, "2025-05", 6);
    aggregate(&old, &[]).assert_status(0);
    for (key, n) in [("huge-1", i64::MAX), ("huge-2", 6)] {
        let answer = adjust_sql(&old, "2025-05", (n, n, 0), key);
        assert_eq!(answer["booked"], true, "{answer}");
    }
    migrate_file(&mut old, RULES_MIGRATION);
    for args in [
        &["report", "--portal", "1", "--month", "2025-05"][..],
        &["report", "--month", "2025-05"][..],
        &["verify"][..],
    ] {
        let run = usage(&old, args);
        run.assert_status(65)
            .assert_stderr_has("add up past what a 64-bit count holds")
            .assert_stderr_has("abs(request_count) > 1000000000000");
        assert!(!run.stdout.contains("-9223372036854775"), "{}", run.stdout);
    }
}

/// Issue 17, case 6: with no month closed, `adjust --month 0001-01` was
/// booked in 0001-01, a month no invoice will ever show.
#[test]
fn adjustments_are_booked_only_in_a_month_an_invoice_can_still_show() {
    let stack = migrated_stack();
    let (now_month, _) = this_and_last_month(&stack);
    insert_month(&stack, 1, "2025-05", 4);
    insert_month(&stack, 2, "2025-07", 2);
    aggregate(&stack, &[]).assert_status(0);
    let manual = "SELECT count(*) FROM portal_usage_adjustments";

    // No month closed: a month before the first with usage (any portal's)
    // is refused, naming the rule and the fix; nothing is written.
    for month in ["0001-01", "2025-04"] {
        adjust_cli(&stack, month, &["--requests", "1"], &format!("old-{month}"))
            .assert_status(64)
            .assert_stderr_has(&format!(
                "{month} is before 2025-05, the earliest month with usage, and no month is closed"
            ))
            .assert_stderr_has("--month 2025-05 or later");
    }
    let answer = adjust_sql(&stack, "0001-01", (1, 1, 0), "sql-old");
    assert_eq!(answer["refused"], "before_usage", "{answer}");
    assert_eq!(
        (
            answer["booking_month"].as_str(),
            answer["earliest_month"].as_str()
        ),
        (Some("0001-01"), Some("2025-05")),
        "{answer}"
    );
    assert_eq!(count(&stack, manual), 0, "nothing written");

    // From the first month with usage to the database's month: booked in
    // the usage's own month; after it: refused, as before.
    for (month, id) in [
        ("2025-05", "ok-1"),
        ("2025-06", "ok-2"),
        (now_month.as_str(), "ok-3"),
    ] {
        adjust_cli(&stack, month, &["--requests", "-1"], id)
            .assert_status(0)
            .assert_stdout_has(&format!("in {month}'s invoice"));
    }
    adjust_cli(&stack, "2099-01", &["--requests", "1"], "ok-4")
        .assert_status(64)
        .assert_stderr_has("2099-01 is in the future");
    assert_eq!(count(&stack, manual), 3);

    // A month closed: an adjustment of any earlier month, 0001-01 too, is
    // booked after it, on the next invoice to be cut.
    close_sql(&stack, "2025-05");
    adjust_cli(&stack, "0001-01", &["--requests", "1"], "after-close")
        .assert_status(0)
        .assert_stdout_has("in 2025-06's invoice");
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM portal_usage_adjustments
              WHERE idempotency_key = 'after-close' AND month_year = '0001-01' AND booked_month = '2025-06'"
        ),
        1
    );
    usage(&stack, &["verify"]).assert_status(0);
    // Reopened, no month is closed again: an adjustment counts as usage of
    // the month it is booked in (what an invoice shows), not of the month
    // it corrects, so 0001-01 is refused again.
    usage(
        &stack,
        &["reopen", "--month", "2025-05", "--reason", "audit"],
    )
    .assert_status(0);
    adjust_cli(&stack, "0001-01", &["--requests", "1"], "after-reopen")
        .assert_status(64)
        .assert_stderr_has("0001-01 is before 2025-05, the earliest month with usage");

    // The booking month after the database's month (its clock behind the
    // closed months): refused too, naming both.
    stack
        .sql()
        .execute(
            "INSERT INTO usage_agg_closed_months (month_year, closed_by, up_to_id, keys, request_count,
                                                  success_count, error_count)
             VALUES ($1, 'test', 0, 0, 0, 0, 0)",
            &[&now_month],
        )
        .unwrap();
    adjust_cli(&stack, "2025-05", &["--requests", "1"], "too-late")
        .assert_status(64)
        .assert_stderr_has("after the database's month");
    let answer = adjust_sql(&stack, "2025-05", (1, 1, 0), "too-late-sql");
    assert_eq!(answer["refused"], "future", "{answer}");
    assert_eq!(count(&stack, manual), 4, "nothing more written");
}

/// Issue 17, case 5: verify read what prune had deleted, then scanned the
/// raw rows; rows a prune deleted in between were counted in neither, and
/// verify reported drift that was not there (exit 65).
#[test]
fn verify_beside_a_prune_never_reports_drift_the_prune_made_up() {
    let stack = migrated_stack();
    let mut rng = Rng(1717);
    insert_random(&stack, &mut rng, 3_000, 40);
    aggregate(&stack, &[]).assert_status(0);
    for m in months_2024() {
        close_sql(&stack, &m);
    }
    let raw_2024 = "SELECT count(*) FROM usage_requests WHERE month_year < '2025-01'";
    let verify_json = |out: &str| -> serde_json::Value {
        serde_json::from_str(out.lines().next().unwrap_or_default()).unwrap()
    };

    // Verify stops once it has read what prune deleted (nothing yet),
    // before its raw scan; a whole prune runs there.
    let paused = paused_command(&stack, "pruned", &["verify", "--env", "dev", "--json"]);
    usage(
        &stack,
        &["prune", "--before", "2025-01", "--batch-size", "500"],
    )
    .assert_status(0);
    assert_eq!(count(&stack, raw_2024), 0);
    let (status, out) = paused.finish();
    assert_eq!(status, 0, "no drift: the prune made it up\n{out}");
    let v = verify_json(&out);
    assert_eq!(
        v["rechecked_after_prune"],
        serde_json::json!(months_2024()),
        "{v}"
    );
    assert_eq!(v["differing"], serde_json::json!([]), "{v}");
    assert_invariant(&stack);

    // Late rows of the closed months, pruned in the middle of the scan:
    // pages read before the prune saw some of them, pages read after did
    // not.
    insert_random(&stack, &mut rng, 2_000, 40);
    aggregate(&stack, &[]).assert_status(0);
    assert!(count(&stack, raw_2024) > 0);
    let paused = paused_command(
        &stack,
        "page",
        &["verify", "--env", "dev", "--json", "--page-size", "50"],
    );
    usage(
        &stack,
        &["prune", "--before", "2025-01", "--batch-size", "300"],
    )
    .assert_status(0);
    assert_eq!(count(&stack, raw_2024), 0);
    let (status, out) = paused.finish();
    assert_eq!(status, 0, "no drift: the prune made it up\n{out}");
    let v = verify_json(&out);
    assert!(
        !v["rechecked_after_prune"].as_array().unwrap().is_empty(),
        "{v}"
    );
    assert_invariant(&stack);

    // Without a prune, nothing is read twice.
    let run = usage(&stack, &["verify", "--json"]);
    run.assert_status(0);
    assert_eq!(
        verify_json(&run.stdout)["rechecked_after_prune"],
        serde_json::json!([])
    );
}

/// Found by an adversarial pass: a rebuild leaves closed months alone, and
/// `--full` then moved the cursor past a closed month's uncounted rows,
/// which no run counted afterwards (exit 0). The rule book books them late.
#[test]
fn a_full_rebuild_books_a_closed_months_uncounted_rows_before_moving_the_cursor() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 1, "2025-05", 10);
    insert_month(&stack, 2, "2025-06", 1);
    aggregate(&stack, &["--full"]).assert_status(0);
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 10);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(late_rows(&stack), 10, "booked once");
    usage(&stack, &["verify"]).assert_status(0);
}

/// Found by an adversarial pass: a REST run that read a closed month's rows,
/// stalled past its lease while another run rebased (booking those rows
/// late and zeroing the watermarks), then booked them again: counted twice,
/// both exit 0. A rebase now leaves closed months' watermarks at its
/// horizon, so the stale booking finds the rows counted.
#[test]
fn a_run_stalled_across_a_rebase_books_nothing_twice() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    insert_month(&stack, 2, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    usage(&stack, &["close", "--month", "2025-05"]).assert_status(0);
    insert_month(&stack, 2, "2025-05", 10);
    let stale = paused_run_with(&stack, "chunk", &["--engine", "rest"]);
    expire_lease(&stack);
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_invariant(&stack);
    let (status, out) = stale.finish();
    assert!(status == 0 || status == 75, "{status}\n{out}");
    assert_invariant(&stack);
    assert_eq!(late_rows(&stack), 10, "booked once");
}

/// Found by an adversarial pass: a call to the rule book that moves the
/// cursor with fewer rows than the range holds (a client that stopped
/// paging at the server's cap, or a caller with the service key) skipped
/// them for good. The database now counts the range's good rows first.
#[test]
fn the_rule_book_never_moves_the_cursor_over_rows_it_was_not_given() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-06", 5);
    aggregate(&stack, &[]).assert_status(0);
    let cursor = count(&stack, "SELECT cursor_id FROM usage_aggregation_state");
    insert_month(&stack, 1, "2025-06", 10);
    for (keys, good) in [("[]", "0"), ("[]", "NULL")] {
        let err = stack
            .sql()
            .query_one(
                &format!(
                    "SELECT usage_agg_book('default', {cursor}, {}, '{keys}', true, false, {good})::text",
                    cursor + 10
                ),
                &[],
            )
            .unwrap_err();
        let message = err.as_db_error().map(|d| d.message().to_string());
        assert!(
            message
                .as_deref()
                .is_some_and(|m| m.contains("not every row was read")),
            "{err:?}"
        );
    }
    let bad = stack.sql().query_one(
        &format!(
            "SELECT usage_agg_book('default', {cursor}, {}, '[{{\"portal_id\": 1, \"month_year\": \"2025-06\", \"c\": 1, \"s\": null, \"e\": null, \"w\": {}}}]')::text",
            cursor + 10,
            cursor + 1
        ),
        &[],
    );
    assert!(bad.is_err(), "null counts are refused");
    assert_eq!(
        count(&stack, "SELECT cursor_id FROM usage_aggregation_state"),
        cursor
    );
    aggregate(&stack, &[]).assert_status(0);
    assert_invariant(&stack);
}
