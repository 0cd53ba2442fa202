//! `usage-agg aggregate`: turn the arguments into a [`Job`], run it against
//! the project's store, print the summary (or the JSON), write the metrics
//! file, ping the monitor.

use std::time::{Duration, Instant};

use super::{connect, report_error};
use crate::cli::AggregateArgs;
use crate::engine::{Outcome, Verdict};
use crate::exit::Status;
use crate::job::Job;
use crate::metrics::{self, RunMetrics};
use crate::output::{self, RunRecord, Style};
use crate::ping::Ping;
use crate::postgrest::Client;
use crate::printer::{Printer, Report};
use crate::progress::Progress;
use crate::store::rest::RestStore;
use crate::store::Store;

pub async fn run(args: AggregateArgs) -> Status {
    let printer = Printer::new("aggregate", &args.output);
    let style = printer.style();
    let human = printer.human();
    let ping = match Ping::new(args.ping_url.as_deref()) {
        Ok(p) => p,
        Err(e) => {
            let started = chrono::Utc::now();
            let status = printer.fail(&e.into(), None);
            write_metrics(&args, None, None, started, Duration::ZERO, status, None).await;
            return status;
        }
    };
    // --deliver-alerts: the webhook's settings are checked before the run,
    // so a bad one counts nothing (exit 78).
    let hook = if args.deliver_alerts {
        match super::alerts::webhook(&args.connection) {
            Ok(h) => Some(h),
            Err(e) => {
                let started = chrono::Utc::now();
                let status = report_error(&e, None);
                write_metrics(&args, None, None, started, Duration::ZERO, status, None).await;
                return status;
            }
        }
    } else {
        None
    };
    ping.start().await;
    let started = chrono::Utc::now();
    let clock = Instant::now();
    let mut warnings = Vec::new();

    let connected = connect(&args.connection);
    // The header goes out before the run with --verbose (a stalled run then
    // shows how far it got); otherwise with the summary, so that an hourly
    // run with nothing to do writes one line.
    let mut header = String::new();
    let (result, env) = match &connected {
        Ok((config, client)) => {
            let env = config.environment.upper();
            if human {
                header = output::header(style, started, env, &config.chosen_by, args.dry_run);
                if args.verbose {
                    crate::out!("{}", std::mem::take(&mut header));
                }
            }
            let progress = Progress::for_terminal(!human);
            (
                aggregate(client, &args, progress, &mut warnings).await,
                Some(env),
            )
        }
        Err(_) => (Err(anyhow::anyhow!("not configured")), None),
    };
    let mut text = String::new();
    let status = match (&connected, &result) {
        (Err(e), _) => report_error(e, None),
        (Ok(_), Ok(o)) => o.verdict().into(),
        (Ok((config, _)), Err(e)) => {
            let status = report_error(e, Some(config));
            text = format!("{header}{}", output::failure(style, status));
            status
        }
    };
    // --auto-close: after a run whose totals are right, close the months
    // past their grace (docs/semantics.md, "Closed months").
    let auto = match (&connected, &result, args.auto_close) {
        (Ok((_, client)), Ok(o), Some(grace))
            if matches!(o.verdict(), Verdict::Ok | Verdict::BadRows) =>
        {
            Some(super::close::auto_close(&RestStore::new(client.clone()), grace).await)
        }
        _ => None,
    };
    let status = match (&auto, &connected) {
        (Some(Err(e)), Ok((config, _))) => {
            let s = report_error(e, Some(config));
            if status == Status::Ok {
                s
            } else {
                status
            }
        }
        (Some(Ok(a)), _) if !a.refused.is_empty() && status == Status::Ok => Status::DataErr,
        _ => status,
    };
    // A month --auto-close left open is why the status is not 0: said on
    // stderr too when no text is printed (--quiet, --json), so that a cron
    // log holds the reason.
    if let (Some(Ok(a)), false) = (&auto, human) {
        for (m, why) in &a.refused {
            tracing::warn!("--auto-close left {m} open: {why}");
        }
    }
    // --deliver-alerts: after the run, whatever its verdict (alerts of
    // earlier runs wait too), once it reached the database.
    let delivered = match (&connected, &hook, env) {
        (Ok((_, client)), Some(hook), Some(env)) => Some(
            super::alerts::deliver_all(client, hook, &crate::cli::Delivery::defaults(), env).await,
        ),
        _ => None,
    };
    let status = match (&delivered, &connected) {
        (Some(Err(e)), Ok((config, _))) => {
            let s = report_error(e, Some(config));
            if status == Status::Ok {
                s
            } else {
                status
            }
        }
        (Some(Ok(d)), _) if status == Status::Ok => d.status(),
        _ => status,
    };
    if let (Ok(outcome), Some(env)) = (&result, env) {
        if !args.verbose && warnings.is_empty() && output::nothing_to_report(outcome) {
            text.push_str(&output::nothing_done(style, outcome, env, clock.elapsed()));
        } else {
            text.push_str(&header);
            for w in &warnings {
                text.push_str(&output::warning(style, w));
            }
            text.push_str(&output::summary(style, outcome, env, clock.elapsed()));
        }
        if let Some(Ok(a)) = &auto {
            text.push_str(&a.render());
        }
    }
    if let Some(Ok(d)) = &delivered {
        text.push_str(&d.render());
    }
    if !human {
        for w in &warnings {
            tracing::warn!("{w}");
        }
    }
    let error = connected.as_ref().err();
    let ran = Ran {
        record: RunRecord {
            command: "aggregate",
            environment: env,
            started_at: started,
            duration: clock.elapsed(),
            dry_run: args.dry_run,
            status,
            result: match (&result, error) {
                (_, Some(e)) => Err(e),
                (Ok(o), None) => Ok(o),
                (Err(e), None) => Err(e),
            },
            warnings: &warnings,
        },
        auto: auto.as_ref().and_then(|a| a.as_ref().ok()),
        after_error: match (&auto, &delivered) {
            (Some(Err(e)), _) | (_, Some(Err(e))) => Some(format!("{e:#}")),
            _ => None,
        },
        delivered: delivered.as_ref().and_then(|d| d.as_ref().ok()),
        text,
    };
    printer.report(&ran);
    let json = printer.json_of(&ran);
    let client = connected.as_ref().ok().map(|(_, client)| client);
    let outcome = result.as_ref().ok();
    write_metrics(
        &args,
        env,
        client,
        started,
        ran.record.duration,
        status,
        outcome,
    )
    .await;
    ping.finish(status, &json).await;
    status
}

