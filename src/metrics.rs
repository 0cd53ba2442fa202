//! Metrics for Prometheus, as a file for node_exporter's textfile collector
//! (`--metrics-file`): the convention for cron jobs, which are gone before
//! anything could scrape them.
//!
//! The file is rewritten whole after every run, failed ones included, and
//! atomically: written to `PATH.tmp.<pid>` in the same directory, synced,
//! then renamed over `PATH`, so the collector never reads half a file. A
//! file that cannot be written is a warning, never a failed run: monitoring
//! must not become the outage (a file that stops changing shows as stale).
//!
//! Naming follows Prometheus' conventions: the `usage_agg_` prefix, base
//! units (`_seconds`, Unix time as `_timestamp_seconds`), one label,
//! `environment` (`DEV` or `PROD`). Every metric is a gauge: each says what
//! the last run did, or what the state was when it was read, so none is a
//! counter and none ends in `_total`. A value that is not known (the counts
//! of a run that failed, a backlog without a cursor, a success that never
//! happened) is left out rather than written as 0. README.md, "Monitoring",
//! lists them with alert rules.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::{choose_environment, EnvChoice, Sources};
use crate::engine::{Outcome, Verdict};

/// One sample of a gauge.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauge {
    pub name: &'static str,
    pub help: &'static str,
    pub value: f64,
}

/// The text exposition format: `# HELP`, `# TYPE`, one sample a metric,
/// each labelled with the environment. No timestamps on samples: the
/// textfile collector refuses them.
pub fn render(environment: &str, gauges: &[Gauge]) -> String {
    let mut out = String::new();
    for g in gauges {
        let _ = writeln!(out, "# HELP {} {}", g.name, escape_help(g.help));
        let _ = writeln!(out, "# TYPE {} gauge", g.name);
        let _ = writeln!(
            out,
            "{}{} {}",
            g.name,
            labels(environment),
            format_value(g.value)
        );
    }
    out
}

fn labels(environment: &str) -> String {
    format!("{{environment=\"{}\"}}", escape_label(environment))
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Go's float syntax, which Prometheus reads: integers without a fraction,
/// `+Inf`, `-Inf`, `NaN`.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        // Rust's shortest round-trip form: `2500`, `1795815074.21`.
        format!("{v}")
    }
}

/// Unix time in seconds, to the millisecond.
pub fn unix_seconds(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// The value of `name` for `environment` in a file this module wrote
/// earlier, if it holds one: how the last success survives runs that fail.
pub fn previous_value(path: &Path, name: &str, environment: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let prefix = format!("{name}{} ", labels(environment));
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|v| v.is_finite())
}

/// Writes `contents` to `path` atomically, replacing it
/// ([`crate::stdio::write_file_atomically`]). The temporary file does not
/// end in `.prom`, so the collector never reads it.
pub fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    crate::stdio::write_file_atomically(path, contents, crate::stdio::Existing::Replace)
}

/// Writes the file, or warns: a metrics file that cannot be written never
/// changes the run's exit status.
pub fn write_or_warn(path: &Path, contents: &str) {
    if let Err(e) = write_atomically(path, contents) {
        tracing::warn!(
            "could not write the metrics file {}: {e}; the run is not affected",
            path.display()
        );
    }
}

/// The `environment` label. Known from the configuration when it was read;
/// when it could not be (the run failed before), from `--env`, or for
/// `--env auto` from APP_ENV/NODE_ENV as the configuration would have
/// chosen; `UNKNOWN` only when even that cannot be read.
pub fn environment_label(
    known: Option<&str>,
    choice: EnvChoice,
    env_file: Option<&std::path::Path>,
) -> String {
    if let Some(env) = known {
        return env.to_string();
    }
    std::env::current_dir()
        .ok()
        .and_then(|dir| Sources::load(&dir, env_file).ok())
        .map(|s| choose_environment(choice, &s).0.upper().to_string())
        .unwrap_or_else(|| "UNKNOWN".into())
}

pub const LAST_SUCCESS: &str = "usage_agg_last_success_timestamp_seconds";
pub const STATUS_LAST_SUCCESS: &str = "usage_agg_status_last_success_timestamp_seconds";

