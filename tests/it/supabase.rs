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
    let mut stack = Stack::new();
    migrate(&mut stack);
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