/// One run as a person and a monitor read it: the run record (its JSON is
/// `output::run_json`, failures included), what `--auto-close` closed, and
/// the text.
struct Ran<'a> {
    record: RunRecord<'a>,
    auto: Option<&'a super::close::AutoClosed>,
    /// `--auto-close` or `--deliver-alerts` failed after the run.
    after_error: Option<String>,
    delivered: Option<&'a super::alerts::Delivered>,
    text: String,
}

impl serde::Serialize for Ran<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut json = output::run_json(&self.record);
        if let (Some(a), Some(o)) = (self.auto, json.as_object_mut()) {
            if let serde_json::Value::Object(extra) = a.json() {
                o.extend(extra);
            }
        }
        if let (Some(d), Some(o)) = (self.delivered, json.as_object_mut()) {
            o.insert(
                "alerts_delivery".into(),
                serde_json::to_value(d).unwrap_or_default(),
            );
        }
        // The outcome names why the status is what it is: a month
        // --auto-close left open, alerts not delivered, or a failure of
        // either after the run (before, "ok" with 65).
        json["outcome"] = self.outcome().into();
        if let Some(e) = &self.after_error {
            json["error"] = e.as_str().into();
        }
        json.serialize(s)
    }
}

impl Report for Ran<'_> {
    fn outcome(&self) -> &str {
        match self.record.result {
            Ok(_) if self.after_error.is_some() => "failed",
            Ok(o)
                if o.verdict() == Verdict::Ok
                    && self.auto.is_some_and(|a| !a.refused.is_empty()) =>
            {
                "auto_close_refused"
            }
            Ok(o)
                if o.verdict() == Verdict::Ok
                    && self.delivered.is_some_and(|d| d.status() != Status::Ok) =>
            {
                "alerts_undelivered"
            }
            Ok(o) => o.verdict().label(),
            Err(_) => "failed",
        }
    }

    fn status(&self) -> Status {
        self.record.status
    }

    fn render(&self, _: Style) -> String {
        self.text.clone()
    }
}

/// The metrics file, when one is asked for: after every run, failed ones
/// included (README, "Monitoring"). The backlog costs one more request (the
/// newest id), made only when the run moved the cursor and so reached the
/// server; the last success is carried over from the previous file.
async fn write_metrics(
    args: &AggregateArgs,
    env: Option<&str>,
    client: Option<&Client>,
    started: chrono::DateTime<chrono::Utc>,
    duration: Duration,
    status: Status,
    outcome: Option<&Outcome>,
) {
    let Some(path) = args
        .metrics_file
        .as_deref()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return;
    };
    let environment = metrics::environment_label(
        env,
        args.connection.env,
        args.connection.env_file.as_deref(),
    );
    let backlog = match (client, outcome.and_then(|o| o.cursor)) {
        (Some(client), Some((_, cursor))) => {
            match RestStore::new(client.clone()).newest_id().await {
                Ok(newest) => Some((newest - cursor).max(0)),
                Err(e) => {
                    tracing::warn!("could not read the newest id for the backlog metric: {e:#}");
                    None
                }
            }
        }
        _ => None,
    };
    let run = RunMetrics {
        started_at: started,
        duration,
        exit_status: status.code(),
        outcome,
        backlog,
        previous_success: metrics::previous_value(path, metrics::LAST_SUCCESS, &environment),
    };
    metrics::write_or_warn(path, &metrics::render(&environment, &run.gauges()));
}

async fn aggregate(
    client: &Client,
    args: &AggregateArgs,
    progress: Progress,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Outcome> {
    let job = Job::plan(args, progress, client.deadline());
    let store = RestStore::new(client.clone()).at_once(usize::from(args.scan.concurrency));
    job.run(&store, warnings).await
}
