//! `--metrics-file`: the node_exporter textfile a run leaves behind, read
//! with a parser of the Prometheus text format written apart from ours
//! (the prometheus-parse crate), and checked against SQL ground truth.

use std::collections::HashMap;
use std::path::Path;

use crate::common::*;

/// The file as Prometheus reads it: metric name to value. Asserts what every
/// sample must be: a gauge with its HELP, `usage_agg_` and no `_total`, the
/// one label `environment="DEV"`, one sample per metric.
#[track_caller]
fn scrape(path: &Path) -> HashMap<String, f64> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let parsed = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    // The crate skips lines it cannot read, silently: every sample line
    // must be one it read.
    let sample_lines = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    assert_eq!(
        parsed.samples.len(),
        sample_lines,
        "unread lines in\n{text}"
    );
    let mut values = HashMap::new();
    for s in parsed.samples {
        assert!(
            s.metric.starts_with("usage_agg_") && !s.metric.ends_with("_total"),
            "{}",
            s.metric
        );
        assert!(
            parsed.docs.contains_key(&s.metric),
            "no HELP for {}",
            s.metric
        );
        assert_eq!(s.labels.len(), 1, "{}: {:?}", s.metric, s.labels);
        assert_eq!(s.labels.get("environment"), Some("DEV"), "{}", s.metric);
        let prometheus_parse::Value::Gauge(v) = s.value else {
            panic!("{} is not typed as a gauge: {:?}", s.metric, s.value);
        };
        assert!(
            values.insert(s.metric.clone(), v).is_none(),
            "{} twice",
            s.metric
        );
    }
    values
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

const LAST_RUN: &str = "usage_agg_last_run_timestamp_seconds";
const LAST_SUCCESS: &str = "usage_agg_last_success_timestamp_seconds";
const EXIT: &str = "usage_agg_last_run_exit_status";
const COUNTED: &str = "usage_agg_last_run_rows_counted";

#[test]
fn every_run_writes_the_file_and_a_failed_one_keeps_the_last_success() {
    let stack = migrated_stack();
    insert_rows(&stack, 2_500, 40);
    let dir = workdir();
    let path = dir.join("usage_agg.prom");
    let file = path.to_str().unwrap();

    // A dry run: exit 0, nothing written, and not a success.
    aggregate(&stack, &["--dry-run", "--metrics-file", file]).assert_status(0);
    let m = scrape(&path);
    assert_eq!((m[EXIT], m["usage_agg_last_run_keys_written"]), (0.0, 0.0));
    assert!(!m.contains_key(LAST_SUCCESS), "{m:?}");

    let before = now();
    aggregate(&stack, &["--metrics-file", file]).assert_status(0);
    let after = now();
    assert_no_drift(&stack);
    let m = scrape(&path);
    assert_eq!(m[EXIT], 0.0);
    assert_eq!(
        m[COUNTED],
        count(&stack, "SELECT count(*) FROM usage_requests") as f64
    );
    assert_eq!(m[COUNTED], 2_500.0);
    assert_eq!(m["usage_agg_last_run_rows_read"], 2_500.0);
    assert_eq!(m["usage_agg_last_run_rows_rejected"], 0.0);
    assert_eq!(
        m["usage_agg_last_run_keys_written"],
        count(&stack, "SELECT count(*) FROM portal_usage_monthly") as f64
    );
    assert_eq!(m["usage_agg_backlog_rows"], 0.0);
    assert!(
        (before - 1.0..=after).contains(&m[LAST_RUN]),
        "{before} {m:?} {after}"
    );
    assert_eq!(m[LAST_SUCCESS], m[LAST_RUN]);
    let took = m["usage_agg_last_run_duration_seconds"];
    assert!(took > 0.0 && took <= after - before, "{took}");
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["usage_agg.prom"], "no temporary file left behind");

    // The variable names the file as well; only the new rows are counted.
    insert_rows(&stack, 300, 40);
    let mut env = stack.env();
    env.push(("USAGE_AGG_METRICS_FILE".into(), file.into()));
    usage_agg(&workdir(), &env, &["aggregate", "--env", "dev"]).assert_status(0);
    let m = scrape(&path);
    assert_eq!(
        (m[EXIT], m[COUNTED], m["usage_agg_backlog_rows"]),
        (0.0, 300.0, 0.0)
    );
    let success = m[LAST_SUCCESS];
    assert!(success > before && success == m[LAST_RUN]);

    // The server unreachable: exit 69; the last success is the one before,
    // and the counts of a run that did not finish are left out.
    let mut env = env_via(&stack, "http://127.0.0.1:1");
    env.push(("USAGE_AGG_METRICS_FILE".into(), file.into()));
    usage_agg(
        &workdir(),
        &env,
        &["aggregate", "--env", "dev", "--max-retries", "0"],
    )
    .assert_status(69);
    let m = scrape(&path);
    assert_eq!((m[EXIT], m[LAST_SUCCESS]), (69.0, success));
    assert!(m[LAST_RUN] > success);
    assert!(!m.contains_key(COUNTED) && !m.contains_key("usage_agg_backlog_rows"));

    // Not even configured (no key): exit 78, still written, still DEV.
    let env: Vec<_> = stack
        .env()
        .into_iter()
        .filter(|(k, _)| k != "SUPABASE_DEV_SERVICE_ROLE_KEY")
        .collect();
    usage_agg(
        &workdir(),
        &env,
        &["aggregate", "--env", "dev", "--metrics-file", file],
    )
    .assert_status(78);
    let m = scrape(&path);
    assert_eq!((m[EXIT], m[LAST_SUCCESS]), (78.0, success));
}

