//! Never a silent wrong total: each way a run could end with exit 0 and
//! totals that disagree with the raw rows, tried against the real stack
//! (docs/semantics.md, "Traps and the tests that cover them"). Each test
//! asserts the exit status and the message, and either no drift after the
//! documented remedy or a refusal that left the totals as they were.

use crate::common::*;

const ENGINES: [&str; 2] = ["rest", "rpc"];

/// Ground truth for keys that still have rows; keys whose rows are all gone
/// must hold zeros (a rebuild that may lower counts writes them as emptied).
#[track_caller]
fn assert_truth(stack: &Stack) {
    let empty_but_counted = count(
        stack,
        "SELECT count(*) FROM portal_usage_monthly m
          WHERE m.request_count <> 0 AND NOT EXISTS (
            SELECT 1 FROM usage_requests r WHERE r.portal_id = m.portal_id AND r.month_year = m.month_year)",
    );
    assert_eq!(
        empty_but_counted, 0,
        "keys with no rows left still count some"
    );
    let truth = ground_truth(stack);
    let table: Vec<Row> = table(stack).into_iter().filter(|r| r.2 != 0).collect();
    assert_eq!(truth, table, "portal_usage_monthly against its raw rows");
}

fn status(stack: &Stack) -> Run {
    usage_agg(&workdir(), &stack.env(), &["status", "--env", "dev"])
}

fn stored_requests(stack: &Stack, portal: i64, month: &str) -> i64 {
    count(
        stack,
        &format!(
            "SELECT coalesce(max(request_count), -1)::bigint FROM portal_usage_monthly
              WHERE portal_id = {portal} AND month_year = '{month}'"
        ),
    )
}

fn state_text(stack: &Stack, column: &str) -> Option<String> {
    stack
        .sql()
        .query_one(
            &format!("SELECT {column}::text FROM usage_aggregation_state WHERE job = 'default'"),
            &[],
        )
        .unwrap()
        .get(0)
}

#[test]
fn a_sequence_moved_backwards_is_refused_until_a_rebase() {
    for engine in ENGINES {
        let stack = migrated_stack();
        insert_rows(&stack, 500, 5);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        // A dev reset that keeps the totals: rows gone, ids from 1 again.
        stack
            .sql()
            .batch_execute(
                "DELETE FROM usage_requests; ALTER SEQUENCE usage_requests_id_seq RESTART",
            )
            .unwrap();
        insert_rows(&stack, 30, 3);
        let before = table(&stack);
        for args in [
            &["--engine", engine][..],
            &["--full", "--allow-decrease"][..],
            &["--dry-run"][..],
        ] {
            aggregate(&stack, args)
                .assert_status(65)
                .assert_stderr_has(
                    "public.usage_requests_id_seq is at 30, below id 500 which is already counted",
                )
                .assert_stderr_has("repair: `usage-agg aggregate --rebase`");
        }
        assert_eq!(
            table(&stack),
            before,
            "{engine}: a refused run writes nothing"
        );
        status(&stack)
            .assert_status(65)
            .assert_stdout_has("PROBLEM:")
            .assert_stdout_has("--rebase");

        aggregate(&stack, &["--rebase"])
            .assert_status(0)
            .assert_stdout_has("Mode: rebase")
            .assert_stdout_has("Cursor: none -> 30");
        assert_truth(&stack);
        assert_consistent(&stack);
        insert_rows(&stack, 40, 3);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        assert_truth(&stack);
        status(&stack).assert_status(0);
    }
}