/// What an `aggregate` run reports.
#[derive(Debug, Clone)]
pub struct RunMetrics<'a> {
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub exit_status: i32,
    /// The run's outcome, when it got that far.
    pub outcome: Option<&'a Outcome>,
    /// The newest id minus the cursor after the run, when both are known.
    pub backlog: Option<i64>,
    /// The last success before this run, from the previous file.
    pub previous_success: Option<f64>,
}

impl RunMetrics<'_> {
    /// Whether this run is a success in the sense of `last_success_at` in
    /// the database and `status --max-age`: it wrote (not `--dry-run`) and
    /// its outcome is `ok` or `bad_rows` (README, "Outcomes").
    pub fn succeeded(&self) -> bool {
        self.outcome
            .is_some_and(|o| !o.dry_run && matches!(o.verdict(), Verdict::Ok | Verdict::BadRows))
    }

    pub fn gauges(&self) -> Vec<Gauge> {
        let mut g = vec![
            Gauge {
                name: "usage_agg_last_run_timestamp_seconds",
                help: "When the last aggregate run started (Unix time).",
                value: unix_seconds(self.started_at),
            },
            Gauge {
                name: "usage_agg_last_run_exit_status",
                help: "Exit status of the last aggregate run: 0 ok, 65 data, 69 server, 75 try later (lease held, deadline), 77 key, 78 configuration (README, Exit statuses).",
                value: f64::from(self.exit_status),
            },
            Gauge {
                name: "usage_agg_last_run_duration_seconds",
                help: "How long the last aggregate run took.",
                value: self.duration.as_secs_f64(),
            },
        ];
        let success = if self.succeeded() {
            Some(unix_seconds(self.started_at))
        } else {
            self.previous_success
        };
        if let Some(t) = success {
            g.push(Gauge {
                name: LAST_SUCCESS,
                help: "When the last successful aggregate run (outcome ok or bad_rows, not a dry run) started (Unix time): every row committed before it is counted.",
                value: t,
            });
        }
        if let Some(o) = self.outcome {
            g.extend([
                Gauge {
                    name: "usage_agg_last_run_rows_read",
                    help: "Raw rows the server returned in the last run.",
                    value: o.rows_read as f64,
                },
                Gauge {
                    name: "usage_agg_last_run_rows_counted",
                    help: "Raw rows counted into some portal-month in the last run.",
                    value: o.rows_counted as f64,
                },
                Gauge {
                    name: "usage_agg_last_run_rows_rejected",
                    help: "Raw rows rejected as bad data in the last run.",
                    value: o.bad.count as f64,
                },
                Gauge {
                    name: "usage_agg_last_run_keys_written",
                    help: "Portal-month rows of portal_usage_monthly the last run wrote (0 for a dry run).",
                    value: if o.dry_run { 0.0 } else { o.keys_changed as f64 },
                },
            ]);
        }
        if let Some(b) = self.backlog {
            g.push(Gauge {
                name: "usage_agg_backlog_rows",
                help: "Rows waiting after the last run: the newest usage_requests id minus the cursor (ids skipped by rolled-back inserts make it an overestimate).",
                value: b as f64,
            });
        }
        g
    }
}

/// What `status` reports, read from the database: the state every runner
/// records, on any host.
#[derive(Debug, Clone)]
pub struct StatusMetrics {
    pub checked_at: DateTime<Utc>,
    pub exit_status: i32,
    pub backlog: Option<i64>,
    pub last_run_started: Option<f64>,
    pub last_success: Option<f64>,
    /// Undelivered alerts and the oldest one's age, with the quotas
    /// migration.
    pub alerts_undelivered: Option<u64>,
    pub alerts_oldest_age: Option<i64>,
}

impl StatusMetrics {
    /// A check that ended in an error: only when it ran and how it ended
    /// are known, and the last success is carried over (`previous_value`)
    /// rather than lost.
    pub fn failed(
        checked_at: DateTime<Utc>,
        exit_status: i32,
        last_success: Option<f64>,
    ) -> StatusMetrics {
        StatusMetrics {
            checked_at,
            exit_status,
            backlog: None,
            last_run_started: None,
            last_success,
            alerts_undelivered: None,
            alerts_oldest_age: None,
        }
    }

