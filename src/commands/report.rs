//! `usage-agg report`: the dashboard's view from a terminal, read from
//! portal_usage_monthly (what billing reads), not recomputed, with the
//! adjustments booked in each month and the billed total (the monthly row
//! plus those adjustments: docs/semantics.md, "Closed months"). One
//! portal's months are every month of a window (zeros included), drawn as
//! bars of successes and errors beside their numbers (`charts.rs`);
//! `--html` writes the dashboard's pictures to one file
//! (`html_report.rs`, docs/dashboard.md).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::json;

use super::connect;
use crate::aggregation::{Key, Month, Totals};
use crate::charts::BarStyle;
use crate::cli::{ReportArgs, ReportFormat};
use crate::config::Config;
use crate::exit::Status;
use crate::output::Style;
use crate::periods::Refusal;
use crate::postgrest::Client;
use crate::printer::{Printer, Report};
use crate::store::rest::RestStore;
use crate::store::{Store, StoredFilter};
use crate::text_table::{Align, Table as TextTable, Width};

/// One row of the report.
#[derive(Debug, Clone)]
struct Line {
    portal_id: i64,
    month_year: String,
    request_count: Option<i64>,
    success_count: Option<i64>,
    error_count: Option<i64>,
    /// Requests booked in this month as adjustments: late rows of closed
    /// months, and manual corrections.
    late: i64,
    manual: i64,
    /// What the month's invoice counts: its monthly row plus what is
    /// booked in it. Summed with checked arithmetic as the adjustments are
    /// read: an overflow is refused, never shown wrapped.
    billed: i64,
    /// The monthly limit of the portal's quota (its own, else the default
    /// plan's; docs/quotas.md), when one applies.
    quota_limit: Option<i64>,
    /// The month's own rows counted after its close (its late adjustments,
    /// whatever month they are booked in): part of its usage, as the
    /// quotas' crossings count it (docs/quotas.md).
    late_usage: i64,
}

impl From<&(Key, Totals)> for Line {
    fn from((key, t): &(Key, Totals)) -> Line {
        Line {
            portal_id: key.portal_id,
            month_year: key.month.to_string(),
            request_count: Some(t.requests),
            success_count: Some(t.successes),
            error_count: Some(t.errors),
            late: 0,
            manual: 0,
            billed: t.requests,
            quota_limit: None,
            late_usage: 0,
        }
    }
}

impl Line {
    /// Adds an adjustment booked in this line's month.
    fn book(&mut self, b: &crate::adjustments::Booked) -> anyhow::Result<()> {
        let what = || {
            format!(
                "portal {}'s adjustments booked in {} and its usage of that month",
                b.portal_id, b.booked_month
            )
        };
        let n = b.request_count;
        if b.source == "manual" {
            self.manual = crate::periods::add_counts(self.manual, n, what)?;
        } else {
            self.late = crate::periods::add_counts(self.late, n, what)?;
        }
        self.billed = crate::periods::add_counts(self.billed, n, what)?;
        Ok(())
    }

    /// The month's usage as the quotas count it: its monthly row plus its
    /// late adjustments (docs/quotas.md; `usage_current`).
    fn quota_used(&self) -> i64 {
        self.request_count
            .unwrap_or(0)
            .saturating_add(self.late_usage)
    }

    /// The month's usage against the quota, in percent.
    fn quota_percent(&self) -> Option<f64> {
        self.quota_limit
            .map(|l| self.quota_used() as f64 * 100.0 / l as f64)
    }

    fn rate(&self) -> Option<f64> {
        let r = self.request_count.unwrap_or(0);
        (r > 0).then(|| self.success_count.unwrap_or(0) as f64 * 100.0 / r as f64)
    }
}

/// Rows a page when reading one portal's months (a portal has a few dozen).
const PAGE: usize = 1000;
const BAR_WIDTH: usize = 30;