/// Once the sequence has passed the cursor again, its value shows nothing:
/// the insert trigger saw the ids at or below the cursor go by.
#[test]
fn a_sequence_set_back_and_refilled_past_the_cursor_is_caught_by_the_insert_trigger() {
    let burn =
        "BEGIN; INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
                SELECT 1, now(), true, '2025-05' FROM generate_series(1, 200); ROLLBACK;";
    for (engine, reset) in [
        // Restarted into a gap left by rolled-back inserts, refilled past the cursor.
        (
            "rest",
            "ALTER SEQUENCE usage_requests_id_seq RESTART WITH 501",
        ),
        ("rpc", "SELECT setval('usage_requests_id_seq', 500)"),
        // The dev reset that keeps the totals, refilled past the cursor.
        (
            "rest",
            "DELETE FROM usage_requests; ALTER SEQUENCE usage_requests_id_seq RESTART",
        ),
    ] {
        let stack = migrated_stack();
        insert_rows(&stack, 500, 5);
        stack.sql().batch_execute(burn).unwrap();
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        stack.sql().batch_execute(reset).unwrap();
        insert_month(&stack, 4242, "2025-06", 800);
        let before = table(&stack);
        aggregate(&stack, &["--engine", engine])
            .assert_status(65)
            .assert_stderr_has("at or below the cursor 700")
            .assert_stderr_has("--rebase");
        assert_eq!(table(&stack), before, "{reset}");
        status(&stack).assert_status(65);
        aggregate(&stack, &["--rebase"]).assert_status(0);
        assert_truth(&stack);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
    }
    // An id given by hand, filling a gap below the cursor.
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    stack.sql().batch_execute(burn).unwrap();
    insert_rows(&stack, 10, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (id, portal_id, request_timestamp, success, month_year)
             VALUES (105, 77, '2025-05-01', true, '2025-05')",
        )
        .unwrap();
    aggregate(&stack, &[])
        .assert_status(65)
        .assert_stderr_has("with id 105, at or below the cursor 310");
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_truth(&stack);
}

#[test]
fn a_truncate_restart_identity_refilled_past_the_cursor_is_caught_by_the_trigger() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute("TRUNCATE usage_requests RESTART IDENTITY")
        .unwrap();
    // Refilled past the old cursor before the next run: the sequence alone
    // no longer shows that ids 1..300 are new rows.
    insert_rows(&stack, 450, 3);
    let before = table(&stack);
    aggregate(&stack, &["--engine", "rpc"])
        .assert_status(65)
        .assert_stderr_has("usage_requests was truncated")
        .assert_stderr_has("--rebase");
    assert_eq!(table(&stack), before);
    // A rebase that dies after the reset is redone, never taken for a
    // normal first run (which would refuse to lower the counts).
    let killed = aggregate_failing(&stack, "page=abort@1", &["--rebase"]);
    assert_eq!(killed.status, -1, "{}", killed.stderr);
    expire_lease(&stack);
    aggregate(&stack, &[])
        .assert_status(65)
        .assert_stderr_has("--rebase");
    aggregate(&stack, &["--rebase"]).assert_status(0);
    assert_truth(&stack);
    assert_eq!(state_text(&stack, "reset_reason"), None);
    aggregate(&stack, &[]).assert_status(0);
}

#[test]
fn a_refused_decrease_keeps_counting_the_keys_new_rows_and_is_not_a_success() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    let success = state_text(&stack, "last_success_at");
    // Two of key 1000:2025-05's counted rows deleted, then ten new ones.
    stack
        .sql()
        .batch_execute(
            "DELETE FROM usage_requests WHERE id IN (SELECT id FROM usage_requests
               WHERE portal_id = 1000 AND month_year = '2025-05' ORDER BY id LIMIT 2)",
        )
        .unwrap();
    let stored = stored_requests(&stack, 1000, "2025-05");
    insert_month(&stack, 1000, "2025-05", 10);

    let full = aggregate(&stack, &["--full"]);
    full.assert_status(65)
        .assert_stdout_has("1 key would have its stored counts lowered")
        .assert_stdout_has("NOT lowered");
    assert!(!full.stdout.contains("were corrected"), "{}", full.stdout);
    assert_eq!(
        stored_requests(&stack, 1000, "2025-05"),
        stored + 10,
        "the key's ten new rows are counted; its excess of two stands"
    );
    assert_eq!(
        state_text(&stack, "last_run_outcome").as_deref(),
        Some("decreases_refused")
    );
    assert_eq!(
        state_text(&stack, "last_success_at"),
        success,
        "not a success"
    );
    status(&stack)
        .assert_status(65)
        .assert_stdout_has("REFUSED:       1 key holds")
        .assert_stdout_has("1000:2025-05");

    // Later runs keep counting it and keep saying so.
    insert_month(&stack, 1000, "2025-05", 5);
    for engine in ENGINES {
        aggregate(&stack, &["--engine", engine])
            .assert_status(65)
            .assert_stdout_has("1 key holds counts above its raw rows; check them, then `usage-agg aggregate --full --allow-decrease`");
    }
    assert_eq!(stored_requests(&stack, 1000, "2025-05"), stored + 15);

    aggregate(&stack, &["--full", "--allow-decrease"])
        .assert_status(0)
        .assert_stdout_has("and was corrected");
    assert_truth(&stack);
    status(&stack).assert_status(0);
    assert_ne!(state_text(&stack, "last_success_at"), success);
}

