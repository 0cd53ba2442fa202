//! Through a Supabase-like gateway (tests/stack/src/gateway.rs), the way
//! Supabase serves the API: only the project URL is configured
//! (`SUPABASE_DEV_URL`, no `SUPABASE_DEV_REST_URL`), so usage-agg composes
//! `<URL>/rest/v1` itself, and the gateway checks the `apikey` header and
//! turns an `sb_secret_` key into a service_role token.

use crate::common::*;
use stack::gateway::Gateway;

/// `usage-agg ARGS` with the gateway's environment for `key`, and nothing
/// else: no REST URL override.
fn through(gw: &Gateway, key: &str, args: &[&str]) -> Run {
    let env = gw.env(key);
    assert!(env.iter().all(|(k, _)| k != "SUPABASE_DEV_REST_URL"));
    usage_agg(&workdir(), &env, args)
}

/// Every request went to `/rest/v1/...` and was forwarded, and PostgREST
/// answered each with success, or with 404 only where a missing table is
/// expected (`except`: the state table on a stack without the migrations).
#[track_caller]
fn assert_all_under_rest_v1(gw: &Gateway, except: Option<&str>) {
    let seen = gw.seen();
    assert!(!seen.is_empty());
    for s in &seen {
        let path = s.request_line.split_whitespace().nth(1).unwrap_or("");
        let expected_404 = except.is_some_and(|t| path.starts_with(&format!("/rest/v1/{t}?")));
        assert!(
            path.starts_with("/rest/v1/")
                && s.forwarded
                && (s.status < 400 || (expected_404 && s.status == 404)),
            "{s:?}"
        );
    }
}

#[test]
fn a_legacy_jwt_key_pages_past_the_cap_under_rest_v1_with_its_own_authorization() {
    let stack = Stack::new();
    insert_rows(&stack, 2_500, 40);
    let gw = stack.gateway();
    through(&gw, &stack.key, &["aggregate", "--env", "dev"])
        .assert_status(0)
        .assert_stdout_has("Found 2500 requests");
    assert_no_drift(&stack);
    assert_all_under_rest_v1(&gw, Some("usage_aggregation_state"));
    // The legacy key is a JWT: usage-agg sends it as the Bearer too, and
    // the gateway passes that on as sent.
    let bearer = format!("Bearer {}", stack.key);
    for s in gw.seen() {
        assert_eq!(s.authorization_sent.as_deref(), Some(bearer.as_str()));
        assert_eq!(s.authorization_forwarded.as_deref(), Some(bearer.as_str()));
    }
}

#[test]
fn an_sb_secret_key_runs_every_engine_status_and_verify_as_the_service_role() {
    let stack = migrated_stack();
    insert_rows(&stack, 2_500, 40);
    let gw = stack.gateway();
    let key = gw.secret_key.clone();
    through(&gw, &key, &["aggregate", "--env", "dev"]).assert_status(0);
    assert_no_drift(&stack);
    insert_rows(&stack, 1_200, 40);
    through(&gw, &key, &["aggregate", "--env", "dev"]).assert_status(0);
    assert_no_drift(&stack);
    insert_rows(&stack, 700, 40);
    through(&gw, &key, &["aggregate", "--env", "dev", "--engine", "rpc"]).assert_status(0);
    assert_no_drift(&stack);
    assert_watermarks(&stack);
    through(&gw, &key, &["status", "--env", "dev", "--max-age", "1h"])
        .assert_status(0)
        .assert_stdout_has("about 0 rows waiting");
    through(&gw, &key, &["verify", "--env", "dev"]).assert_status(0);
    assert_all_under_rest_v1(&gw, None);
    // An sb_secret_ key is not a JWT: usage-agg sends it in apikey only,
    // and the gateway supplies the service_role token.
    for s in gw.seen() {
        assert_eq!(s.authorization_sent, None, "{s:?}");
        assert!(
            s.authorization_forwarded
                .as_deref()
                .is_some_and(|a| a.starts_with("Bearer eyJ")),
            "{s:?}"
        );
    }
}