pub async fn run(args: ReportArgs) -> Status {
    let printer = Printer::new("report", &args.output).json_if(args.format == ReportFormat::Json);
    if let Some(path) = &args.html {
        // Refused before anything is read: the HTML page of one portal is
        // the app's (usage_portal_summary: the months up to now), and a
        // file is replaced only when asked.
        if args.portal.is_some() && args.month.is_some() {
            return printer.fail(
                &Refusal(
                    "with --html, a portal's page shows the months up to the current one, as the app's \
                     usage_portal_summary does: leave out --month (the terminal's `report --portal` takes it)"
                        .into(),
                )
                .into(),
                None,
            );
        }
        if !args.force && path.symlink_metadata().is_ok() {
            return printer.fail(&exists(path).into(), None);
        }
    }
    let (config, client) = match connect(&args.connection) {
        Ok(c) => c,
        Err(e) => return printer.fail(&e, None),
    };
    let printer = printer.against(&config);
    if let Some(path) = &args.html {
        return match html(&args, path, &config, &client).await {
            Ok(written) => printer.report(&written),
            Err(e) => printer.fail(&e, Some(&config)),
        };
    }
    let fetched = if args.live {
        live(&RestStore::new(client.clone()), &args).await
    } else {
        adjusted(&RestStore::new(client.clone()), &args).await
    };
    let fetched = match fetched {
        Ok(mut table) => with_quotas(&client, &mut table.lines, !args.live)
            .await
            .map(|()| table),
        Err(e) => Err(e),
    };
    match fetched {
        Ok(table) => printer.report(&Reported {
            format: args.format,
            env: config.environment.upper(),
            table,
        }),
        Err(e) => printer.fail(&e, Some(&config)),
    }
}

/// The report's rows with the adjustments booked in each, and its title.
async fn adjusted(store: &RestStore, args: &ReportArgs) -> anyhow::Result<Table> {
    let (mut table, month) = fetch(store, args).await?;
    let lines = std::mem::take(&mut table.lines);
    table.lines = with_adjustments(store, args, month, lines).await?;
    if let Some(m) = month {
        table.title = month_title(table.title == "All", args.top, m, table.lines.len());
        if !table.title.starts_with("All") {
            table.lines.truncate(usize::from(args.top));
        }
    }
    Ok(table)
}

/// The database's current month (UTC); the local clock's where the
/// migrations that tell it are not applied (`report` reads the tables
/// without them).
async fn this_month(client: &Client) -> anyhow::Result<Month> {
    match crate::ledger::current_month(client).await {
        Err(e)
            if crate::postgrest::kind_of(&e) == Some(crate::postgrest::Kind::MissingFunction) =>
        {
            let now = chrono::Utc::now().format("%Y-%m").to_string();
            Ok(Month::parse(&now).expect("the clock's month is YYYY-MM"))
        }
        other => other,
    }
}

fn exists(path: &Path) -> Refusal {
    Refusal(format!(
        "{} exists: the HTML report replaces a file only with --force (or name another file)",
        path.display()
    ))
}

/// What a report shows: its title, what labels its rows, the rows, and a
/// note under them.
struct Table {
    title: String,
    label: Label,
    lines: Vec<Line>,
    note: Option<String>,
}

/// `--live`: one row, the portal's current month right now
/// (`usage_current`).
async fn live(store: &RestStore, args: &ReportArgs) -> anyhow::Result<Table> {
    let portal = args.portal.unwrap_or_default();
    let month = crate::ledger::current_month(store.client()).await?;
    let c = crate::ledger::usage_current(store.client(), portal, month).await?;
    Ok(Table {
        title: format!(
            "Portal {portal}, {month} right now (stored totals, late adjustments, rows not yet counted)"
        ),
        label: Label::Month,
        lines: vec![Line {
            portal_id: portal,
            month_year: month.to_string(),
            request_count: Some(c.request_count),
            success_count: Some(c.success_count),
            error_count: Some(c.error_count),
            late: 0,
            manual: 0,
            billed: c.request_count,
            quota_limit: None,
            late_usage: 0,
        }],
        note: None,
    })
}

