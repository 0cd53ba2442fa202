//! `usage-agg aggregate`, end to end: the real binary, a real PostgreSQL and
//! a real PostgREST-compatible server; ground truth by SQL.

use crate::common::*;

#[test]
fn counts_every_row_past_the_servers_row_cap() {
    let stack = Stack::new();
    insert_rows(&stack, 5_500, 40);
    assert!(count(&stack, "SELECT count(*) FROM usage_requests") > 5 * i64::from(stack::MAX_ROWS));

    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Found 5500 requests to aggregate")
        .assert_stdout_has("Aggregating for 120 portal-month combinations")
        .assert_stdout_has("Usage aggregation completed successfully");
    assert_no_drift(&stack);
}

#[test]
fn counts_every_row_whatever_the_page_size() {
    let stack = Stack::new();
    insert_rows(&stack, 2_345, 7);
    // Pages larger than the cap come back short; pages smaller are many.
    aggregate(&stack, &["--page-size", "5000"])
        .assert_status(0)
        .assert_stdout_has("Found 2345 requests");
    assert_no_drift(&stack);
    stack
        .sql()
        .batch_execute("TRUNCATE portal_usage_monthly")
        .unwrap();
    aggregate(&stack, &["--page-size", "7"])
        .assert_status(0)
        .assert_stdout_has("Found 2345 requests");
    assert_no_drift(&stack);
}

#[test]
fn a_rerun_changes_nothing() {
    let stack = Stack::new();
    insert_rows(&stack, 1_000, 10);
    aggregate(&stack, &[]).assert_status(0);
    let versions = || -> Vec<(i64, String)> {
        let sql = "SELECT id::bigint, updated_at::text FROM portal_usage_monthly ORDER BY id";
        stack
            .sql()
            .query(sql, &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    };
    let before = versions();

    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("(0 written, 30 unchanged)");
    assert_eq!(before, versions(), "a rerun must not touch a single row");
    assert_no_drift(&stack);
}

#[test]
fn new_rows_and_stale_values_are_brought_up_to_date() {
    let stack = Stack::new();
    insert_rows(&stack, 600, 5);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 300, 8);
    stack
        .sql()
        .batch_execute("UPDATE portal_usage_monthly SET request_count = 1 WHERE portal_id = 1000")
        .unwrap();
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
}

#[test]
fn an_empty_table_is_nothing_to_do() {
    let stack = Stack::new();
    aggregate(&stack, &["--verbose"])
        .assert_status(0)
        .assert_stdout_has("Found 0 requests")
        .assert_stdout_has("No pending requests to aggregate");
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_monthly"),
        0
    );
}

#[test]
fn dry_run_shows_what_would_be_written_and_writes_nothing() {
    let stack = Stack::new();
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, success, month_year) VALUES
               (42, true, '2025-07'), (42, false, '2025-07'), (42, true, '2025-07'), (7, true, '2025-06');
             INSERT INTO portal_usage_monthly (portal_id, month_year, request_count, success_count, error_count)
               VALUES (42, '2025-07', 2, 1, 1);",
        )
        .unwrap();
    let before = table(&stack);

    let run = aggregate(&stack, &["--dry-run"]);
    run.assert_status(0)
        .assert_stdout_has("Dry run: nothing will be written");
    let line42 = run
        .stdout
        .lines()
        .find(|l| l.contains(" 42 "))
        .expect("a line for portal 42");
    assert!(
        line42.contains("2025-07") && line42.contains("3 (was 2)") && line42.contains("2 (was 1)"),
        "{line42}"
    );
    let line7 = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("7 "))
        .expect("a line for portal 7");
    assert!(
        line7.contains("2025-06") && !line7.contains("was"),
        "{line7}"
    );
    run.assert_stdout_has("2 keys would be written");

    assert_eq!(table(&stack), before, "a dry run writes nothing");
}

#[test]
fn without_the_unique_constraint_it_falls_back_to_update_then_insert() {
    let mut stack = Stack::new();
    stack.ddl("ALTER TABLE portal_usage_monthly DROP CONSTRAINT portal_usage_monthly_portal_id_month_year_key");
    insert_rows(&stack, 1_200, 6);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO portal_usage_monthly (portal_id, month_year, request_count, success_count, error_count)
             VALUES (1000, '2025-05', 1, 1, 0)",
        )
        .unwrap();

    aggregate(&stack, &[])
        .assert_status(0)
        .assert_stdout_has("Bulk upsert refused")
        .assert_stdout_has("42P10");
    assert_no_drift(&stack);

    insert_rows(&stack, 100, 6);
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM (SELECT 1 FROM portal_usage_monthly GROUP BY portal_id, month_year HAVING count(*) > 1) d"),
        0,
        "the fallback must update existing keys, never insert them twice"
    );
}

#[test]
fn bad_rows_are_skipped_counted_and_named_and_the_rest_is_aggregated() {
    let stack = Stack::new();
    insert_rows(&stack, 500, 5);
    let bad_ids: Vec<i32> = stack
        .sql()
        .query(
            "INSERT INTO usage_requests (portal_id, success, month_year) VALUES
               (0, true, '2025-07'), (-3, true, '2025-07'), (55, true, '2025-13'), (56, false, 'garbage')
             RETURNING id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    insert_rows(&stack, 100, 5);

    let run = aggregate(&stack, &[]);
    run.assert_status(65)
        .assert_stdout_has("4 rows rejected as bad data")
        .assert_stdout_has("Rows rejected as bad data: 4");
    for id in &bad_ids {
        assert!(
            run.stdout.contains(&id.to_string()),
            "bad id {id} not named:\n{}",
            run.stdout
        );
    }
    assert_no_drift(&stack);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_monthly WHERE portal_id <= 0 OR portal_id IN (55, 56)"),
        0,
        "no garbage key is ever created"
    );
}

#[test]
fn the_key_never_appears_in_any_output_even_at_trace_level() {
    let stack = Stack::new();
    insert_rows(&stack, 300, 3);
    let signature = stack.key.rsplit('.').next().unwrap().to_string();
    let mut env = stack.env();
    env.push(("RUST_LOG".into(), "trace".into()));

    let ok = usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]);
    ok.assert_status(0);
    assert!(
        ok.stderr.lines().count() > 10,
        "trace logging should be on:\n{}",
        ok.stderr
    );

    // An error path too: the server refuses a key signed with another secret.
    let forged = format!(
        "{}.{}",
        stack.key.rsplit_once('.').unwrap().0,
        "c2lnbmVkLXdpdGgtYW5vdGhlci1zZWNyZXQ"
    );
    let mut bad_env = env_with(&stack, "SUPABASE_DEV_SERVICE_ROLE_KEY", &forged);
    bad_env.push(("RUST_LOG".into(), "trace".into()));
    let refused = usage_agg(&workdir(), &bad_env, &["aggregate", "--env", "dev"]);
    refused.assert_status(77);

    for run in [&ok, &refused] {
        let all = run.all();
        assert!(
            !all.contains(&stack.key) && !all.contains(&signature),
            "the key leaked"
        );
        assert!(
            !all.contains("c2lnbmVkLXdpdGgtYW5vdGhlci1zZWNyZXQ"),
            "the forged key leaked"
        );
    }
}
