//! `usage-agg quota set --portal P|--default --limit N [--thresholds 80,100]`
//! and `usage-agg quota show [--portal P [--month M]]` (docs/quotas.md): a
//! portal's monthly allowance, or the default plan's, and the thresholds of
//! it that fire an alert. The database checks the input again for any
//! client (`usage_agg_set_quota`) and refuses a portal it has never seen.

use std::fmt::Write as _;

use serde::Serialize;

use super::connect;
use crate::alerts::{self, PreviousQuota, Quota, QuotaStatus};
use crate::cli::{QuotaAction, QuotaArgs, QuotaSetArgs, QuotaShowArgs};
use crate::exit::Status;
use crate::output::{human_time, Style};
use crate::printer::{Printer, Report};
use crate::quota::{threshold_count, QuotaRefused};
use crate::text_table::{Align, Table, Width};

pub async fn run(args: QuotaArgs) -> Status {
    match args.action {
        QuotaAction::Set(a) => set(a).await,
        QuotaAction::Show(a) => show(a).await,
    }
}

/// A number as a person reads it: 1,234,567.
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// "80% (800), 100% (1,000)": each threshold with the count that reaches it.
pub fn thresholds_text(limit: i64, thresholds: &[i64]) -> String {
    thresholds
        .iter()
        .map(|&t| {
            format!(
                "{t}% ({})",
                grouped(threshold_count(limit, u32::try_from(t).unwrap_or(0)))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn whose(portal: Option<i64>) -> String {
    portal.map_or_else(|| "the default plan".into(), |p| format!("portal {p}"))
}

/// What `quota set` did.
#[derive(Debug, Serialize)]
struct Set {
    quota: Quota,
    previous: Option<PreviousQuota>,
    /// Thresholds already reached by counted usage, recorded with it.
    alerts: Vec<alerts::Crossing>,
}

impl Report for Set {
    fn outcome(&self) -> &str {
        "set"
    }

    fn render(&self, _: Style) -> String {
        let q = &self.quota;
        let mut s = format!(
            "Set the quota of {}: {} requests a month; alerts at {}\n",
            whose(q.portal_id),
            grouped(q.monthly_request_limit),
            thresholds_text(q.monthly_request_limit, &q.thresholds_percent)
        );
        match &self.previous {
            Some(p) => {
                let _ = writeln!(
                    s,
                    "  was {} requests a month, alerts at {} (set {}{})",
                    grouped(p.monthly_request_limit),
                    p.thresholds_percent
                        .iter()
                        .map(|t| format!("{t}%"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    p.updated_at.as_deref().map_or("?".into(), human_time),
                    p.updated_by
                        .as_deref()
                        .map_or(String::new(), |b| format!(" by {b}"))
                );
            }
            None => s.push_str("  it had none before\n"),
        }
        if self.alerts.is_empty() {
            s.push_str(
                "  No open month has reached a threshold of it yet; each fires, once, with the booking that \
                 reaches it\n",
            );
        } else {
            let _ = writeln!(
                s,
                "  {} already reached by counted usage, recorded as alerts now:",
                crate::output::count(self.alerts.len() as u64, "threshold", "thresholds")
            );
            for a in self.alerts.iter().take(crate::output::TABLE_CAP) {
                let _ = writeln!(
                    s,
                    "    portal {} {}: {}% of {} ({} counted)",
                    a.portal_id,
                    a.month_year,
                    a.threshold_percent,
                    grouped(a.request_limit),
                    grouped(a.request_count)
                );
            }
            if self.alerts.len() > crate::output::TABLE_CAP {
                let _ = writeln!(
                    s,
                    "    ... and {} more (see --json)",
                    self.alerts.len() - crate::output::TABLE_CAP
                );
            }
        }
        s
    }
}

async fn set(args: QuotaSetArgs) -> Status {
    let printer = Printer::new("quota set", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let portal = if args.default { None } else { args.portal };
    let result = async {
        let a = alerts::set_quota(
            &client,
            portal,
            args.limit,
            &args.thresholds.0,
            &crate::periods::who(),
            args.new_portal,
        )
        .await?;
        if let Some(r) = &a.refused {
            return Err(QuotaRefused::from_code(r, portal).into());
        }
        let quota = a
            .quota
            .ok_or_else(|| anyhow::anyhow!("usage_agg_set_quota answered no quota"))?;
        Ok(Set {
            quota,
            previous: a.previous,
            alerts: a.alerts,
        })
    }
    .await;
    match result {
        Ok(r) => printer.report(&r),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

/// What `quota show` found: every quota, or one portal's month.
#[derive(Debug, Serialize)]
struct Shown {
    quotas: Vec<Quota>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<QuotaStatus>,
}

impl Report for Shown {
    fn outcome(&self) -> &str {
        "ok"
    }

    fn render(&self, _: Style) -> String {
        let mut s = String::new();
        if let Some(st) = &self.status {
            let source = match st.quota.as_str() {
                "portal" => "its own quota",
                "default" => "the default plan",
                _ => "no quota",
            };
            let _ = writeln!(s, "Portal {}, {} ({source})", st.portal_id, st.month_year);
            match st.request_limit {
                Some(limit) => {
                    let _ = writeln!(
                        s,
                        "  used       {} of {} requests ({:.1}%), right now",
                        grouped(st.used),
                        grouped(limit),
                        st.percent.unwrap_or(0.0)
                    );
                    let _ = writeln!(
                        s,
                        "  projected  {} by the month's end ({:.1}%), in a straight line",
                        grouped(st.projected),
                        st.projected_percent.unwrap_or(0.0)
                    );
                    let thresholds = st.thresholds_percent.clone().unwrap_or_default();
                    let fired: Vec<String> =
                        st.alerted_percent.iter().map(|t| format!("{t}%")).collect();
                    let next = thresholds
                        .iter()
                        .find(|t| !st.alerted_percent.contains(t))
                        .map(|&t| {
                            format!(
                                "next at {t}% ({} requests)",
                                grouped(threshold_count(limit, u32::try_from(t).unwrap_or(0)))
                            )
                        });
                    let _ = writeln!(
                        s,
                        "  alerts     {}{}",
                        if fired.is_empty() {
                            "none fired yet".to_string()
                        } else {
                            format!("{} fired", fired.join(", "))
                        },
                        next.map_or(String::new(), |n| format!("; {n}"))
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "  used       {} requests, right now; no limit, so no alert fires \
                         (`usage-agg quota set --portal {} --limit N`, or --default)",
                        grouped(st.used),
                        st.portal_id
                    );
                }
            }
            return s;
        }
        if self.quotas.is_empty() {
            return "No quotas: no alert fires. Set the default plan's with `usage-agg quota set --default \
                    --limit N`, a portal's with --portal P\n"
                .into();
        }
        let mut t = Table::new("", "  ")
            .column(Align::Left, Width::AtLeast(10))
            .column(Align::Right, Width::Fit)
            .column(Align::Left, Width::AtLeast(24))
            .column(Align::Left, Width::Fit);
        t.row(["PORTAL", "LIMIT/MONTH", "ALERTS AT", "UPDATED"]);
        for q in &self.quotas {
            t.row([
                q.portal_id.map_or("default".into(), |p| p.to_string()),
                grouped(q.monthly_request_limit),
                q.thresholds_percent
                    .iter()
                    .map(|t| format!("{t}%"))
                    .collect::<Vec<_>>()
                    .join(", "),
                q.updated_at.as_deref().map_or("?".into(), human_time)
                    + &q.updated_by
                        .as_deref()
                        .map_or(String::new(), |b| format!(" by {b}")),
            ]);
        }
        s.push_str(&t.render());
        if !self.quotas.iter().any(|q| q.portal_id.is_none()) {
            s.push_str("No default plan: portals without a quota of their own fire no alert\n");
        }
        s
    }
}

async fn show(args: QuotaShowArgs) -> Status {
    let printer = Printer::new("quota show", &args.output);
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    let result = async {
        let quotas = alerts::quotas(&client, args.portal).await?;
        let status = match args.portal {
            Some(p) => Some(alerts::quota_status(&client, p, args.month).await?),
            None => None,
        };
        anyhow::Ok(Shown { quotas, status })
    }
    .await;
    match result {
        Ok(r) => printer.report(&r),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}