/// Gives each line its portal's quota (its own, else the default plan's):
/// none without the quotas migration or a quota. With `late`, also each
/// line's late adjustments of its own month, which its usage of the quota
/// counts (`--live` reads `usage_current`, which has them already).
async fn with_quotas(
    client: &crate::postgrest::Client,
    lines: &mut [Line],
    late: bool,
) -> anyhow::Result<()> {
    let quotas = match crate::alerts::quotas(client, None).await {
        Ok(q) => q,
        Err(e) if crate::postgrest::kind_of(&e) == Some(crate::postgrest::Kind::MissingTable) => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    let default = quotas
        .iter()
        .find(|q| q.portal_id.is_none())
        .map(|q| q.monthly_request_limit);
    let own: std::collections::HashMap<i64, i64> = quotas
        .iter()
        .filter_map(|q| q.portal_id.map(|p| (p, q.monthly_request_limit)))
        .collect();
    for l in lines.iter_mut() {
        l.quota_limit = own.get(&l.portal_id).copied().or(default);
    }
    if !late || lines.iter().all(|l| l.quota_limit.is_none()) {
        return Ok(());
    }
    // The lines' usage months' late adjustments: one portal's window, or
    // one month's portals.
    let months: std::collections::BTreeSet<&str> =
        lines.iter().map(|l| l.month_year.as_str()).collect();
    let portals: std::collections::BTreeSet<i64> = lines.iter().map(|l| l.portal_id).collect();
    let mut filters: crate::postgrest::Query = vec![
        ("source".into(), "eq.late".into()),
        (
            "month_year".into(),
            format!("in.({})", months.into_iter().collect::<Vec<_>>().join(",")),
        ),
    ];
    if let [p] = portals.into_iter().collect::<Vec<_>>()[..] {
        filters.push(("portal_id".into(), format!("eq.{p}")));
    }
    let late = crate::adjustments::read_booked_where(client, &filters, PAGE).await?;
    for l in lines.iter_mut() {
        for a in late
            .iter()
            .filter(|a| a.portal_id == l.portal_id && a.month_year == l.month_year)
        {
            l.late_usage = l.late_usage.saturating_add(a.request_count);
        }
    }
    Ok(())
}

/// Adds to each line the adjustments booked in its month (a portal's
/// months, every one of the window a line already; or, for the top list,
/// each portal's in that month).
async fn with_adjustments(
    store: &RestStore,
    args: &ReportArgs,
    month: Option<Month>,
    mut lines: Vec<Line>,
) -> anyhow::Result<Vec<Line>> {
    let filters: crate::postgrest::Query = match (args.portal, month, lines.first()) {
        (Some(p), _, Some(_)) => {
            let months: Vec<&str> = lines.iter().map(|l| l.month_year.as_str()).collect();
            vec![
                ("portal_id".into(), format!("eq.{p}")),
                ("booked_month".into(), format!("in.({})", months.join(","))),
            ]
        }
        (None, Some(m), _) => vec![("booked_month".into(), format!("eq.{m}"))],
        _ => return Ok(lines),
    };
    let booked = crate::adjustments::read_booked_where(store.client(), &filters, PAGE).await?;
    for b in booked {
        let at = lines.iter().position(|l| match args.portal {
            Some(_) => l.month_year == b.booked_month,
            None => l.portal_id == b.portal_id,
        });
        // A portal's month, or a portal of the month, billed only through
        // adjustments gets a line of its own: its invoice has them (before,
        // the top list left such a portal out, and the month's total with
        // it; found by an adversarial pass).
        // (A portal's window has a line for every month already.)
        let line = match at {
            Some(i) => &mut lines[i],
            None if args.portal.is_some() => continue,
            None => {
                lines.push(Line {
                    portal_id: b.portal_id,
                    month_year: b.booked_month.clone(),
                    request_count: Some(0),
                    success_count: Some(0),
                    error_count: Some(0),
                    late: 0,
                    manual: 0,
                    billed: 0,
                    quota_limit: None,
                    late_usage: 0,
                });
                lines.last_mut().expect("just pushed")
            }
        };
        line.book(&b)?;
    }
    if args.portal.is_none() {
        lines.sort_by(|a, b| {
            (b.request_count.unwrap_or(0), b.billed).cmp(&(a.request_count.unwrap_or(0), a.billed))
        });
    }
    Ok(lines)
}

/// The rows: one portal's window of months (newest first, every month),
/// or the top portals of a month (and that month, for its title and its
/// adjustments).
async fn fetch(store: &RestStore, args: &ReportArgs) -> anyhow::Result<(Table, Option<Month>)> {
    if let Some(portal) = args.portal {
        let now = this_month(store.client()).await?;
        let last = args.month.unwrap_or(now);
        let window = crate::periods::window(last, args.months);
        let rows = store
            .stored(StoredFilter::Portal(portal), false, PAGE)
            .await?;
        let lines = window
            .iter()
            .rev()
            .map(|m| {
                let key = Key {
                    portal_id: portal,
                    month: *m,
                };
                Line::from(&(key, rows.get(&key).copied().unwrap_or_default()))
            })
            .collect();
        let first = window.first().copied().unwrap_or(last);
        return Ok((
            Table {
                title: if first == last {
                    format!("Portal {portal}, {last}")
                } else {
                    format!(
                        "Portal {portal}, {first} to {last} ({} months)",
                        window.len()
                    )
                },
                label: Label::Month,
                lines,
                // Read from the monthly rows, the current month is as the last
                // run left it.
                note: window.contains(&now).then(|| {
                    format!("{now} is the month so far, as of the last run (`--live`: right now)")
                }),
            },
            None,
        ));
    }
    let month = match args.month {
        Some(m) => m,
        None => match store.newest_month().await? {
            Some(m) => m,
            None => {
                return Ok((
                    Table {
                        title: "No usage recorded yet".into(),
                        label: Label::Portal,
                        lines: Vec::new(),
                        note: None,
                    },
                    None,
                ))
            }
        },
    };
    let rows = store.top_of_month(month, usize::from(args.top)).await?;
    // Whether every portal with requests is here: the title says "All"
    // then, once the portals billed only through adjustments are added
    // (`adjusted` writes it).
    let all = rows.len() < usize::from(args.top);
    Ok((
        Table {
            title: if all { "All" } else { "Top" }.to_string(),
            label: Label::Portal,
            lines: rows.iter().map(Line::from).collect(),
            note: None,
        },
        Some(month),
    ))
}

/// The top list's title, once its lines are final.
fn month_title(all: bool, top: u16, month: Month, lines: usize) -> String {
    if all && lines <= usize::from(top) {
        // "Top 10" of 5 portals reads as if 5 were missing.
        format!(
            "All {} by requests, {month}",
            crate::output::count(lines as u64, "portal", "portals")
        )
    } else {
        format!(
            "Top {} by requests, {month}",
            crate::output::count(u64::from(top), "portal", "portals")
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Month,
    Portal,
}

/// The rows as the JSON shows them.
fn rows_json(lines: &[Line]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .map(|l| {
            let mut v = json!({
                "portal_id": l.portal_id, "month": l.month_year,
                "requests": l.request_count.unwrap_or(0), "successes": l.success_count.unwrap_or(0),
                "errors": l.error_count.unwrap_or(0),
                "success_rate": l.rate().map(|r| (r * 10.0).round() / 10.0),
                "adjustments": {"late": l.late, "manual": l.manual},
                "billed": l.billed,
            });
            if let (Some(limit), Some(o)) = (l.quota_limit, v.as_object_mut()) {
                o.insert("quota_limit".into(), json!(limit));
                o.insert("quota_used".into(), json!(l.quota_used()));
                o.insert(
                    "quota_percent".into(),
                    json!(l.quota_percent().map(|p| (p * 10.0).round() / 10.0)),
                );
            }
            v
        })
        .collect()
}

/// A report's table, read, in the format asked for.
struct Reported {
    format: ReportFormat,
    env: &'static str,
    table: Table,
}

impl serde::Serialize for Reported {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        json!({"title": self.table.title, "rows": rows_json(&self.table.lines)}).serialize(s)
    }
}

impl Report for Reported {
    fn outcome(&self) -> &str {
        "ok"
    }

    fn render(&self, style: Style) -> String {
        render(self.format, style, self.env, &self.table)
    }
}

fn render(format: ReportFormat, style: Style, env: &str, table: &Table) -> String {
    let Table {
        title,
        label,
        lines,
        note,
    } = table;
    let label = *label;
    let mut s = String::new();
    match format {
        ReportFormat::Json => {
            let _ = writeln!(
                s,
                "{}",
                json!({
                    "version": 1, "command": "report", "environment": env, "exit_status": 0,
                    "outcome": "ok", "title": title, "rows": rows_json(lines), "error": null,
                })
            );
        }
        ReportFormat::Csv => {
            let _ = writeln!(
                s,
                "portal_id,month,requests,successes,errors,success_rate,late_adjustments,manual_adjustments,billed"
            );
            for l in lines {
                let _ = writeln!(
                    s,
                    "{},{},{},{},{},{},{},{},{}",
                    l.portal_id,
                    l.month_year,
                    l.request_count.unwrap_or(0),
                    l.success_count.unwrap_or(0),
                    l.error_count.unwrap_or(0),
                    l.rate().map_or(String::new(), |r| format!("{r:.1}")),
                    l.late,
                    l.manual,
                    l.billed
                );
            }
        }
        ReportFormat::Table => {
            let _ = writeln!(s, "{title}");
            if lines.is_empty() {
                let _ = writeln!(s, "  (no rows)");
                return s;
            }
            let max = lines
                .iter()
                .map(|l| l.request_count.unwrap_or(0))
                .max()
                .unwrap_or(0)
                .max(1);
            let bars = BarStyle::new(style.unicode, style.color);
            let head = if label == Label::Month {
                "month"
            } else {
                "portal"
            };
            // The adjustment columns only where something is adjusted; CSV
            // and JSON always carry them. The quota column only where a
            // quota applies.
            let adjusted = lines.iter().any(|l| l.late != 0 || l.manual != 0);
            let quotas = lines.iter().any(|l| l.quota_limit.is_some());
            // Each number's heading and least width; the bars' column last,
            // headed by what their characters mean.
            let mut columns = vec![
                (head, 10),
                ("requests", 10),
                ("successes", 10),
                ("errors", 8),
            ];
            if adjusted {
                columns.extend([("late", 8), ("manual", 8), ("billed", 10)]);
            }
            if quotas {
                columns.push(("of quota", 16));
            }
            columns.push(("success", 7));
            let mut t = columns
                .iter()
                .fold(TextTable::new("  ", "  "), |t, (_, n)| {
                    t.column(Align::Right, Width::AtLeast(*n))
                })
                .column(Align::Left, Width::Fit);
            t.row(
                columns
                    .iter()
                    .map(|(h, _)| h.to_string())
                    .chain([crate::charts::legend(bars)]),
            );
            for l in lines {
                let key = if label == Label::Month {
                    l.month_year.clone()
                } else {
                    l.portal_id.to_string()
                };
                let mut row = vec![
                    key,
                    l.request_count.unwrap_or(0).to_string(),
                    l.success_count.unwrap_or(0).to_string(),
                    l.error_count.unwrap_or(0).to_string(),
                ];
                if adjusted {
                    row.extend([
                        format!("{:+}", l.late),
                        format!("{:+}", l.manual),
                        l.billed.to_string(),
                    ]);
                }
                if quotas {
                    row.push(match (l.quota_percent(), l.quota_limit) {
                        (Some(p), Some(limit)) => {
                            format!("{p:.1}% of {}", super::quota::grouped(limit))
                        }
                        _ => "-".into(),
                    });
                }
                // No bar and no rate leave no spaces (the table trims them).
                row.extend([
                    l.rate().map_or("-".into(), |r| format!("{r:.1}%")),
                    crate::charts::bar(
                        l.success_count.unwrap_or(0),
                        l.error_count.unwrap_or(0),
                        max,
                        BAR_WIDTH,
                        bars,
                    ),
                ]);
                t.row(row);
            }
            s.push_str(&t.render());
            if quotas {
                let _ = writeln!(
                    s,
                    "  of quota = the month's usage (its requests, and its own rows counted after its close) \
                     against the portal's monthly limit (its own, else the default plan's; `usage-agg quota show \
                     --portal P` for right now)"
                );
            }
            if adjusted {
                let _ = writeln!(
                    s,
                    "  billed = requests + adjustments booked in that month (late: rows of closed months counted \
                     after their close; manual: corrections)"
                );
            }
            if let Some(note) = note {
                let _ = writeln!(s, "  {note}");
            }
        }
    }
    s
}

/// `--html`: the page of one portal (`usage_portal_summary`, what the
/// app's usage page reads) or of every portal, written atomically.
async fn html(
    args: &ReportArgs,
    path: &Path,
    config: &Config,
    client: &Client,
) -> anyhow::Result<Written> {
    let meta = crate::html_report::Meta {
        environment: config.environment.upper().to_string(),
        as_of: chrono::Utc::now()
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
        version: env!("CARGO_PKG_VERSION"),
    };
    let (page, view, portal, months) = if let Some(portal) = args.portal {
        let summary = crate::dashboard::portal_summary(client, portal, args.months).await?;
        let months: Vec<String> = summary.months.iter().map(|m| m.month.clone()).collect();
        (
            crate::html_report::portal_page(&summary, &meta),
            "portal",
            Some(portal),
            months,
        )
    } else {
        let store = RestStore::new(client.clone());
        let last = match args.month {
            Some(m) => m,
            None => match store.newest_month().await? {
                Some(m) => m,
                None => this_month(client).await?,
            },
        };
        let window = crate::periods::window(last, args.months);
        let overview =
            crate::dashboard::overview(client, &window, usize::from(args.top), PAGE).await?;
        (
            crate::html_report::overview_page(&overview, &meta),
            "all_portals",
            None,
            window.iter().map(ToString::to_string).collect(),
        )
    };
    let existing = if args.force {
        crate::stdio::Existing::Replace
    } else {
        crate::stdio::Existing::Keep
    };
    crate::stdio::write_file_atomically(path, &page.html, existing).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists(path)
        } else {
            Refusal(format!(
                "could not write the HTML report to {}: {e} (name a file in a directory you can write)",
                path.display()
            ))
        }
    })?;
    Ok(Written {
        file: path.display().to_string(),
        view,
        portal_id: portal,
        from: months.first().cloned().unwrap_or_default(),
        to: months.last().cloned().unwrap_or_default(),
        title: page.title,
        charts: page.charts,
        bytes: page.html.len(),
    })
}