#[test]
fn a_wrong_sb_secret_key_is_refused_by_the_gateway_exit_77_naming_the_variable() {
    let stack = Stack::new();
    insert_rows(&stack, 10, 2);
    let gw = stack.gateway();
    let wrong = "sb_secret_not-this-projects-key-0123456789";
    let run = through(&gw, wrong, &["aggregate", "--env", "dev"]);
    run.assert_status(77)
        .assert_stderr_has("HTTP 401")
        .assert_stderr_has("SUPABASE_DEV_SERVICE_ROLE_KEY");
    assert!(!run.all().contains(wrong), "the key is never printed");
    let seen = gw.seen();
    assert_eq!(seen.len(), 1, "a 401 is not retried: {seen:?}");
    assert!(!seen[0].forwarded && seen[0].status == 401);
    assert_eq!(
        count(&stack, "SELECT count(*) FROM portal_usage_monthly"),
        0
    );
}

#[test]
fn a_publishable_key_is_refused_before_any_request_exit_78() {
    let stack = Stack::new();
    let gw = stack.gateway();
    let run = through(&gw, &gw.publishable_key, &["aggregate", "--env", "dev"]);
    // config.rs refuses an sb_publishable_ key by its prefix, before a
    // client exists: the gateway never hears of it.
    run.assert_status(78).assert_stderr_has(
        "SUPABASE_DEV_SERVICE_ROLE_KEY (in the environment) is a publishable key",
    );
    assert!(!run.all().contains(&gw.publishable_key));
    assert!(gw.seen().is_empty(), "{:?}", gw.seen());
}

#[test]
fn the_rest_url_given_as_the_project_url_is_taken_as_the_rest_root() {
    // A common slip: pasting <URL>/rest/v1 (or with a slash) as the project
    // URL. usage-agg takes it as the REST root instead of asking for
    // /rest/v1/rest/v1/...
    let stack = Stack::new();
    insert_rows(&stack, 30, 2);
    let gw = stack.gateway();
    for url in [
        format!("{}/rest/v1", gw.url),
        format!("{}/rest/v1/", gw.url),
    ] {
        let env = vec![
            ("SUPABASE_DEV_URL".to_string(), url),
            (
                "SUPABASE_DEV_SERVICE_ROLE_KEY".to_string(),
                stack.key.clone(),
            ),
        ];
        usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]).assert_status(0);
    }
    assert_no_drift(&stack);
    assert!(gw
        .seen()
        .iter()
        .all(|s| s.request_line.contains(" /rest/v1/")
            && !s.request_line.contains("/rest/v1/rest/v1/")));
}

/// One request to the stack's PostgREST with `key`: its status and body.
fn rest(stack: &Stack, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    let http = reqwest::blocking::Client::new();
    let url = format!("{}/{path}", stack.rest_url);
    let r = http
        .request(method.parse().unwrap(), url)
        .header("apikey", key)
        .bearer_auth(key)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    (r.status().as_u16(), r.text().unwrap_or_default())
}

