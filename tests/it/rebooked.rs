//! A monthly row deleted while a run is under way, and keys another run
//! counted in part (an adversarial pass's findings, issue 22's review): a
//! booking that makes a deleted key's row again from its batch alone must
//! not leave it billed short, and counting such keys again must not cost a
//! scan per key.

use std::io::{BufRead, Write};

use crate::common::*;

/// Keys whose billed total (monthly row plus late adjustments) differs from
/// their raw rows.
fn billed_drift(stack: &Stack) -> Vec<String> {
    stack
        .sql()
        .query(
            "WITH raw AS (SELECT portal_id, month_year, count(*) c FROM usage_requests
                           WHERE success IS NOT NULL GROUP BY 1, 2),
                  billed AS (SELECT portal_id, month_year, sum(c)::bigint c FROM (
                      SELECT portal_id, month_year, request_count::bigint c FROM portal_usage_monthly
                      UNION ALL SELECT portal_id, month_year, request_count::bigint
                        FROM portal_usage_adjustments WHERE source = 'late') x GROUP BY 1, 2)
             SELECT coalesce(r.portal_id, b.portal_id) || ':' || coalesce(r.month_year, b.month_year)
                    || ' raw ' || coalesce(r.c, 0) || ', billed ' || coalesce(b.c, 0)
               FROM raw r FULL JOIN billed b USING (portal_id, month_year)
              WHERE coalesce(r.c, 0) <> coalesce(b.c, 0) ORDER BY 1 LIMIT 20",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// 1 to 3 rows for each of `portals` portals in each month, in random order.
fn many_keys(stack: &Stack, portals: i64, months: &[&str]) {
    let ms = months
        .iter()
        .map(|m| format!("('{m}')"))
        .collect::<Vec<_>>()
        .join(",");
    stack
        .sql()
        .batch_execute(&format!(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
             SELECT p, (v.m || '-03 10:00:00')::timestamp, (p % 7 <> 0), v.m
               FROM generate_series(1, {portals}) p, (VALUES {ms}) v(m), generate_series(1, 1 + p % 3) k
              ORDER BY random()"
        ))
        .unwrap();
}

/// A REST run paused at its first page and before its second booking call
/// (`--concurrency 1`: the calls go one after another), and what it needs.
struct Paused {
    child: std::process::Child,
    stderr: std::io::BufReader<std::process::ChildStderr>,
    stdin: Option<std::process::ChildStdin>,
}

impl Paused {
    fn start(stack: &Stack, failpoints: &str) -> Paused {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_usage-agg"))
            .args(["aggregate", "--env", "dev", "--concurrency", "1"])
            .current_dir(workdir())
            .env_clear()
            .envs(stack.env())
            .env("USAGE_AGG_FAILPOINTS", failpoints)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        Paused {
            child,
            stderr,
            stdin,
        }
    }

    fn wait_for(&mut self, point: &str) {
        let mut line = String::new();
        while !line.contains(&format!("failpoint {point} reached")) {
            line.clear();
            assert!(
                self.stderr.read_line(&mut line).unwrap() > 0,
                "the run ended before {point}"
            );
        }
    }

    fn go_on(&mut self) {
        self.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    }

    fn finish(mut self) -> Option<i32> {
        drop(self.stdin.take());
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stderr, &mut rest);
        self.child.wait().unwrap().code()
    }
}