/// What `--html` wrote.
#[derive(serde::Serialize)]
struct Written {
    file: String,
    /// `portal` or `all_portals`.
    view: &'static str,
    portal_id: Option<i64>,
    from: String,
    to: String,
    title: String,
    charts: Vec<&'static str>,
    bytes: usize,
}

impl Report for Written {
    fn outcome(&self) -> &str {
        "ok"
    }

    fn render(&self, _style: Style) -> String {
        format!(
            "Wrote {}: {} ({} charts, each with its table; {} kB, viewed without any network)\n",
            self.file,
            self.title,
            self.charts.len(),
            self.bytes.div_ceil(1024)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(month: &str, r: i64, ok: i64) -> Line {
        Line {
            portal_id: 42,
            month_year: month.into(),
            request_count: Some(r),
            success_count: Some(ok),
            error_count: Some(r - ok),
            late: 0,
            manual: 0,
            billed: r,
            quota_limit: None,
            late_usage: 0,
        }
    }

    fn table(lines: &[Line]) -> Table {
        Table {
            title: "Portal 42".into(),
            label: Label::Month,
            lines: lines.to_vec(),
            note: None,
        }
    }

    #[test]
    fn table_bars_scale_to_the_busiest_row_split_into_successes_and_errors() {
        let lines = [
            line("2025-07", 200, 190),
            line("2025-06", 100, 100),
            line("2025-05", 0, 0),
        ];
        let out = render(ReportFormat::Table, Style::plain(), "DEV", &table(&lines));
        let rows: Vec<&str> = out.lines().collect();
        assert!(rows[1].ends_with("success  # successes  x errors"), "{out}");
        assert!(
            rows[2].contains("95.0%") && rows[2].ends_with(&format!("{}{}", "#".repeat(28), "xx")),
            "{out}"
        );
        assert!(
            rows[3].contains("100.0%") && rows[3].ends_with(&format!(" {}", "#".repeat(15))),
            "{out}"
        );
        assert!(rows[4].trim_end().ends_with('-'), "{out}");
        // UTF-8 blocks where the terminal reads them.
        let style = Style {
            unicode: true,
            ..Style::plain()
        };
        let out = render(ReportFormat::Table, style, "DEV", &table(&lines));
        assert!(
            out.contains(&format!("{}{}", "█".repeat(28), "░░")),
            "{out}"
        );
        assert!(out.contains("█ successes  ░ errors"), "{out}");
    }

    #[test]
    fn csv_and_json_carry_the_same_numbers_and_no_bars() {
        let lines = [line("2025-07", 200, 190)];
        let csv = render(ReportFormat::Csv, Style::plain(), "DEV", &table(&lines));
        assert_eq!(
            csv.lines().nth(1),
            Some("42,2025-07,200,190,10,95.0,0,0,200")
        );
        let text = render(ReportFormat::Json, Style::plain(), "DEV", &table(&lines));
        assert!(!text.contains('#') && !text.contains('█'), "{text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["rows"][0]["errors"], 10);
        for field in [
            "version",
            "command",
            "environment",
            "exit_status",
            "outcome",
        ] {
            assert!(json.get(field).is_some(), "{field}");
        }
        assert_eq!(json["rows"][0]["success_rate"], 95.0);
    }
}