#[test]
fn allow_decrease_fixes_a_key_whose_newest_row_was_deleted_or_moved() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            // A duplicate delivery removed: the newest row of its key.
            "DELETE FROM usage_requests WHERE id = (SELECT max(id) FROM usage_requests);
             -- A month corrected: the newest row of 1002:2025-06 moves to July.
             UPDATE usage_requests SET month_year = '2025-07'
              WHERE id = (SELECT max(id) FROM usage_requests WHERE portal_id = 1002 AND month_year = '2025-06');",
        )
        .unwrap();
    let full = aggregate(&stack, &["--full"]);
    full.assert_status(65)
        .assert_stdout_has("2 keys would have their stored counts lowered");
    aggregate(&stack, &["--full", "--allow-decrease"])
        .assert_status(0)
        .assert_stdout_has("Drift: 2 stored keys disagreed with their own rows and were corrected");
    assert_truth(&stack);
    assert_consistent(&stack);
    usage_agg(&workdir(), &stack.env(), &["verify", "--env", "dev"]).assert_status(0);
    insert_rows(&stack, 60, 3);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    assert_truth(&stack);
}

#[test]
fn a_rebuild_beside_an_incremental_run_never_zeroes_a_newer_key() {
    let stack = migrated_stack();
    insert_rows(&stack, 300, 3);
    aggregate(&stack, &[]).assert_status(0);
    // The rebuild has its horizon and stops before reading what is stored.
    let rebuild = paused_run_with(&stack, "recount", &["--full", "--allow-decrease"]);
    // It outlives its lease; an incremental run takes over and creates a key.
    expire_lease(&stack);
    insert_month(&stack, 4242, "2025-08", 7);
    aggregate(&stack, &[]).assert_status(0);
    assert_eq!(stored_requests(&stack, 4242, "2025-08"), 7);
    resume(rebuild);
    assert_eq!(
        stored_requests(&stack, 4242, "2025-08"),
        7,
        "the rebuild's older horizon must not empty a key counted past it"
    );
    assert_truth(&stack);
    assert_consistent(&stack);
}

#[test]
fn a_sequence_cache_above_one_is_refused() {
    let mut stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack.ddl("ALTER SEQUENCE usage_requests_id_seq CACHE 20");
    insert_rows(&stack, 10, 2);
    let before = table(&stack);
    for engine in ENGINES {
        aggregate(&stack, &["--engine", engine])
            .assert_status(78)
            .assert_stderr_has("hands out 20 ids at a time")
            .assert_stderr_has("ALTER SEQUENCE public.usage_requests_id_seq CACHE 1");
    }
    status(&stack).assert_status(78);
    assert_eq!(table(&stack), before);
    stack.ddl("ALTER SEQUENCE usage_requests_id_seq CACHE 1");
    aggregate(&stack, &[]).assert_status(0);
    assert_truth(&stack);
}

#[test]
fn an_id_without_its_sequence_default_is_refused() {
    let mut stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack.ddl("ALTER TABLE usage_requests ALTER COLUMN id DROP DEFAULT");
    aggregate(&stack, &[])
        .assert_status(78)
        .assert_stderr_has("usage_requests.id takes its value from \"no default\"")
        .assert_stderr_has("SET DEFAULT nextval('public.usage_requests_id_seq')");
    stack.ddl("ALTER TABLE usage_requests ALTER COLUMN id SET DEFAULT nextval('public.usage_requests_id_seq')");
    aggregate(&stack, &[]).assert_status(0);
}

#[test]
fn a_prepared_transaction_holds_the_horizon_back() {
    for engine in ENGINES {
        let stack = migrated_stack();
        insert_rows(&stack, 200, 2);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        let gid = format!("usage-agg-test-{engine}");
        let mut writer = stack.sql();
        writer
            .batch_execute(&format!(
                "BEGIN;
                 INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
                 VALUES (1000, '2025-05-09 10:00:00', true, '2025-05');
                 PREPARE TRANSACTION '{gid}'"
            ))
            .unwrap();
        // Rows committed after the prepared one's id: without it counted as
        // a writer, the cursor would pass its id.
        insert_rows(&stack, 20, 2);
        aggregate(&stack, &["--engine", engine, "--horizon-wait-ms", "200"])
            .assert_status(75)
            .assert_stderr_has("prepared, two-phase")
            .assert_stderr_has("pg_prepared_xacts");
        writer
            .batch_execute(&format!("COMMIT PREPARED '{gid}'"))
            .unwrap();
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        assert_truth(&stack);
    }
}

