//! `usage-agg alerts list [--undelivered]` and `usage-agg alerts deliver`
//! (docs/quotas.md): the alerts the rule book recorded when a portal's
//! month reached a threshold of its quota, and their delivery to the
//! webhook, signed as Standard Webhooks specify. `aggregate
//! --deliver-alerts` delivers the same way after its run ([`deliver_all`]).
//!
//! Delivery is at least once: each alert is posted until a receiver answers
//! 2xx, and `delivered_at` is recorded after that answer, so an answer lost
//! on the way back, or a run killed between the two, posts it again. Every
//! post of one alert carries the same `webhook-id` (its `webhook_id`), so a
//! receiver that dedups by it processes each alert once.

use std::fmt::Write as _;

use backon::BackoffBuilder;
use serde::Serialize;

use super::connect;
use super::quota::grouped;
use crate::alerts::{self, Alert, AlertFilter};
use crate::cli::{AlertsAction, AlertsArgs, AlertsDeliverArgs, AlertsListArgs, Delivery};
use crate::config::{AlertsWebhook, Config, Sources};
use crate::exit::Status;
use crate::output::{human_time, Style};
use crate::postgrest::Client;
use crate::printer::{Printer, Report};
use crate::text_table::{Align, Table, Width};
use crate::webhook::{AttemptFailed, Sender};

pub async fn run(args: AlertsArgs) -> Status {
    match args.action {
        AlertsAction::List(a) => list(a).await,
        AlertsAction::Deliver(a) => deliver(a).await,
    }
}

/// What `alerts list` found.
#[derive(Debug, Serialize)]
struct Listed {
    alerts: Vec<Alert>,
    undelivered_only: bool,
}

impl Report for Listed {
    fn outcome(&self) -> &str {
        "ok"
    }

    fn render(&self, _: Style) -> String {
        if self.alerts.is_empty() {
            return if self.undelivered_only {
                "No undelivered alerts\n".into()
            } else {
                "No alerts: no portal's month has reached a threshold of its quota\n".into()
            };
        }
        let mut t = Table::new("", "  ")
            .column(Align::Right, Width::AtLeast(6))
            .column(Align::Left, Width::AtLeast(8))
            .column(Align::Left, Width::AtLeast(7))
            .column(Align::Right, Width::AtLeast(9))
            .column(Align::Right, Width::AtLeast(11))
            .column(Align::Right, Width::AtLeast(11))
            .column(Align::Left, Width::AtLeast(23))
            .column(Align::Left, Width::Fit);
        t.row([
            "ID",
            "PORTAL",
            "MONTH",
            "THRESHOLD",
            "LIMIT",
            "AT CROSSING",
            "CROSSED",
            "DELIVERED",
        ]);
        for a in &self.alerts {
            let delivered = match (&a.delivered_at, a.attempts) {
                (Some(t), n) => format!(
                    "{}{}",
                    human_time(t),
                    if n > 1 {
                        format!(" (attempt {n})")
                    } else {
                        String::new()
                    }
                ),
                (None, 0) => "no, not tried yet".into(),
                (None, n) => format!(
                    "no, {} failed{}",
                    crate::output::count(n as u64, "attempt", "attempts"),
                    a.last_error
                        .as_deref()
                        .map_or(String::new(), |e| format!(": {e}"))
                ),
            };
            t.row([
                a.id.to_string(),
                a.portal_id.to_string(),
                a.month_year.clone(),
                format!("{}%", a.threshold_percent),
                grouped(a.request_limit),
                grouped(a.request_count),
                human_time(&a.crossed_at),
                delivered,
            ]);
        }
        t.render()
    }
}

