//! `report --html`: one self-contained HTML file, the dashboard's pictures
//! for a person. No script, no font, no image, nothing fetched: inline SVG
//! and inline CSS, with a Content-Security-Policy that forbids the rest.
//! Each chart has a title, axis titles and labels, and a table of its
//! numbers beneath it, so the page reads without the picture and with a
//! screen reader; a light and a dark colour scheme follow the reader's
//! setting. Pure: it renders what `dashboard.rs` read; `report` writes the
//! file. Every bar's length is its value on an axis from zero
//! (`charts::Axis`), which the browser test measures.

use std::fmt::Write as _;

use crate::charts::{compact, grouped, Axis};
use crate::dashboard::{Overview, PortalMonth, PortalSummary, Quota};

/// Who made the page, for its header.
#[derive(Debug, Clone)]
pub struct Meta {
    pub environment: String,
    /// When its numbers were read (UTC).
    pub as_of: String,
    pub version: &'static str,
}

/// A rendered page: its HTML, and the ids of its charts (`chart-<id>`,
/// `table-<id>`), in order.
#[derive(Debug, Clone)]
pub struct Page {
    pub title: String,
    pub charts: Vec<&'static str>,
    pub html: String,
}

/// One stacked series of a chart.
struct Series<'a> {
    name: &'a str,
    /// Its CSS class: ok, err, rate, used, proj.
    class: &'a str,
    values: Vec<Option<f64>>,
}

/// How a chart's values read on its axis.
#[derive(Clone, Copy, PartialEq)]
enum Unit {
    Count,
    Percent,
}

impl Unit {
    fn axis(self, max: f64) -> Axis {
        match self {
            Unit::Count => Axis::counts(max, 4),
            Unit::Percent => Axis::new(max, 4),
        }
    }

    fn tick(self, v: f64) -> String {
        match self {
            Unit::Count => compact(v),
            Unit::Percent => format!("{}%", compact(v)),
        }
    }

    fn value(self, v: f64) -> String {
        match self {
            Unit::Count => grouped(v.round() as i64),
            Unit::Percent => format!("{v:.2}%"),
        }
    }
}

/// A chart's words: its id, title, what it shows, and its axes' titles.
struct Frame<'a> {
    id: &'static str,
    title: &'a str,
    desc: &'a str,
    /// The categories' axis (months, portals) and the values' axis.
    category_title: &'a str,
    value_title: &'a str,
    unit: Unit,
}

/// A vertical line across a horizontal bar chart (a quota).
struct Marker {
    value: f64,
    label: String,
}

/// Text for HTML and SVG: `&`, `<`, `>`, quotes escaped.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A coordinate, to a thousandth of a pixel.
fn px(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn rate(part: i64, whole: i64) -> Option<f64> {
    (whole > 0).then(|| part as f64 * 100.0 / whole as f64)
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}%"))
}

/// The stripes that tell errors apart without colour.
fn hatch(id: &str) -> String {
    format!(
        "<defs><pattern id=\"hatch-{id}\" class=\"hatch\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
         patternTransform=\"rotate(45)\"><rect class=\"hatch-bg\" width=\"6\" height=\"6\"/>\
         <line class=\"hatch-line\" x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\"/></pattern></defs>"
    )
}

fn svg_open(f: &Frame, width: f64, height: f64) -> String {
    format!(
        "<svg class=\"chart\" id=\"chart-{id}\" xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" \
         aria-labelledby=\"svg-title-{id} svg-desc-{id}\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\">\
         <title id=\"svg-title-{id}\">{title}</title><desc id=\"svg-desc-{id}\">{desc}</desc>{hatch}",
        id = f.id,
        w = px(width),
        h = px(height),
        title = esc(f.title),
        desc = esc(f.desc),
        hatch = hatch(f.id),
    )
}

/// The fill of a series: errors striped.
fn fill(frame: &Frame, class: &str) -> String {
    if class == "err" {
        format!(" fill=\"url(#hatch-{})\"", frame.id)
    } else {
        String::new()
    }
}