#[test]
fn a_deleted_monthly_row_is_rebuilt_from_all_its_rows() {
    for engine in ENGINES {
        let stack = migrated_stack();
        insert_rows(&stack, 300, 3);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        let full = stored_requests(&stack, 1000, "2025-05");
        assert!(full > 1);
        stack
            .sql()
            .batch_execute(
                "DELETE FROM portal_usage_monthly WHERE portal_id = 1000 AND month_year = '2025-05';
                 DELETE FROM portal_usage_monthly WHERE portal_id = 1002 AND month_year = '2025-06';",
            )
            .unwrap();
        insert_month(&stack, 1000, "2025-05", 1);
        let run = aggregate(&stack, &["--engine", engine]);
        run.assert_status(0).assert_stdout_has(
            "2 keys had their portal_usage_monthly row deleted; rebuilt from all their rows",
        );
        assert_eq!(
            stored_requests(&stack, 1000, "2025-05"),
            full + 1,
            "{engine}"
        );
        assert_truth(&stack);
        assert_consistent(&stack);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        assert_truth(&stack);
    }
}

/// Rows whose values PostgreSQL holds but PostgREST sends in forms no client
/// writes back (`12025-...`, `... BC`), beside the extreme portal ids.
const ODD_ROWS: &str =
    "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year) VALUES
    (9223372036854775807, '2025-01-05 10:00:00', true, '2025-01'),
    (9223372036854775807, NULL, false, '2025-01'),
    (-9223372036854775808, '2025-01-05 10:00:00', true, '2025-01'),
    (7, '12025-01-01 00:00:00', true, '2025-01'),
    (7, '0044-03-15 00:00:00 BC', true, '2025-01'),
    (7, '2025-01-06 10:00:00', true, '2025-01')";

#[test]
fn values_no_client_writes_back_are_bad_rows_in_both_engines() {
    let mut tables = Vec::new();
    for engine in ENGINES {
        let stack = migrated_stack();
        insert_rows(&stack, 50, 2);
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        stack.sql().batch_execute(ODD_ROWS).unwrap();
        let run = aggregate(&stack, &["--engine", engine]);
        run.assert_status(65)
            .assert_stdout_has("3 rows rejected as bad data");
        let line = run
            .stdout
            .lines()
            .find(|l| l.contains("rejected as bad data"))
            .unwrap();
        for id in ["53", "54", "55"] {
            assert!(line.contains(id), "{engine}: {line}");
        }
        // Not a wedged job: the next run has nothing left to do.
        aggregate(&stack, &["--engine", engine]).assert_status(0);
        assert_eq!(stored_requests(&stack, i64::MAX, "2025-01"), 2);
        assert_eq!(stored_requests(&stack, 7, "2025-01"), 1);
        tables.push(table(&stack));
    }
    assert_eq!(tables[0], tables[1], "both engines write the same totals");
}