/// The test stack is Supabase's as far as these machines allow (issue 18):
/// `postgres` is no superuser, PostgREST's sessions run under safeupdate
/// (an UPDATE or DELETE without WHERE is refused in functions too, 400
/// 21000), under authenticator's 8 s and the cluster's 2 minutes.
#[test]
fn the_stack_is_supabases_roles_limits_and_guards() {
    let mut stack = Stack::new();
    let db = &mut stack.sql();
    let (superuser, timeout): (bool, String) = {
        let r = db
            .query_one(
                "SELECT rolsuper, current_setting('statement_timeout') FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((superuser, timeout.as_str()), (false, "2min"));
    let settings: Vec<String> = db
        .query_one(
            "SELECT setconfig::text[] FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
              WHERE r.rolname = 'authenticator' AND s.setdatabase = 0",
            &[],
        )
        .unwrap()
        .get(0);
    for want in [
        "statement_timeout=8s",
        "lock_timeout=8s",
        "session_preload_libraries=safeupdate",
    ] {
        assert!(settings.iter().any(|s| s == want), "{settings:?}");
    }
    stack.ddl(
        "CREATE TABLE scratch (n int); INSERT INTO scratch VALUES (1), (2);
         CREATE FUNCTION scratch_clear(p_all boolean) RETURNS bigint LANGUAGE plpgsql AS $$
         DECLARE gone bigint; BEGIN
           IF p_all THEN DELETE FROM scratch; ELSE DELETE FROM scratch WHERE n = 1; END IF;
           GET DIAGNOSTICS gone = ROW_COUNT; RETURN gone; END $$;",
    );
    let (status, body) = rest(
        &stack,
        "POST",
        "rpc/scratch_clear",
        &stack.key,
        r#"{"p_all": true}"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("21000") && body.contains("DELETE requires a WHERE clause"),
        "{body}"
    );
    let (status, body) = rest(
        &stack,
        "POST",
        "rpc/scratch_clear",
        &stack.key,
        r#"{"p_all": false}"#,
    );
    assert_eq!((status, body.as_str()), (200, "1"));
}

/// Supabase's default privileges give service_role, anon and authenticated
/// ALL on every new table, sequence and function; the migrations take that
/// back and grant exactly what each role needs (issue 18, item 4).
#[test]
fn a_service_key_reads_the_jobs_state_but_cannot_write_it_and_anon_gets_nothing() {
    let stack = migrated_stack();
    insert_rows(&stack, 50, 2);
    aggregate(&stack, &[]).assert_status(0);
    let key = stack.key.clone();
    let (status, _) = rest(
        &stack,
        "GET",
        "usage_aggregation_state?select=cursor_id",
        &key,
        "",
    );
    assert_eq!(status, 200);
    for (method, path, body) in [
        (
            "PATCH",
            "usage_aggregation_state?job=eq.default",
            r#"{"cursor_id": 1}"#,
        ),
        (
            "PATCH",
            "usage_aggregation_state?job=eq.default",
            r#"{"lease_owner": "me"}"#,
        ),
        (
            "POST",
            "usage_agg_deleted_keys",
            r#"{"portal_id": 1, "month_year": "2025-05"}"#,
        ),
        (
            "POST",
            "usage_agg_refused_keys",
            r#"{"job": "default", "portal_id": 1, "month_year": "2025-05", "stored_requests": 1, "raw_requests": 0}"#,
        ),
        ("DELETE", "usage_agg_refused_keys?job=eq.default", ""),
        (
            "POST",
            "portal_usage_adjustments",
            r#"{"portal_id": 1, "month_year": "2025-05", "booked_month": "2025-05", "source": "manual", "reason": "x", "idempotency_key": "x"}"#,
        ),
    ] {
        let (status, body) = rest(&stack, method, path, &key, body);
        // PostgREST answers 42501 (401/403); postrust leaves a table its
        // role may not use out of its schema cache, and answers 404
        // PGRST205. Either way nothing is written (checked below).
        assert!(
            ((status == 401 || status == 403) && body.contains("42501"))
                || (status == 404 && body.contains("PGRST205")),
            "{method} {path}: {status} {body}"
        );
    }
    assert_eq!(
        count(&stack, "SELECT count(*) FROM usage_agg_refused_keys")
            + count(&stack, "SELECT count(*) FROM usage_agg_deleted_keys")
            + count(&stack, "SELECT count(*) FROM portal_usage_adjustments")
            + count(
                &stack,
                "SELECT count(*) FROM usage_aggregation_state WHERE lease_owner = 'me' OR cursor_id = 1"
            ),
        0,
        "nothing written"
    );
    assert_no_drift(&stack);
    let db = &mut stack.sql();
    let leaks: Vec<String> = db
        .query(
            "SELECT r.rolname || ' ' || x.what FROM (VALUES ('anon'), ('authenticated'), ('service_role')) r(rolname),
             LATERAL (
               SELECT 'EXECUTE ' || p.oid::regprocedure::text AS what FROM pg_proc p
                WHERE p.pronamespace = 'public'::regnamespace AND p.proname LIKE 'usage\\_agg\\_%'
                  AND p.prorettype = 'trigger'::regtype AND has_function_privilege(r.rolname, p.oid, 'EXECUTE')
               UNION ALL
               SELECT 'USAGE ' || c.oid::regclass::text FROM pg_class c
                WHERE c.relkind = 'S' AND c.relnamespace = 'public'::regnamespace
                  AND c.relname NOT IN ('usage_requests_id_seq', 'portal_usage_monthly_id_seq')
                  AND has_sequence_privilege(r.rolname, c.oid, 'USAGE')
               UNION ALL
               SELECT 'WRITE ' || t FROM unnest(ARRAY['usage_aggregation_state', 'usage_agg_deleted_keys',
                        'usage_agg_refused_keys', 'usage_agg_closed_months', 'usage_agg_period_events',
                        'portal_usage_adjustments', 'usage_agg_pruned']) t
                WHERE has_table_privilege(r.rolname, t, 'INSERT, UPDATE, DELETE, TRUNCATE')
               UNION ALL
               SELECT 'READ ' || t FROM unnest(ARRAY['usage_aggregation_state', 'usage_agg_deleted_keys',
                        'usage_agg_refused_keys', 'portal_usage_adjustments']) t
                WHERE r.rolname <> 'service_role' AND has_table_privilege(r.rolname, t, 'SELECT')
             ) x ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}