/// Vertical stacked columns, one per category (months), the series stacked
/// from the axis up in order.
fn columns(frame: &Frame, categories: &[String], series: &[Series]) -> String {
    const LEFT: f64 = 72.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 16.0;
    const PLOT_H: f64 = 240.0;
    let n = categories.len().max(1);
    let rotate = n > 14;
    let band = if rotate { 24.0 } else { 56.0 };
    let plot_w = (n as f64 * band).max(600.0);
    let band = plot_w / n as f64;
    let bottom = if rotate { 96.0 } else { 56.0 };
    let width = LEFT + plot_w + RIGHT;
    let height = TOP + PLOT_H + bottom;
    let base = TOP + PLOT_H;
    let max = (0..categories.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values[i].unwrap_or(0.0).max(0.0))
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let axis = frame.unit.axis(max);
    let mut s = svg_open(frame, width, height);
    s.push_str("<g class=\"grid\">");
    for t in axis.ticks() {
        let y = base - axis.scale(t, PLOT_H);
        let _ = write!(
            s,
            "<line class=\"gridline\" x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\"/>\
             <text class=\"tick value\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            px(LEFT),
            px(LEFT + plot_w),
            px(LEFT - 8.0),
            px(y + 4.0),
            esc(&frame.unit.tick(t)),
            y = px(y),
        );
    }
    s.push_str("</g><g class=\"bars\">");
    let bar_w = band * 0.6;
    for (i, c) in categories.iter().enumerate() {
        let x = LEFT + band * i as f64 + (band - bar_w) / 2.0;
        let mut y = base;
        for se in series {
            let Some(v) = se.values[i] else {
                continue;
            };
            let h = axis.scale(v, PLOT_H);
            y -= h;
            let _ = write!(
                s,
                "<rect class=\"bar {class}\" data-category=\"{c}\" data-series=\"{name}\" data-value=\"{raw}\" \
                 x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\"{fill}><title>{c}: {text} {name}</title></rect>",
                class = se.class,
                c = esc(c),
                name = esc(se.name),
                raw = v,
                x = px(x),
                y = px(y),
                w = px(bar_w),
                h = px(h),
                fill = fill(frame, se.class),
                text = esc(&frame.unit.value(v)),
            );
        }
    }
    s.push_str("</g><g class=\"axis x\">");
    let _ = write!(
        s,
        "<line class=\"axis-line\" x1=\"{}\" y1=\"{b}\" x2=\"{}\" y2=\"{b}\"/>",
        px(LEFT),
        px(LEFT + plot_w),
        b = px(base)
    );
    for (i, c) in categories.iter().enumerate() {
        let x = LEFT + band * (i as f64 + 0.5);
        let y = base + 18.0;
        if rotate {
            let _ = write!(
                s,
                "<text class=\"tick category\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\" transform=\"rotate(-60 {x} {y})\">{}</text>",
                esc(c),
                x = px(x),
                y = px(y),
            );
        } else {
            let _ = write!(
                s,
                "<text class=\"tick category\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                px(x),
                px(y),
                esc(c)
            );
        }
    }
    let _ = write!(
        s,
        "</g><text class=\"axis-title category\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\
         <text class=\"axis-title value\" x=\"0\" y=\"0\" text-anchor=\"middle\" transform=\"translate(18 {}) rotate(-90)\">{}</text></svg>",
        px(LEFT + plot_w / 2.0),
        px(height - 10.0),
        esc(frame.category_title),
        px(base - PLOT_H / 2.0),
        esc(frame.value_title),
    );
    s
}