async fn list(args: AlertsListArgs) -> Status {
    let printer = Printer::new("alerts list", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let filter = AlertFilter {
        undelivered: args.undelivered,
        portal: args.portal,
        month: args.month,
    };
    match alerts::list(&client, filter).await {
        Ok(alerts) => printer.report(&Listed {
            alerts,
            undelivered_only: args.undelivered,
        }),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

/// The alerts webhook's settings, from the same places as the project's
/// (environment, then the env files or --env-file).
pub fn webhook(conn: &crate::cli::Connection) -> anyhow::Result<AlertsWebhook> {
    let dir = std::env::current_dir()?;
    let sources = Sources::load(&dir, conn.env_file.as_deref())?;
    Ok(AlertsWebhook::resolve(&sources)?)
}

/// One alert as its webhook carries it (docs/quotas.md, "The payload").
pub fn payload(a: &Alert, environment: &str) -> String {
    serde_json::json!({
        "type": "usage.quota_threshold_reached",
        "timestamp": a.crossed_at,
        "data": {
            "alert_id": a.id,
            "portal_id": a.portal_id,
            "month_year": a.month_year,
            "threshold_percent": a.threshold_percent,
            "request_limit": a.request_limit,
            "request_count": a.request_count,
            "crossed_at": a.crossed_at,
            "environment": environment,
        }
    })
    .to_string()
}

/// One alert's fate in a delivery run.
#[derive(Debug, Clone, Serialize)]
pub struct Posted {
    pub id: i64,
    pub webhook_id: String,
    pub portal_id: i64,
    pub month_year: String,
    pub threshold_percent: i64,
    pub delivered: bool,
    /// Attempts in this run.
    pub attempts: u32,
    /// All attempts so far, this run's included.
    pub attempts_total: i64,
    pub error: Option<String>,
}

/// What a delivery run did (`alerts deliver`, `aggregate --deliver-alerts`).
#[derive(Debug, Default, Serialize)]
pub struct Delivered {
    pub url: String,
    pub posted: Vec<Posted>,
    /// Undelivered alerts left for the next run, the failed one included.
    pub left: usize,
    /// A redirect answered: the URL is wrong (exit 78), not the moment.
    pub redirected: bool,
}

impl Delivered {
    pub fn delivered(&self) -> usize {
        self.posted.iter().filter(|p| p.delivered).count()
    }

    /// 0 when every undelivered alert was delivered, 78 after a redirect
    /// (fix the URL), else 75: the rest go with the next run.
    pub fn status(&self) -> Status {
        if self.redirected {
            Status::Config
        } else if self.left > 0 {
            Status::TempFail
        } else {
            Status::Ok
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        if self.posted.is_empty() {
            s.push_str("Alerts: none to deliver\n");
            return s;
        }
        let _ = writeln!(
            s,
            "Alerts: {} of {} delivered to {}",
            self.delivered(),
            self.delivered() + self.left,
            self.url
        );
        for p in &self.posted {
            let _ = writeln!(
                s,
                "  alert {} (portal {}, {}, {}%): {}",
                p.id,
                p.portal_id,
                p.month_year,
                p.threshold_percent,
                match (&p.error, p.delivered) {
                    (_, true) if p.attempts > 1 =>
                        format!("delivered at attempt {} of this run", p.attempts),
                    (_, true) => "delivered".to_string(),
                    (Some(e), false) => format!(
                        "not delivered after {} ({e})",
                        crate::output::count(u64::from(p.attempts), "attempt", "attempts")
                    ),
                    (None, false) => "not delivered".to_string(),
                }
            );
        }
        if self.redirected {
            let _ = writeln!(
                s,
                "  The receiver redirects, and redirects are never followed: put the final URL in \
                 {}",
                crate::config::ALERTS_WEBHOOK_URL
            );
        } else if self.left > 0 {
            let _ = writeln!(
                s,
                "  {} left for the next run (`usage-agg alerts deliver`), with the same webhook-id",
                crate::output::count(self.left as u64, "alert", "alerts")
            );
        }
        s
    }
}

/// Posts every undelivered alert, oldest first, each up to
/// `delivery.attempts` times with exponential backoff, recording every
/// attempt. Stops at the first alert still undelivered after its attempts:
/// the receiver is down, and the rest wait for the next run.
pub async fn deliver_all(
    client: &Client,
    hook: &AlertsWebhook,
    delivery: &Delivery,
    environment: &str,
) -> anyhow::Result<Delivered> {
    let sender = Sender::new(hook, delivery.attempt_timeout)?;
    let pending = alerts::list(
        client,
        AlertFilter {
            undelivered: true,
            ..AlertFilter::default()
        },
    )
    .await?;
    let mut out = Delivered {
        url: sender.shown().to_string(),
        ..Delivered::default()
    };
    for (i, a) in pending.iter().enumerate() {
        let body = payload(a, environment);
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(delivery.retry_delay)
            .with_max_delay(crate::webhook::MAX_RETRY_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(delivery.attempts.saturating_sub(1) as usize)
            .build();
        let mut posted = Posted {
            id: a.id,
            webhook_id: a.webhook_id.clone(),
            portal_id: a.portal_id,
            month_year: a.month_year.clone(),
            threshold_percent: a.threshold_percent,
            delivered: false,
            attempts: 0,
            attempts_total: a.attempts,
            error: None,
        };
        loop {
            posted.attempts += 1;
            posted.attempts_total += 1;
            let result = sender.send(&a.webhook_id, &body).await;
            match &result {
                Ok(status) => {
                    tracing::info!(alert = a.id, status, "alert delivered");
                    crate::failpoint::hit("posted");
                    alerts::note_attempt(client, a.id, true, None).await?;
                    posted.delivered = true;
                    posted.error = None;
                    break;
                }
                Err(e) => {
                    let line = e.to_string();
                    tracing::warn!(
                        alert = a.id,
                        attempt = posted.attempts,
                        "alert not delivered: {line}"
                    );
                    alerts::note_attempt(client, a.id, false, Some(&line)).await?;
                    posted.error = Some(line);
                }
            }
            if matches!(result, Err(AttemptFailed::Redirect { .. })) {
                // Asking again gets the same redirect: the URL is wrong.
                out.redirected = true;
                break;
            }
            match delays.next() {
                Some(wait) => {
                    // A receiver that said how long to wait (429, 503) is
                    // given at least that (capped as the backoff is).
                    let wait = match &result {
                        Err(AttemptFailed::Status {
                            retry_after: Some(asked),
                            ..
                        }) => wait.max(*asked),
                        _ => wait,
                    };
                    tokio::time::sleep(wait).await
                }
                None => break,
            }
        }
        let delivered = posted.delivered;
        out.posted.push(posted);
        if !delivered {
            out.left = pending.len() - i;
            break;
        }
    }
    Ok(out)
}

/// `alerts deliver`'s report.
#[derive(Debug, Serialize)]
struct DeliverReport {
    #[serde(flatten)]
    delivered: Delivered,
}

impl Report for DeliverReport {
    fn outcome(&self) -> &str {
        match self.delivered.status() {
            Status::Ok => "ok",
            Status::Config => "redirected",
            _ => "undelivered",
        }
    }

    fn status(&self) -> Status {
        self.delivered.status()
    }

    fn render(&self, _: Style) -> String {
        self.delivered.render()
    }
}

async fn deliver(args: AlertsDeliverArgs) -> Status {
    let printer = Printer::new("alerts deliver", &args.output);
    // The webhook's settings first: a bad one is refused before any request.
    let hook = match webhook(&args.connection) {
        Ok(h) => h,
        Err(e) => return printer.fail(&e, None),
    };
    let (config, client): (Config, Client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    match deliver_all(&client, &hook, &args.delivery, config.environment.upper()).await {
        Ok(d) => printer.report(&DeliverReport { delivered: d }),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}