    pub fn gauges(&self) -> Vec<Gauge> {
        let mut g = vec![
            Gauge {
                name: "usage_agg_status_timestamp_seconds",
                help: "When usage-agg status last checked (Unix time).",
                value: unix_seconds(self.checked_at),
            },
            Gauge {
                name: "usage_agg_status_exit_status",
                help: "Exit status of the last usage-agg status: 0 healthy, 65 or 78 a problem stands, 75 stale (--max-age), 69 server, 77 key.",
                value: f64::from(self.exit_status),
            },
        ];
        if let Some(t) = self.last_success {
            g.push(Gauge {
                name: STATUS_LAST_SUCCESS,
                help: "When the last successful run finished, as the database records it for every runner (Unix time).",
                value: t,
            });
        }
        if let Some(t) = self.last_run_started {
            g.push(Gauge {
                name: "usage_agg_status_last_run_timestamp_seconds",
                help: "When the last run recorded in the database started (Unix time).",
                value: t,
            });
        }
        if let Some(b) = self.backlog {
            g.push(Gauge {
                name: "usage_agg_status_backlog_rows",
                help: "Rows waiting when status checked: the newest usage_requests id minus the cursor.",
                value: b as f64,
            });
        }
        if let Some(n) = self.alerts_undelivered {
            g.push(Gauge {
                name: "usage_agg_status_alerts_undelivered",
                help: "Quota alerts recorded and not yet delivered to the webhook (usage-agg alerts deliver).",
                value: n as f64,
            });
            g.push(Gauge {
                name: "usage_agg_status_alerts_oldest_undelivered_age_seconds",
                help: "How long the oldest undelivered quota alert has waited since it was reached (0 when none waits).",
                value: self.alerts_oldest_age.unwrap_or(0) as f64,
            });
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::BadRows;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn outcome(rows: u64, bad: u64, keys: usize, dry_run: bool) -> Outcome {
        Outcome {
            rows_read: rows + bad,
            rows_counted: rows,
            bad: BadRows {
                count: bad,
                ..BadRows::default()
            },
            keys_changed: keys,
            dry_run,
            ..Outcome::default()
        }
    }

    #[test]
    fn a_successful_run_renders_every_metric_with_help_type_and_the_environment() {
        let o = outcome(2500, 0, 120, false);
        let m = RunMetrics {
            started_at: at("2026-11-27T21:31:14.210Z"),
            duration: Duration::from_millis(1500),
            exit_status: 0,
            outcome: Some(&o),
            backlog: Some(7),
            previous_success: Some(1.0),
        };
        let text = render("PROD", &m.gauges());
        let expected = "\
# HELP usage_agg_last_run_timestamp_seconds When the last aggregate run started (Unix time).
# TYPE usage_agg_last_run_timestamp_seconds gauge
usage_agg_last_run_timestamp_seconds{environment=\"PROD\"} 1795815074.21
";
        assert!(text.starts_with(expected), "{text}");
        for line in [
            "usage_agg_last_run_exit_status{environment=\"PROD\"} 0\n",
            "usage_agg_last_run_duration_seconds{environment=\"PROD\"} 1.5\n",
            "usage_agg_last_success_timestamp_seconds{environment=\"PROD\"} 1795815074.21\n",
            "usage_agg_last_run_rows_read{environment=\"PROD\"} 2500\n",
            "usage_agg_last_run_rows_counted{environment=\"PROD\"} 2500\n",
            "usage_agg_last_run_rows_rejected{environment=\"PROD\"} 0\n",
            "usage_agg_last_run_keys_written{environment=\"PROD\"} 120\n",
            "usage_agg_backlog_rows{environment=\"PROD\"} 7\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        // Each metric: HELP, TYPE gauge, one sample; names in base units,
        // no counters.
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3 * 9, "{text}");
        for chunk in lines.chunks(3) {
            let name = chunk[2].split('{').next().unwrap();
            assert!(name.starts_with("usage_agg_") && !name.ends_with("_total"));
            assert!(!name.contains("_ms") && !name.contains("millis"));
            assert!(chunk[0].starts_with(&format!("# HELP {name} ")));
            assert_eq!(chunk[1], format!("# TYPE {name} gauge"));
        }
    }

    #[test]
    fn a_failed_run_keeps_the_last_success_and_leaves_out_what_it_does_not_know() {
        let m = RunMetrics {
            started_at: at("2026-11-28T00:00:00Z"),
            duration: Duration::from_secs(3),
            exit_status: 69,
            outcome: None,
            backlog: None,
            previous_success: Some(1795815074.21),
        };
        let names: Vec<_> = m.gauges().iter().map(|g| (g.name, g.value)).collect();
        assert_eq!(
            names,
            [
                ("usage_agg_last_run_timestamp_seconds", 1795824000.0),
                ("usage_agg_last_run_exit_status", 69.0),
                ("usage_agg_last_run_duration_seconds", 3.0),
                (LAST_SUCCESS, 1795815074.21),
            ]
        );
        // Never succeeded: no last success at all, rather than a 0.
        let m = RunMetrics {
            previous_success: None,
            ..m
        };
        assert!(m.gauges().iter().all(|g| g.name != LAST_SUCCESS));
    }

    #[test]
    fn bad_rows_count_as_a_success_and_dry_runs_do_not() {
        let bad = outcome(10, 2, 3, false);
        let dry = outcome(10, 0, 3, true);
        let refused = Outcome {
            refusals_standing: crate::engine::Refusals {
                count: 1,
                ..Default::default()
            },
            ..outcome(10, 0, 3, false)
        };
        let run = |o| RunMetrics {
            started_at: at("2026-11-28T00:00:00Z"),
            duration: Duration::ZERO,
            exit_status: 65,
            outcome: Some(o),
            backlog: None,
            previous_success: None,
        };
        assert!(run(&bad).succeeded());
        assert!(!run(&dry).succeeded());
        assert!(!run(&refused).succeeded());
        let keys = run(&dry)
            .gauges()
            .into_iter()
            .find(|g| g.name == "usage_agg_last_run_keys_written")
            .unwrap();
        assert_eq!(keys.value, 0.0, "a dry run writes nothing");
    }

    #[test]
    fn values_and_labels_are_escaped_as_the_format_asks() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(1e15), "1000000000000000");
        let g = [Gauge {
            name: "usage_agg_x",
            help: "a \\ b\nc",
            value: 1.0,
        }];
        assert_eq!(
            render("a\"b\\c\nd", &g),
            "# HELP usage_agg_x a \\\\ b\\nc\n# TYPE usage_agg_x gauge\nusage_agg_x{environment=\"a\\\"b\\\\c\\nd\"} 1\n"
        );
    }

    #[test]
    fn the_file_is_replaced_whole_and_its_last_success_read_back() {
        let dir = std::env::temp_dir().join(format!("usage-agg-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage_agg.prom");
        assert_eq!(previous_value(&path, LAST_SUCCESS, "DEV"), None);
        let g = |v| {
            [Gauge {
                name: LAST_SUCCESS,
                help: "h",
                value: v,
            }]
        };
        write_atomically(&path, &render("DEV", &g(1795815074.21))).unwrap();
        write_atomically(&path, &render("DEV", &g(1795815075.5))).unwrap();
        assert_eq!(
            previous_value(&path, LAST_SUCCESS, "DEV"),
            Some(1795815075.5)
        );
        // Another environment's success is not this one's.
        assert_eq!(previous_value(&path, LAST_SUCCESS, "PROD"), None);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["usage_agg.prom"], "no temporary file left behind");
        // A directory that does not exist: an error, and nothing left.
        assert!(write_atomically(&dir.join("missing/x.prom"), "x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_metrics_render_what_is_known() {
        let m = StatusMetrics {
            checked_at: at("2026-11-27T22:00:00Z"),
            exit_status: 0,
            backlog: Some(42),
            last_run_started: Some(1795815074.21),
            last_success: Some(1795815075.0),
            alerts_undelivered: None,
            alerts_oldest_age: None,
        };
        let text = render("PROD", &m.gauges());
        for line in [
            "usage_agg_status_timestamp_seconds{environment=\"PROD\"} 1795816800\n",
            "usage_agg_status_exit_status{environment=\"PROD\"} 0\n",
            "usage_agg_status_last_success_timestamp_seconds{environment=\"PROD\"} 1795815075\n",
            "usage_agg_status_last_run_timestamp_seconds{environment=\"PROD\"} 1795815074.21\n",
            "usage_agg_status_backlog_rows{environment=\"PROD\"} 42\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("alerts"), "{text}");
        // A failed check: only what is known.
        let m = StatusMetrics::failed(at("2026-11-27T22:00:00Z"), 69, None);
        assert_eq!(m.gauges().len(), 2);
        let m = StatusMetrics::failed(at("2026-11-27T22:00:00Z"), 69, Some(1.0));
        assert!(m.gauges().iter().any(|g| g.name == STATUS_LAST_SUCCESS));
    }
}