/// Horizontal stacked bars, one per category (portals, quantities), the
/// series stacked from the axis rightwards; an optional marker line.
fn bars(
    frame: &Frame,
    categories: &[String],
    series: &[Series],
    marker: Option<&Marker>,
) -> String {
    const LEFT: f64 = 168.0;
    const RIGHT: f64 = 32.0;
    const TOP: f64 = 28.0;
    const BAND: f64 = 32.0;
    const PLOT_W: f64 = 520.0;
    let n = categories.len().max(1);
    let plot_h = BAND * n as f64;
    let width = LEFT + PLOT_W + RIGHT;
    let height = TOP + plot_h + 56.0;
    let base = LEFT;
    let mut max = (0..categories.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values[i].unwrap_or(0.0).max(0.0))
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    if let Some(m) = marker {
        max = max.max(m.value);
    }
    let axis = frame.unit.axis(max);
    let mut s = svg_open(frame, width, height);
    s.push_str("<g class=\"grid\">");
    for t in axis.ticks() {
        let x = base + axis.scale(t, PLOT_W);
        let _ = write!(
            s,
            "<line class=\"gridline\" x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>\
             <text class=\"tick value\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(TOP),
            px(TOP + plot_h),
            px(TOP + plot_h + 18.0),
            esc(&frame.unit.tick(t)),
            x = px(x),
        );
    }
    s.push_str("</g><g class=\"bars\">");
    let bar_h = BAND * 0.6;
    for (i, c) in categories.iter().enumerate() {
        let y = TOP + BAND * i as f64 + (BAND - bar_h) / 2.0;
        let mut x = base;
        for se in series {
            let Some(v) = se.values[i] else {
                continue;
            };
            let w = axis.scale(v, PLOT_W);
            let _ = write!(
                s,
                "<rect class=\"bar {class}\" data-category=\"{c}\" data-series=\"{name}\" data-value=\"{raw}\" \
                 x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\"{fill}><title>{c}: {text} {name}</title></rect>",
                class = se.class,
                c = esc(c),
                name = esc(se.name),
                raw = v,
                x = px(x),
                y = px(y),
                w = px(w),
                h = px(bar_h),
                fill = fill(frame, se.class),
                text = esc(&frame.unit.value(v)),
            );
            x += w;
        }
    }
    s.push_str("</g><g class=\"axis y\">");
    let _ = write!(
        s,
        "<line class=\"axis-line\" x1=\"{b}\" y1=\"{}\" x2=\"{b}\" y2=\"{}\"/>",
        px(TOP),
        px(TOP + plot_h),
        b = px(base)
    );
    for (i, c) in categories.iter().enumerate() {
        let _ = write!(
            s,
            "<text class=\"tick category\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            px(base - 8.0),
            px(TOP + BAND * (i as f64 + 0.5) + 4.0),
            esc(c)
        );
    }
    s.push_str("</g>");
    if let Some(m) = marker {
        let x = base + axis.scale(m.value, PLOT_W);
        let _ = write!(
            s,
            "<g class=\"marker\" data-value=\"{}\"><line class=\"marker-line\" x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\"/>\
             <text class=\"marker-label\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text></g>",
            m.value,
            px(TOP - 6.0),
            px(TOP + plot_h),
            px(TOP - 10.0),
            esc(&m.label),
            x = px(x),
        );
    }
    let _ = write!(
        s,
        "<text class=\"axis-title value\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>\
         <text class=\"axis-title category\" x=\"0\" y=\"0\" text-anchor=\"middle\" transform=\"translate(16 {}) rotate(-90)\">{}</text></svg>",
        px(base + PLOT_W / 2.0),
        px(height - 10.0),
        esc(frame.value_title),
        px(TOP + plot_h / 2.0),
        esc(frame.category_title),
    );
    s
}

/// The legend under a chart: each series' swatch and name.
fn legend(frame: &Frame, series: &[Series], marker: Option<&Marker>) -> String {
    let mut s = String::from("<ul class=\"legend\">");
    for se in series {
        let _ = write!(
            s,
            "<li><svg class=\"swatch\" width=\"14\" height=\"14\" aria-hidden=\"true\"><rect class=\"bar {}\" width=\"14\" height=\"14\"{}/></svg>{}</li>",
            se.class,
            fill(frame, se.class),
            esc(se.name)
        );
    }
    if let Some(m) = marker {
        let _ = write!(
            s,
            "<li><svg class=\"swatch\" width=\"14\" height=\"14\" aria-hidden=\"true\"><line class=\"marker-line\" x1=\"7\" y1=\"0\" x2=\"7\" y2=\"14\"/></svg>{}</li>",
            esc(&m.label)
        );
    }
    s.push_str("</ul>");
    s
}