#[test]
fn status_writes_what_the_database_records_under_its_own_names() {
    let stack = migrated_stack();
    insert_rows(&stack, 1_000, 20);
    aggregate(&stack, &[]).assert_status(0);
    insert_rows(&stack, 150, 20);
    let dir = workdir();
    let path = dir.join("usage_agg_status.prom");
    let aggregate_file = dir.join("usage_agg.prom");
    // USAGE_AGG_METRICS_FILE is aggregate's file: status never writes it.
    let mut env = stack.env();
    env.push((
        "USAGE_AGG_METRICS_FILE".into(),
        aggregate_file.to_str().unwrap().into(),
    ));
    let args = [
        "status",
        "--env",
        "dev",
        "--metrics-file",
        path.to_str().unwrap(),
    ];
    usage_agg(&workdir(), &env, &args).assert_status(0);
    assert!(!aggregate_file.exists());
    let m = scrape(&path);
    assert_eq!(m["usage_agg_status_exit_status"], 0.0);
    assert_eq!(m["usage_agg_status_backlog_rows"], 150.0);
    let success = m["usage_agg_status_last_success_timestamp_seconds"];
    assert!((now() - 60.0..=now()).contains(&success), "{m:?}");
    assert!(m["usage_agg_status_last_run_timestamp_seconds"] <= success);
    assert!(
        m.keys().all(|k| k.starts_with("usage_agg_status_")),
        "{m:?}"
    );

    // The database unreachable: 69, the last success it recorded kept.
    let mut env = env_via(&stack, "http://127.0.0.1:1");
    env.push(("USAGE_AGG_METRICS_FILE".into(), "ignored.prom".into()));
    let mut args = args.to_vec();
    args.extend(["--max-retries", "0"]);
    usage_agg(&workdir(), &env, &args).assert_status(69);
    let m = scrape(&path);
    assert_eq!(m["usage_agg_status_exit_status"], 69.0);
    assert_eq!(
        m["usage_agg_status_last_success_timestamp_seconds"],
        success
    );
    assert!(!m.contains_key("usage_agg_status_backlog_rows"));
}