/// The key's row is deleted after the run read its pages. The run's first
/// booking call makes the row again from the batch's 3 rows (watermark 8,
/// above the cursor 5); the scheduled run then restores the logged key. It
/// left such a row alone as "counted further by another run" and took the
/// key off the log: billed 3 of 8, and every run after exited 0.
#[test]
fn a_row_deleted_under_a_run_and_made_again_by_its_booking_is_restored_from_all_its_rows() {
    for kill in [false, true] {
        let stack = migrated_stack();
        insert_month(&stack, 1, "2025-06", 5);
        aggregate(&stack, &[]).assert_status(0);
        insert_month(&stack, 1, "2025-06", 3);
        // Enough other keys for two booking calls (5,000 keys a call).
        many_keys(&stack, 3000, &["2025-07", "2025-08"]);
        let second_call = if kill {
            "chunk=abort@2"
        } else {
            "chunk=pause@2"
        };
        let mut run = Paused::start(&stack, &format!("page=pause@1,{second_call}"));
        run.wait_for("page");
        stack
            .sql()
            .batch_execute(
                "DELETE FROM portal_usage_monthly WHERE portal_id = 1 AND month_year = '2025-06'",
            )
            .unwrap();
        run.go_on();
        if !kill {
            run.wait_for("chunk");
            expire_lease(&stack);
            let mut db = stack.sql();
            db.simple_query("CALL public.usage_agg_run_scheduled(30)")
                .unwrap();
            run.go_on();
        }
        let status = run.finish();
        assert_eq!(status.is_none(), kill, "killed: {kill}, exit {status:?}");
        expire_lease(&stack);
        for engine in ["rest", "rpc"] {
            aggregate(&stack, &["--engine", engine]).assert_status(0);
        }
        assert_eq!(billed_drift(&stack), Vec::<String>::new(), "killed: {kill}");
        assert_no_drift(&stack);
    }
}

/// Keys a killed run counted in part (its first booking call committed,
/// the second not) are counted again by the next run from their
/// watermarks. That was one scan of the new ids per key: with thousands of
/// such keys the booking ran past the statement timeout on every try
/// (exit 69). One scan for them all.
#[test]
fn thousands_of_keys_counted_in_part_by_a_killed_run_are_counted_again_in_one_scan() {
    let stack = migrated_stack();
    insert_month(&stack, 1, "2025-05", 5);
    aggregate(&stack, &[]).assert_status(0);
    many_keys(&stack, 4000, &["2025-05", "2025-06", "2025-07"]);
    assert_eq!(
        aggregate_failing(&stack, "chunk=abort@2", &["--concurrency", "1"]).status,
        -1
    );
    expire_lease(&stack);
    many_keys(&stack, 4000, &["2025-05", "2025-06", "2025-07"]);
    many_keys(&stack, 4000, &["2025-05", "2025-06", "2025-07"]);
    aggregate(&stack, &["--concurrency", "1"]).assert_status(0);
    assert_eq!(billed_drift(&stack), Vec::<String>::new());
    assert_no_drift(&stack);
}

/// The call that moves the cursor checks that every key with good rows in
/// the batch holds its newest one (20261207230000). A monthly row deleted
/// between a batch's calls does not: it is logged, and the next run's
/// restore counts it again from all its rows, so the batch still moves the
/// cursor and the run exits 0.
#[test]
fn a_row_deleted_between_a_batchs_calls_lets_the_batch_move_the_cursor() {
    let stack = migrated_stack();
    insert_rows(&stack, 30, 3);
    aggregate(&stack, &[]).assert_status(0);
    // More keys than one call books (5,000), so the batch takes two calls.
    insert_rows(&stack, 18_000, 2_000);
    let paused = paused_run_with(&stack, "before-cursor", &[]);
    let deleted = stack
        .sql()
        .execute(
            "DELETE FROM portal_usage_monthly WHERE (portal_id, month_year) =
               (SELECT portal_id, month_year FROM portal_usage_monthly
                 WHERE last_request_id > 30 ORDER BY portal_id, month_year LIMIT 1)",
            &[],
        )
        .unwrap();
    assert_eq!(deleted, 1, "a key the first call booked");
    let (status, out) = paused.finish();
    assert_eq!(status, 0, "{out}");
    aggregate(&stack, &[]).assert_status(0);
    assert!(
        billed_drift(&stack).is_empty(),
        "{:?}",
        billed_drift(&stack)
    );
    assert_no_drift(&stack);
}