/// A table of a chart's numbers: a header row, then rows of cells; the
/// first cell of each row is its row header.
fn table(id: &str, caption: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        "<table id=\"table-{id}\" class=\"numbers\"><caption>{}</caption><thead><tr>",
        esc(caption)
    );
    for h in head {
        let _ = write!(s, "<th scope=\"col\">{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for (i, c) in r.iter().enumerate() {
            if i == 0 {
                let _ = write!(s, "<th scope=\"row\">{}</th>", esc(c));
            } else {
                let _ = write!(s, "<td>{}</td>", esc(c));
            }
        }
        s.push_str("</tr>");
    }
    if rows.is_empty() {
        let _ = write!(
            s,
            "<tr><td colspan=\"{}\">No rows.</td></tr>",
            head.len().max(1)
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// A chart's section: heading, figure (SVG and legend), notes, table.
fn section(frame: &Frame, svg: &str, legend: &str, note: &str, table: &str) -> String {
    format!(
        "<section class=\"panel\" id=\"section-{id}\" aria-labelledby=\"title-{id}\">\
         <h2 id=\"title-{id}\">{title}</h2><figure>{svg}<figcaption>{legend}<p>{desc}</p></figcaption></figure>\
         {note}{table}</section>",
        id = frame.id,
        title = esc(frame.title),
        desc = esc(frame.desc),
        note = if note.is_empty() {
            String::new()
        } else {
            format!("<p class=\"note\">{}</p>", esc(note))
        },
    )
}

const STYLE: &str = r#"
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1f2328; --muted: #59636e; --panel: #f6f8fa;
  --line: #d1d9e0; --ok: #1a7f37; --err: #cf222e; --err-stripe: #ffffff; --rate: #bc4c00; --used: #0969da;
  --proj: #8250df; --marker: #1f2328; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1; --panel: #151b23; --line: #3d444d; --ok: #3fb950;
    --err: #f85149; --err-stripe: #0d1117; --rate: #db6d28; --used: #4493f8; --proj: #a371f7; --marker: #e6edf3; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 24px; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header, main { max-width: 1000px; margin: 0 auto; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 0 0 12px; }
.meta, .note, figcaption p { color: var(--muted); }
.panel { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px;
  margin: 20px 0; overflow-x: auto; }
figure { margin: 0; }
svg.chart { display: block; max-width: none; height: auto; }
svg text { fill: var(--fg); font: 12px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
svg .axis-title { font-weight: 600; }
svg .gridline { stroke: var(--line); stroke-width: 1; }
svg .axis-line { stroke: var(--muted); stroke-width: 1; }
svg .bar.ok { fill: var(--ok); }
svg .bar.err { stroke: var(--err); stroke-width: 0; }
svg .hatch-bg { fill: var(--err); }
svg .hatch-line { stroke: var(--err-stripe); stroke-width: 2; opacity: 0.45; }
svg .bar.rate { fill: var(--rate); }
svg .bar.used { fill: var(--used); }
svg .bar.proj { fill: var(--proj); }
svg .marker-line { stroke: var(--marker); stroke-width: 2; stroke-dasharray: 5 3; }
svg .marker-label { font-weight: 600; }
.legend { list-style: none; padding: 0; margin: 8px 0; display: flex; gap: 16px; flex-wrap: wrap; }
.legend li { display: flex; align-items: center; gap: 6px; }
.legend svg { display: inline-block; }
table.numbers { border-collapse: collapse; margin-top: 12px; font-variant-numeric: tabular-nums; }
table.numbers caption { text-align: left; color: var(--muted); padding-bottom: 4px; }
table.numbers th, table.numbers td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; }
table.numbers th[scope="col"] { border-bottom: 2px solid var(--line); }
table.numbers th:first-child { text-align: left; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; margin: 12px 0 0; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 150px; }
.card .label { color: var(--muted); font-size: 0.85em; }
.card .value { font-size: 1.4em; font-weight: 600; }
"#;

/// The whole document around `body`.
fn document(title: &str, meta: &Meta, heading: &str, lead: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"color-scheme\" content=\"light dark\">\n\
         <meta name=\"generator\" content=\"usage-agg {version}\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header><h1>{heading}</h1><p class=\"meta\">{lead}</p>\
         <p class=\"meta\">{env}, read at <time datetime=\"{as_of}\">{as_of}</time>, by usage-agg {version}. Billed = a month's requests plus the \
         adjustments booked in it (late: requests of closed months counted after their close; manual: corrections).</p></header>\n\
         <main>\n{body}\n</main>\n</body>\n</html>\n",
        title = esc(title),
        heading = esc(heading),
        lead = esc(lead),
        env = esc(&meta.environment),
        as_of = esc(&meta.as_of),
        version = esc(meta.version),
    )
}

fn cards(items: &[(&str, String)]) -> String {
    let mut s = String::from("<div class=\"cards\">");
    for (label, value) in items {
        let _ = write!(
            s,
            "<div class=\"card\"><div class=\"label\">{}</div><div class=\"value\">{}</div></div>",
            esc(label),
            esc(value)
        );
    }
    s.push_str("</div>");
    s
}

fn adjust_text(n: i64) -> String {
    if n == 0 {
        "0".into()
    } else if n > 0 {
        format!("+{}", grouped(n))
    } else {
        grouped(n)
    }
}

/// One portal's page, from `usage_portal_summary`: the trend of its
/// months, their error rate, and the current month to date with its
/// projection (against the quota when there is one).
pub fn portal_page(s: &PortalSummary, meta: &Meta) -> Page {
    let months: Vec<String> = s.months.iter().map(|m| m.month.clone()).collect();
    let span = match (months.first(), months.last()) {
        (Some(a), Some(b)) if a != b => format!("{a} to {b}"),
        (Some(a), _) => a.clone(),
        _ => String::new(),
    };
    let mut body = String::new();

    // 1. The trend.
    let title = format!("Requests per month, {span}");
    let frame = Frame {
        id: "trend",
        title: &title,
        desc: "Each month's requests as billing reads them (the monthly row, as of the last run), \
               stacked: successes, then errors above them. The table below holds every number.",
        category_title: "Month",
        value_title: "Requests",
        unit: Unit::Count,
    };
    let series = [
        Series {
            name: "successes",
            class: "ok",
            values: s.months.iter().map(|m| Some(m.successes as f64)).collect(),
        },
        Series {
            name: "errors",
            class: "err",
            values: s.months.iter().map(|m| Some(m.errors as f64)).collect(),
        },
    ];
    let rows: Vec<Vec<String>> = s
        .months
        .iter()
        .map(|m| {
            vec![
                m.month.clone(),
                grouped(m.requests),
                grouped(m.successes),
                grouped(m.errors),
                rate_text(m.error_rate),
                adjust_text(m.adjustments.late),
                adjust_text(m.adjustments.manual),
                grouped(m.billed),
                if m.closed { "closed" } else { "open" }.into(),
            ]
        })
        .collect();
    body.push_str(&section(
        &frame,
        &columns(&frame, &months, &series),
        &legend(&frame, &series, None),
        "",
        &table(
            "trend",
            &format!("Portal {}'s months, {span}", s.portal_id),
            &[
                "Month",
                "Requests",
                "Successes",
                "Errors",
                "Error rate",
                "Late",
                "Manual",
                "Billed",
                "Status",
            ],
            &rows,
        ),
    ));

    // 2. The error rate.
    let title = format!("Error rate per month, {span}");
    let frame = Frame {
        id: "error-rate",
        title: &title,
        desc: "Each month's errors as a share of its requests; no column where a month had no requests.",
        category_title: "Month",
        value_title: "Errors (% of requests)",
        unit: Unit::Percent,
    };
    let series = [Series {
        name: "error rate",
        class: "rate",
        values: s
            .months
            .iter()
            .map(|m| rate(m.errors, m.requests))
            .collect(),
    }];
    let rows: Vec<Vec<String>> = s
        .months
        .iter()
        .map(|m| {
            vec![
                m.month.clone(),
                rate_text(rate(m.errors, m.requests)),
                grouped(m.errors),
                grouped(m.requests),
            ]
        })
        .collect();
    body.push_str(&section(
        &frame,
        &columns(&frame, &months, &series),
        &legend(&frame, &series, None),
        "",
        &table(
            "error-rate",
            &format!("Portal {}'s error rate, {span}", s.portal_id),
            &["Month", "Error rate", "Errors", "Requests"],
            &rows,
        ),
    ));

    // 3. The current month to date, and where it is heading.
    let c = &s.current;
    let quota = s.quota.as_ref().map(Quota::read).unwrap_or_default();
    let projected = quota.projection.or(c.projected_requests);
    let marker = quota.limit.map(|l| Marker {
        value: l as f64,
        label: format!("quota {}", grouped(l)),
    });
    let title = format!("{} to date", c.month);
    let desc = match (quota.limit, projected) {
        (Some(l), Some(p)) => format!(
            "{} requests so far, {:.0}% of the month gone; on a straight line, {} by the month's end, \
             {:.0}% of the quota of {}.",
            grouped(c.requests),
            c.elapsed * 100.0,
            grouped(p),
            p as f64 * 100.0 / l.max(1) as f64,
            grouped(l)
        ),
        (None, Some(p)) => format!(
            "{} requests so far, {:.0}% of the month gone; on a straight line, {} by the month's end \
             (no quota).",
            grouped(c.requests),
            c.elapsed * 100.0,
            grouped(p)
        ),
        (_, None) => format!(
            "{} requests so far; the month has just begun, so no projection yet.",
            grouped(c.requests)
        ),
    };
    let frame = Frame {
        id: "current",
        title: &title,
        desc: &desc,
        category_title: "This month",
        value_title: "Requests",
        unit: Unit::Count,
    };
    let categories = vec!["So far".to_string(), "Projected".to_string()];
    let series = [
        Series {
            name: "successes",
            class: "ok",
            values: vec![Some(c.successes as f64), None],
        },
        Series {
            name: "errors",
            class: "err",
            values: vec![Some(c.errors as f64), None],
        },
        Series {
            name: "projected by the month's end",
            class: "proj",
            values: vec![None, projected.map(|p| p as f64)],
        },
    ];
    let mut rows = vec![
        vec!["Requests so far".into(), grouped(c.requests)],
        vec!["Successes".into(), grouped(c.successes)],
        vec!["Errors".into(), grouped(c.errors)],
        vec!["Success rate".into(), rate_text(c.success_rate)],
        vec!["Error rate".into(), rate_text(c.error_rate)],
        vec!["Month gone".into(), format!("{:.1}%", c.elapsed * 100.0)],
        vec![
            "Projected by the month's end".into(),
            projected.map_or("–".into(), grouped),
        ],
    ];
    if let Some(l) = quota.limit {
        rows.push(vec!["Quota".into(), grouped(l)]);
        rows.push(vec![
            "Used of the quota".into(),
            rate_text(rate(quota.used.unwrap_or(c.requests), l)),
        ]);
        if let Some(p) = projected {
            rows.push(vec!["Projected of the quota".into(), rate_text(rate(p, l))]);
        }
    }
    let cards = cards(&[
        ("Requests so far", grouped(c.requests)),
        ("Error rate", rate_text(c.error_rate)),
        (
            "Projected by the month's end",
            projected.map_or("–".into(), grouped),
        ),
        ("Quota", quota.limit.map_or("none".into(), grouped)),
    ]);
    body.push_str(&section(
        &frame,
        &bars(&frame, &categories, &series, marker.as_ref()),
        &legend(&frame, &series, marker.as_ref()),
        "Right now: the monthly row, its late adjustments and the requests no run has counted yet \
         (usage_current). The projection is a straight line: requests so far divided by the share of \
         the month gone.",
        &format!(
            "{cards}{}",
            table(
                "current",
                &format!("Portal {}, {} to date", s.portal_id, c.month),
                &["", "Value"],
                &rows
            )
        ),
    ));
    let title = format!("Portal {} usage, {span}", s.portal_id);
    Page {
        html: document(
            &title,
            &Meta {
                as_of: s.as_of.clone(),
                ..meta.clone()
            },
            &format!("Usage of portal {}", s.portal_id),
            &format!(
                "{span}: the trend, the error rate, and {} to date with its projection.",
                c.month
            ),
            &body,
        ),
        title,
        charts: vec!["trend", "error-rate", "current"],
    }
}

fn portal_row(p: &PortalMonth) -> Vec<String> {
    vec![
        p.portal_id.to_string(),
        grouped(p.requests),
        grouped(p.successes),
        grouped(p.errors),
        rate_text(rate(p.errors, p.requests)),
        adjust_text(p.late),
        adjust_text(p.manual),
        grouped(p.billed),
    ]
}

/// Every portal: the months' totals, the top portals of the last month,
/// and the portals with the highest error rates in it.
pub fn overview_page(o: &Overview, meta: &Meta) -> Page {
    let months: Vec<String> = o.months.iter().map(|m| m.month.clone()).collect();
    let span = match (months.first(), months.last()) {
        (Some(a), Some(b)) if a != b => format!("{a} to {b}"),
        (Some(a), _) => a.clone(),
        _ => String::new(),
    };
    let mut body = String::new();

    // 1. The months' totals.
    let title = format!("Requests per month, all portals, {span}");
    let frame = Frame {
        id: "totals",
        title: &title,
        desc: "Each month's requests over every portal, as billing reads them (the monthly rows, as of \
               the last run), stacked: successes, then errors. The table below holds every number.",
        category_title: "Month",
        value_title: "Requests",
        unit: Unit::Count,
    };
    let series = [
        Series {
            name: "successes",
            class: "ok",
            values: o.months.iter().map(|m| Some(m.successes as f64)).collect(),
        },
        Series {
            name: "errors",
            class: "err",
            values: o.months.iter().map(|m| Some(m.errors as f64)).collect(),
        },
    ];
    let rows: Vec<Vec<String>> = o
        .months
        .iter()
        .map(|m| {
            vec![
                m.month.clone(),
                m.portals.to_string(),
                grouped(m.requests),
                grouped(m.successes),
                grouped(m.errors),
                rate_text(rate(m.errors, m.requests)),
                adjust_text(m.late),
                adjust_text(m.manual),
                grouped(m.billed),
            ]
        })
        .collect();
    body.push_str(&section(
        &frame,
        &columns(&frame, &months, &series),
        &legend(&frame, &series, None),
        "",
        &table(
            "totals",
            &format!("All portals, {span}"),
            &[
                "Month",
                "Portals",
                "Requests",
                "Successes",
                "Errors",
                "Error rate",
                "Late",
                "Manual",
                "Billed",
            ],
            &rows,
        ),
    ));

    // 2. The top portals of the month.
    let head = [
        "Portal",
        "Requests",
        "Successes",
        "Errors",
        "Error rate",
        "Late",
        "Manual",
        "Billed",
    ];
    let title = if o.top.len() < o.portals || o.portals == 0 {
        format!("Top {} portals by requests, {}", o.top.len(), o.month)
    } else {
        format!("All {} portals by requests, {}", o.portals, o.month)
    };
    let frame = Frame {
        id: "top",
        title: &title,
        desc: "The portals with the most requests in the month, most first, stacked: successes, then errors.",
        category_title: "Portal",
        value_title: "Requests",
        unit: Unit::Count,
    };
    let categories: Vec<String> = o
        .top
        .iter()
        .map(|p| format!("Portal {}", p.portal_id))
        .collect();
    let series = [
        Series {
            name: "successes",
            class: "ok",
            values: o.top.iter().map(|p| Some(p.successes as f64)).collect(),
        },
        Series {
            name: "errors",
            class: "err",
            values: o.top.iter().map(|p| Some(p.errors as f64)).collect(),
        },
    ];
    let rows: Vec<Vec<String>> = o.top.iter().map(portal_row).collect();
    body.push_str(&section(
        &frame,
        &bars(&frame, &categories, &series, None),
        &legend(&frame, &series, None),
        "",
        &table("top", &title, &head, &rows),
    ));

    // 3. The highest error rates.
    let title = format!("Highest error rates, {}", o.month);
    let frame = Frame {
        id: "error-rates",
        title: &title,
        desc: "The portals with errors in the month, by the share of their requests that failed, highest first \
               (ties: more errors first).",
        category_title: "Portal",
        value_title: "Errors (% of requests)",
        unit: Unit::Percent,
    };
    let categories: Vec<String> = o
        .error_rates
        .iter()
        .map(|p| format!("Portal {}", p.portal_id))
        .collect();
    let series = [Series {
        name: "error rate",
        class: "rate",
        values: o
            .error_rates
            .iter()
            .map(|p| rate(p.errors, p.requests))
            .collect(),
    }];
    let rows: Vec<Vec<String>> = o
        .error_rates
        .iter()
        .map(|p| {
            vec![
                p.portal_id.to_string(),
                rate_text(rate(p.errors, p.requests)),
                grouped(p.errors),
                grouped(p.requests),
            ]
        })
        .collect();
    body.push_str(&section(
        &frame,
        &bars(&frame, &categories, &series, None),
        &legend(&frame, &series, None),
        if o.error_rates.is_empty() {
            "No portal had an error this month."
        } else {
            ""
        },
        &table(
            "error-rates",
            &title,
            &["Portal", "Error rate", "Errors", "Requests"],
            &rows,
        ),
    ));
    let title = format!("All portals usage, {span}");
    Page {
        html: document(
            &title,
            meta,
            "Usage of all portals",
            &format!(
                "{span}: the months' totals; in {}, the top portals and the highest error rates.",
                o.month
            ),
            &body,
        ),
        title,
        charts: vec!["totals", "top", "error-rates"],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dashboard::{Adjusted, CurrentMonth, MonthTotals, SummaryMonth};

    fn meta() -> Meta {
        Meta {
            environment: "DEV".into(),
            as_of: "2025-07-15T12:00:00.000000Z".into(),
            version: "0.0.0",
        }
    }

    fn summary(quota: Option<serde_json::Value>) -> PortalSummary {
        let month = |m: &str, ok: i64, err: i64| SummaryMonth {
            month: m.into(),
            requests: ok + err,
            successes: ok,
            errors: err,
            success_rate: rate(ok, ok + err),
            error_rate: rate(err, ok + err),
            adjustments: Adjusted {
                late: 2,
                manual: -1,
            },
            billed: ok + err + 1,
            closed: m < "2025-07",
        };
        PortalSummary {
            version: 1,
            portal_id: 42,
            as_of: "2025-07-15T12:00:00.000000Z".into(),
            current: CurrentMonth {
                month: "2025-07".into(),
                requests: 60,
                successes: 50,
                errors: 10,
                success_rate: Some(83.33),
                error_rate: Some(16.67),
                last_request_at: None,
                month_start: "2025-07-01T00:00:00.000000Z".into(),
                month_end: "2025-08-01T00:00:00.000000Z".into(),
                elapsed: 0.5,
                projected_requests: Some(120),
            },
            months: vec![
                month("2025-05", 30, 10),
                month("2025-06", 0, 0),
                month("2025-07", 45, 5),
            ],
            quota,
        }
    }

    /// The `<rect>`s of a chart: (category, series, value, height, width).
    fn rects(html: &str, chart: &str) -> Vec<(String, String, f64, f64, f64)> {
        let start = html.find(&format!("id=\"chart-{chart}\"")).unwrap();
        let end = start + html[start..].find("</svg>").unwrap();
        let attr = |tag: &str, name: &str| -> String {
            let at = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            tag[at..at + tag[at..].find('"').unwrap()].to_string()
        };
        html[start..end]
            .split("<rect class=\"bar ")
            .skip(1)
            .map(|t| {
                (
                    attr(t, "data-category"),
                    attr(t, "data-series"),
                    attr(t, "data-value").parse().unwrap(),
                    attr(t, "height").parse().unwrap(),
                    attr(t, "width").parse().unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_portal_page_is_one_file_that_fetches_nothing() {
        let page = portal_page(&summary(None), &meta());
        let html = &page.html;
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("default-src 'none'"));
        for banned in [
            "<script", "<link", "<img", "@import", "url(http", "src=", "href=",
        ] {
            assert!(!html.contains(banned), "{banned}");
        }
        assert_eq!(page.charts, ["trend", "error-rate", "current"]);
        for id in &page.charts {
            assert!(html.contains(&format!("id=\"chart-{id}\"")), "{id}");
            assert!(html.contains(&format!("id=\"table-{id}\"")), "{id}");
        }
        assert!(html.contains("prefers-color-scheme: dark"));
        assert!(html.contains("Requests per month, 2025-05 to 2025-07"));
    }

    #[test]
    fn column_heights_are_proportional_to_their_values() {
        let html = portal_page(&summary(None), &meta()).html;
        let r = rects(&html, "trend");
        assert_eq!(r.len(), 6, "{r:?}");
        let per_unit: Vec<f64> = r.iter().filter(|x| x.2 > 0.0).map(|x| x.3 / x.2).collect();
        for k in &per_unit {
            assert!((k - per_unit[0]).abs() < 1e-3, "{per_unit:?}");
        }
        assert!(r.iter().filter(|x| x.2 == 0.0).all(|x| x.3 == 0.0));
        // The error rate: no column for a month without requests.
        let rate = rects(&html, "error-rate");
        let months: Vec<&str> = rate.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(months, ["2025-05", "2025-07"]);
        assert!((rate[0].2 - 25.0).abs() < 1e-9 && (rate[1].2 - 10.0).abs() < 1e-9);
    }

    #[test]
    fn the_current_month_is_projected_against_the_quota_when_there_is_one() {
        let html = portal_page(&summary(None), &meta()).html;
        assert!(!html.contains("class=\"marker\""));
        assert!(
            html.contains("120 by the month&#39;s end (no quota)"),
            "{html}"
        );
        let html = portal_page(
            &summary(Some(
                serde_json::json!({"used": 60, "limit": 100, "percent": 60, "projection": 120}),
            )),
            &meta(),
        )
        .html;
        assert!(html.contains("<g class=\"marker\" data-value=\"100\">"));
        assert!(html.contains("120% of the quota of 100"));
        let r = rects(&html, "current");
        let proj = r.iter().find(|x| x.1.starts_with("projected")).unwrap();
        let used = r.iter().find(|x| x.1 == "successes").unwrap();
        assert!((proj.4 / used.4 - 120.0 / 50.0).abs() < 1e-4, "{r:?}");
    }

    #[test]
    fn text_from_the_data_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        let mut m = meta();
        m.environment = "<script>".into();
        let html = overview_page(&Overview::default(), &m).html;
        assert!(!html.contains("<script"));
    }

    #[test]
    fn the_overview_draws_totals_top_portals_and_error_rates() {
        let o = Overview {
            month: "2025-07".into(),
            months: vec![
                MonthTotals {
                    month: "2025-06".into(),
                    portals: 1,
                    requests: 10,
                    successes: 10,
                    errors: 0,
                    late: 0,
                    manual: 0,
                    billed: 10,
                },
                MonthTotals {
                    month: "2025-07".into(),
                    portals: 2,
                    requests: 40,
                    successes: 30,
                    errors: 10,
                    late: 1,
                    manual: 0,
                    billed: 41,
                },
            ],
            top: vec![
                PortalMonth {
                    portal_id: 7,
                    requests: 30,
                    successes: 25,
                    errors: 5,
                    late: 1,
                    manual: 0,
                    billed: 31,
                },
                PortalMonth {
                    portal_id: 8,
                    requests: 10,
                    successes: 5,
                    errors: 5,
                    late: 0,
                    manual: 0,
                    billed: 10,
                },
            ],
            error_rates: vec![],
            portals: 2,
        };
        let page = overview_page(&o, &meta());
        assert_eq!(page.charts, ["totals", "top", "error-rates"]);
        assert!(page.html.contains("All 2 portals by requests, 2025-07"));
        let top = rects(&page.html, "top");
        let widths: Vec<f64> = top.iter().map(|x| x.4 / x.2).collect();
        for w in &widths {
            assert!((w - widths[0]).abs() < 1e-3, "{top:?}");
        }
        assert!(page.html.contains("No portal had an error this month."));
    }
}