/// The stand-in server crashes on `infinity` timestamps, so this one is
/// tried with the server-side engine only; the REST engine's rule for the
/// string PostgREST sends (`"infinity"`) is a unit test in src/aggregation.rs.
#[test]
fn infinite_times_are_bad_rows_for_the_server_side_engine() {
    let stack = migrated_stack();
    insert_rows(&stack, 50, 2);
    aggregate(&stack, &["--engine", "rpc"]).assert_status(0);
    stack
        .sql()
        .batch_execute(
            "INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year) VALUES
               (8, 'infinity', true, '2025-01'), (8, '-infinity', false, '2025-01'), (8, '2025-01-02', true, '2025-01')",
        )
        .unwrap();
    // One key, good and bad rows: folded as a bare GROUP BY, then again
    // row by row (20261207230000).
    aggregate(&stack, &["--engine", "rpc"])
        .assert_status(65)
        .assert_stdout_has("2 rows rejected as bad data");
    let at: String = stack
        .sql()
        .query_one(
            "SELECT last_request_at::text FROM portal_usage_monthly WHERE portal_id = 8",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(at, "2025-01-02 00:00:00");
    assert_eq!(stored_requests(&stack, 8, "2025-01"), 1);
}

#[test]
fn a_write_a_trigger_undid_is_reported_lost() {
    let mut stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    // Something else on the table keeps the old counts (a careless trigger).
    stack.ddl(
        "CREATE FUNCTION keep_counts() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.request_count := OLD.request_count; RETURN NEW; END $$;
         CREATE TRIGGER keep_counts BEFORE UPDATE ON portal_usage_monthly
           FOR EACH ROW EXECUTE FUNCTION keep_counts();",
    );
    insert_rows(&stack, 10, 2);
    let run = aggregate(&stack, &[]);
    run.assert_status(65).assert_stdout_has(
        "writes did not take effect although no newer run had counted those keys",
    );
    assert_eq!(
        state_text(&stack, "last_run_outcome").as_deref(),
        Some("writes_lost")
    );
    // Issue 17, case 3: the lost write is recorded, not forgotten. With the
    // trigger gone, every run and `status` still exit 65 until a rebuild
    // finds the key right.
    stack.ddl("DROP TRIGGER keep_counts ON portal_usage_monthly");
    for engine in ENGINES {
        insert_rows(&stack, 5, 2);
        aggregate(&stack, &["--engine", engine]).assert_status(65);
        assert_eq!(
            state_text(&stack, "last_run_outcome").as_deref(),
            Some("writes_lost"),
            "{engine}"
        );
    }
    status(&stack).assert_status(65);
    aggregate(&stack, &["--full"]).assert_status(0);
    assert_no_drift(&stack);
    aggregate(&stack, &[]).assert_status(0);
    status(&stack).assert_status(0);
}

/// A key booked for the first time is written whole by one INSERT
/// (20261207230000): what a trigger changed on its way in is a lost write,
/// read back against what the fold asked for, in both engines.
#[test]
fn a_first_write_a_trigger_changed_is_reported_lost() {
    for engine in ENGINES {
        let mut stack = migrated_stack();
        insert_rows(&stack, 100, 2);
        aggregate(&stack, &[]).assert_status(0);
        stack.ddl(
            "CREATE FUNCTION drop_one() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.request_count := NEW.request_count - 1; RETURN NEW; END $$;
             CREATE TRIGGER drop_one BEFORE INSERT ON portal_usage_monthly
               FOR EACH ROW EXECUTE FUNCTION drop_one();",
        );
        insert_requests(&stack, 77, "2025-07", 3, 0, "2025-07-01 10:00:00");
        aggregate(&stack, &["--engine", engine])
            .assert_status(65)
            .assert_stdout_has("did not take effect although no newer run had counted those keys");
        assert_eq!(
            count(
                &stack,
                "SELECT count(*) FROM usage_agg_refused_keys WHERE portal_id = 77 AND kind = 'lost'"
            ),
            1,
            "{engine}"
        );
    }
}

/// Found by an adversarial pass: a default from another sequence left the
/// watched one still, so the horizon stopped while ids moved on; a writer in
/// a REPEATABLE READ snapshot then committed rows below the cursor unseen.
#[test]
fn a_default_from_another_sequence_is_refused() {
    let mut stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    stack.ddl(
        "CREATE SEQUENCE public.usage_requests_id_seq2 START 1001;
         ALTER TABLE public.usage_requests ALTER COLUMN id SET DEFAULT nextval('public.usage_requests_id_seq2')",
    );
    for engine in ENGINES {
        aggregate(&stack, &["--engine", engine])
            .assert_status(78)
            .assert_stderr_has("not from public.usage_requests_id_seq");
    }
    usage_agg(&workdir(), &stack.env(), &["doctor", "--env", "dev"]).assert_status(78);
    status(&stack).assert_status(78);
}

/// A transaction writing usage_requests in another database of the same
/// cluster (one cloned from the same template: the table has the same oid
/// there) held this database's safe horizon back: a prepared one for ever,
/// every run exiting 75 (found when two tests ran side by side). Only this
/// database's writers count. (Against an external PostgREST there is no
/// second database of the harness's own to make.)
#[test]
fn a_writer_in_another_database_of_the_cluster_does_not_hold_the_horizon() {
    let stack = migrated_stack();
    if stack.is_external() {
        return;
    }
    let other = migrated_stack();
    insert_rows(&stack, 20, 2);
    let mut c = other.sql();
    c.batch_execute(
        "BEGIN; INSERT INTO usage_requests (portal_id, request_timestamp, success, month_year)
         VALUES (1, '2025-05-31 23:00:00', true, '2025-05'); PREPARE TRANSACTION 'in-another-database'",
    )
    .unwrap();
    let run = aggregate(&stack, &[]);
    c.batch_execute("ROLLBACK PREPARED 'in-another-database'")
        .unwrap();
    run.assert_status(0);
    assert_eq!(
        count(
            &stack,
            "SELECT coalesce(sum(request_count), 0)::bigint FROM portal_usage_monthly"
        ),
        20
    );
}

/// What a client folded is checked at its door, `usage_agg_book`, before
/// any rule runs (20261207230000 moved the checks there from the rule
/// book, which the server-side batch feeds by construction): a key no good
/// row can make, counts that do not add up, an id outside the range, a key
/// folded twice. Each is refused whole, and nothing is written.
#[test]
fn a_fold_no_good_rows_can_make_is_refused_at_the_rest_door() {
    let stack = migrated_stack();
    insert_rows(&stack, 100, 2);
    aggregate(&stack, &[]).assert_status(0);
    let before = table(&stack);
    let c = cursor(&stack).unwrap();
    let key = |portal: i64, month: &str, n: i64, s: i64, e: i64, w: i64| {
        format!(
            r#"{{"portal_id":{portal},"month_year":"{month}","c":{n},"s":{s},"e":{e},"at":"2025-07-01T00:00:00","w":{w}}}"#
        )
    };
    let good = key(5, "2025-07", 2, 1, 1, c + 2);
    for (what, keys) in [
        ("a bad month", key(5, "2025-13", 1, 1, 0, c + 1)),
        ("a bad portal", key(-5, "2025-07", 1, 1, 0, c + 1)),
        (
            "counts that do not add up",
            key(5, "2025-07", 3, 1, 1, c + 1),
        ),
        ("no rows", key(5, "2025-07", 0, 0, 0, c + 1)),
        ("an id past the range", key(5, "2025-07", 1, 1, 0, c + 11)),
        ("an id below it", key(5, "2025-07", 1, 1, 0, c)),
        ("a key folded twice", format!("{good},{good}")),
        (
            "more rows than the range has ids",
            key(5, "2025-07", 11, 11, 0, c + 1),
        ),
    ] {
        let err = stack
            .sql()
            .query_one(
                "SELECT usage_agg_book('default', $1, $2, $3::text::jsonb)",
                &[&c, &(c + 10), &format!("[{keys}]")],
            )
            .expect_err(what);
        assert_eq!(
            err.code(),
            Some(&postgres::error::SqlState::INVALID_PARAMETER_VALUE),
            "{what}: {err}"
        );
    }
    assert_eq!(table(&stack), before, "nothing is written");
    // The same door lets a good fold through.
    stack
        .sql()
        .query_one(
            "SELECT usage_agg_book('default', $1, $2, $3::text::jsonb)",
            &[&c, &(c + 10), &format!("[{good}]")],
        )
        .unwrap();
    assert_eq!(stored_requests(&stack, 5, "2025-07"), 2);
}

/// Found by an adversarial pass: the last call of a batch moved the cursor
/// when the good rows the client claimed were as many as the batch has, so a
/// client that sent fewer keys (a bug of ours, or a caller with the service
/// key) left those keys' rows below the cursor uncounted, and every later
/// run exited 0. The door now also checks that every key with good rows in
/// the batch holds its newest one.
#[test]
fn a_batch_whose_keys_were_not_all_sent_cannot_move_the_cursor() {
    let stack = migrated_stack();
    insert_rows(&stack, 10, 2);
    aggregate(&stack, &[]).assert_status(0);
    let c = cursor(&stack).unwrap();
    insert_requests(&stack, 7, "2025-07", 2, 0, "2025-07-01 10:00:00");
    insert_requests(&stack, 8, "2025-07", 3, 0, "2025-07-01 10:00:00");
    // Portal 7 alone, with the batch's true number of good rows.
    let seven = format!(
        r#"[{{"portal_id":7,"month_year":"2025-07","c":2,"s":2,"e":0,"at":"2025-07-01T10:00:00","w":{}}}]"#,
        c + 2
    );
    let err = stack
        .sql()
        .query_one(
            "SELECT usage_agg_book('default', $1, $2, $3::text::jsonb, p_advance => true, p_good_rows => 5)",
            &[&c, &(c + 5), &seven],
        )
        .expect_err("a key of the batch was not sent");
    assert!(
        err.to_string().contains("do not hold them yet")
            || format!("{err:?}").contains("do not hold them yet"),
        "{err:?}"
    );
    assert_eq!(cursor(&stack), Some(c), "the cursor stays");
    assert_eq!(
        count(
            &stack,
            "SELECT count(*) FROM portal_usage_monthly WHERE portal_id = 7"
        ),
        0,
        "nothing of the call is booked"
    );
    aggregate(&stack, &[]).assert_status(0);
    assert_no_drift(&stack);
}
