//! Billing-grade months (issue 11; docs/semantics.md, "Closed months"):
//! closing, the closed month's rows that never change, late rows booked as
//! adjustments exactly once by both engines, manual adjustments, usage right
//! now, retention. Ground truth is SQL on a direct connection.

use crate::common::*;

const ENGINES: [&str; 2] = ["rest", "rpc"];

/// Closes `month` in the database as `usage-agg close` finally does (the
/// command's own checks are tested below), grace 0.
fn close_sql(stack: &Stack, month: &str) {
    let text: String = stack
        .sql()
        .query_one(
            "SELECT usage_agg_close_month('default', $1, 0, 'test')::text",
            &[&month],
        )
        .unwrap()
        .get(0);
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        answer["closed"] == true || answer["already_closed"] == true,
        "{answer}"
    );
}

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
    for iteration in 0..64 {
        let engine = ENGINES[iteration % 2];
        let n = 300 + rng.below(1_200) as usize;
        insert_random(&stack, &mut rng, n, 300);
        let (point, at) = if engine == "rest" {
            (rest_points[rng.below(4) as usize], 1 + rng.below(3))
        } else {
            // The server-side engine: killed between its batches.
            ("page", 1 + rng.below(3))
        };
        let mut env = stack.env();
        env.push(("USAGE_AGG_FAILPOINTS".into(), format!("{point}=abort@{at}")));
        let killed = usage_agg(
            &workdir(),
            &env,
            &[
                "aggregate",
                "--env",
                "dev",
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
        kills[0] >= 20 && kills[1] >= 20,
        "only {kills:?} of 32 runs per engine were killed: the failpoints are not being reached"
    );
    assert!(late_rows(&stack) > 5_000);
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
            .assert_stderr_has("usage_agg_periods is missing")
            .assert_stderr_has(MIGRATIONS[2]);
    }
}
