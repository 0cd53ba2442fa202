//! The two tables over PostgREST: scanning `usage_requests` by keyset, and
//! reading and writing `portal_usage_monthly`. Knows the schema; knows
//! nothing of runs, cursors or leases.

use std::collections::HashMap;

use anyhow::Context;
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

use crate::aggregation::{
    format_timestamp, parse_timestamp, Key, Month, RawRow, Totals, RAW_COLUMNS,
};
use crate::pace::Pace;
use crate::postgrest::{Client, Kind, Query};

pub const RAW_TABLE: &str = "usage_requests";
pub const MONTHLY_TABLE: &str = "portal_usage_monthly";
pub const CONFLICT_TARGET: &str = "portal_id,month_year";

/// Rows per bulk upsert: about 200 bytes each, so a request stays near
/// 100 KB, far under any gateway's body limit.
pub const UPSERT_CHUNK: usize = 500;
/// URL budget for `in.()` filters: the gateway answers 414 past about 8 KB.
pub const MAX_URL_LEN: usize = 6000;

/// Pages through `usage_requests` in id order: `id=gt.<last>&order=id.asc`.
/// The end is an empty page and only that: the server's `max_rows` cap makes
/// pages short without saying so (docs/semantics.md, "Paging").
pub struct RawScan {
    client: Client,
    filters: Query,
    after: i64,
    upto: Option<i64>,
    page_size: usize,
    done: bool,
}

impl RawScan {
    /// Rows with `after < id <= upto` (no upper bound when `upto` is None).
    pub fn new(client: &Client, after: i64, upto: Option<i64>, page_size: usize) -> Self {
        RawScan {
            client: client.clone(),
            filters: Query::new(),
            after,
            upto,
            page_size,
            done: false,
        }
    }

    /// Only rows matching these filters as well (one month, one key).
    pub fn filtered(mut self, filters: Query) -> Self {
        self.filters = filters;
        self
    }

    pub async fn next_page(&mut self) -> anyhow::Result<Option<Vec<RawRow>>> {
        if self.done || self.upto.is_some_and(|u| self.after >= u) {
            return Ok(None);
        }
        // No `id=lte.<upto>` in the query: with an upper bound, a planner
        // working from a generic plan (the LIMIT a parameter) may choose a
        // sequential scan and a sort for a wide range, several times slower
        // than walking the primary key. Ids are unique integers, so asking
        // for at most `upto - after` rows never reads past `upto` by much;
        // rows above it are dropped here.
        let limit = match self.upto {
            Some(u) => (self.page_size as i64).min(u - self.after) as usize,
            None => self.page_size,
        };
        let mut query: Query = self.filters.clone();
        query.push(("select".into(), RAW_COLUMNS.into()));
        query.push(("id".into(), format!("gt.{}", self.after)));
        query.push(("order".into(), "id.asc".into()));
        query.push(("limit".into(), limit.to_string()));
        let mut rows: Vec<RawRow> = self
            .client
            .select(RAW_TABLE, &query)
            .await
            .with_context(|| format!("reading {RAW_TABLE} after id {}", self.after))?;
        let Some(last) = rows.last() else {
            self.done = true;
            return Ok(None);
        };
        anyhow::ensure!(
            last.id > self.after && rows.windows(2).all(|w| w[0].id < w[1].id),
            "the server returned {RAW_TABLE} rows out of id order (asked for order=id.asc after id {}); \
             is something rewriting the query?",
            self.after
        );
        self.after = last.id;
        if let Some(upto) = self.upto.filter(|u| last.id >= *u) {
            rows.retain(|r| r.id <= upto);
            self.after = upto;
            self.done = true;
        }
        Ok(Some(rows))
    }
}

/// Scans ids in (after, upto] as keyset scans over `--concurrency` equal
/// sub-ranges, handing pages over as they arrive, in no particular order
/// (folding does not care). The server answers several requests in
/// parallel, and parsing one page overlaps fetching the others. How many
/// are in flight at a time is the [`Pace`]'s to say.
pub struct ParallelScan {
    pages: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<RawRow>>>,
    _tasks: tokio::task::JoinSet<()>,
    /// Rows handed over so far.
    pub rows_read: u64,
}

impl ParallelScan {
    pub fn start(
        client: &Client,
        filters: Query,
        after: i64,
        upto: i64,
        page_size: usize,
        pace: &Pace,
    ) -> ParallelScan {
        let n = pace.settings().max_concurrency.max(1);
        let (tx, rx) = tokio::sync::mpsc::channel(2 * n);
        let mut tasks = tokio::task::JoinSet::new();
        for (lo, hi) in split_ids(after, upto, n) {
            let mut scan = RawScan::new(client, lo, Some(hi), page_size).filtered(filters.clone());
            let tx = tx.clone();
            let pace = pace.clone();
            tasks.spawn(async move {
                loop {
                    let permit = match pace.acquire().await {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            break;
                        }
                    };
                    let page = scan.next_page().await;
                    let rows = match &page {
                        Ok(rows) => rows.as_ref().map(|r| r.len() as u64),
                        Err(_) => None,
                    };
                    pace.done(permit, rows.unwrap_or(0), page.is_ok()).await;
                    let stop = !matches!(page, Ok(Some(_)));
                    let item = match page {
                        Ok(Some(rows)) => Ok(rows),
                        Ok(None) => break,
                        Err(e) => Err(e),
                    };
                    if tx.send(item).await.is_err() || stop {
                        break;
                    }
                }
            });
        }
        ParallelScan {
            pages: rx,
            _tasks: tasks,
            rows_read: 0,
        }
    }

    /// Pages already in hand (the in-memory store's scan).
    #[cfg(test)]
    pub fn from_pages(pages: Vec<anyhow::Result<Vec<RawRow>>>) -> ParallelScan {
        let (tx, rx) = tokio::sync::mpsc::channel(pages.len().max(1));
        for p in pages {
            tx.try_send(p).expect("room for every page");
        }
        ParallelScan {
            pages: rx,
            _tasks: tokio::task::JoinSet::new(),
            rows_read: 0,
        }
    }

    /// The next page from any range; None once every range is done. An
    /// error stops the scan (dropping it aborts the other ranges).
    pub async fn next_page(&mut self) -> anyhow::Result<Option<Vec<RawRow>>> {
        match self.pages.recv().await {
            Some(Ok(rows)) => {
                self.rows_read += rows.len() as u64;
                Ok(Some(rows))
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }
}

/// (after, upto] cut into at most `n` equal, adjacent, non-empty ranges.
/// In i128: `span * i` passes i64::MAX once ids reach about 2e18 / n, and
/// a wrapped bound would silently leave a range unread.
fn split_ids(after: i64, upto: i64, n: usize) -> Vec<(i64, i64)> {
    let span = i128::from(upto) - i128::from(after);
    if span <= 0 {
        return Vec::new();
    }
    let n = n.max(1) as i128;
    let bound = |i: i128| (i128::from(after) + span * i / n) as i64;
    (0..n)
        .map(|i| (bound(i), bound(i + 1)))
        .filter(|(lo, hi)| hi > lo)
        .collect()
}

/// The newest id in `usage_requests` (by the primary key, so cheap), 0 when
/// the table is empty.
pub async fn newest_id(client: &Client) -> anyhow::Result<i64> {
    let q: Query = vec![
        ("select".into(), "id".into()),
        ("order".into(), "id.desc".into()),
        ("limit".into(), "1".into()),
    ];
    let rows: Vec<serde_json::Value> = client
        .select(RAW_TABLE, &q)
        .await
        .context("reading the newest id")?;
    Ok(rows.first().and_then(|r| r["id"].as_i64()).unwrap_or(0))
}

/// A `portal_usage_monthly` row as stored.
#[derive(Debug, Clone, Deserialize)]
struct StoredRow {
    id: i64,
    portal_id: i64,
    month_year: String,
    request_count: Option<i64>,
    success_count: Option<i64>,
    error_count: Option<i64>,
    last_request_at: Option<String>,
    #[serde(default)]
    last_request_id: Option<i64>,
}

impl StoredRow {
    fn key(&self) -> Option<Key> {
        Month::parse(&self.month_year).map(|month| Key {
            portal_id: self.portal_id,
            month,
        })
    }

    fn totals(&self) -> Totals {
        Totals {
            requests: self.request_count.unwrap_or(0),
            successes: self.success_count.unwrap_or(0),
            errors: self.error_count.unwrap_or(0),
            last_request_at: self.last_request_at.as_deref().and_then(parse_timestamp),
            last_request_id: self.last_request_id.unwrap_or(0),
        }
    }
}

const STORED_COLUMNS: &str =
    "id,portal_id,month_year,request_count,success_count,error_count,last_request_at";

fn stored_columns(with_watermark: bool) -> String {
    if with_watermark {
        format!("{STORED_COLUMNS},last_request_id")
    } else {
        STORED_COLUMNS.to_string()
    }
}

/// Reads stored rows matching `filters`, every page of them. Rows whose
/// month is not `YYYY-MM` (written by hand?) are left out: no run writes them.
pub async fn read_stored_where(
    client: &Client,
    filters: &Query,
    with_watermark: bool,
    into: &mut HashMap<Key, Totals>,
    page_size: usize,
) -> anyhow::Result<()> {
    let mut after = 0i64;
    loop {
        let mut q = filters.clone();
        q.push(("select".into(), stored_columns(with_watermark)));
        q.push(("id".into(), format!("gt.{after}")));
        q.push(("order".into(), "id.asc".into()));
        q.push(("limit".into(), page_size.to_string()));
        let rows: Vec<StoredRow> = client
            .select(MONTHLY_TABLE, &q)
            .await
            .with_context(|| format!("reading {MONTHLY_TABLE}"))?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.id;
        for row in rows {
            if let Some(key) = row.key() {
                // Without the unique constraint a key can be stored twice;
                // the fallback writes both, so either will do.
                into.insert(key, row.totals());
            }
        }
    }
}

/// Reads one row of each table with every column a run uses (the
/// watermark too, with the migrations): a missing table or column answers
/// here, by name, before any work.
pub async fn probe(client: &Client, with_watermark: bool) -> anyhow::Result<()> {
    let one = |columns: String| -> Query {
        vec![("select".into(), columns), ("limit".into(), "1".into())]
    };
    client
        .select::<serde_json::Value>(RAW_TABLE, &one(RAW_COLUMNS.into()))
        .await
        .with_context(|| format!("reading {RAW_TABLE}"))?;
    client
        .select::<serde_json::Value>(MONTHLY_TABLE, &one(stored_columns(with_watermark)))
        .await
        .with_context(|| format!("reading {MONTHLY_TABLE}"))?;
    Ok(())
}

/// The newest month stored (`month_year` sorts as time), if any.
pub async fn newest_month(client: &Client) -> anyhow::Result<Option<Month>> {
    let q: Query = vec![
        ("select".into(), "month_year".into()),
        ("order".into(), "month_year.desc".into()),
        ("limit".into(), "1".into()),
    ];
    let rows: Vec<serde_json::Value> = client
        .select(MONTHLY_TABLE, &q)
        .await
        .with_context(|| format!("reading {MONTHLY_TABLE}"))?;
    Ok(rows
        .first()
        .and_then(|r| r["month_year"].as_str())
        .and_then(Month::parse))
}

/// A month's keys, most requests first, at most `n`.
pub async fn top_of_month(
    client: &Client,
    month: Month,
    n: usize,
) -> anyhow::Result<Vec<(Key, Totals)>> {
    let q: Query = vec![
        ("select".into(), stored_columns(false)),
        ("month_year".into(), format!("eq.{month}")),
        (
            "order".into(),
            "request_count.desc.nullslast,portal_id.asc".into(),
        ),
        ("limit".into(), n.to_string()),
    ];
    let rows: Vec<StoredRow> = client
        .select(MONTHLY_TABLE, &q)
        .await
        .with_context(|| format!("reading {MONTHLY_TABLE}"))?;
    Ok(rows
        .iter()
        .filter_map(|r| Some((r.key()?, r.totals())))
        .collect())
}

/// The stored state of the given keys (those that exist).
pub async fn read_stored_for(
    client: &Client,
    keys: impl IntoIterator<Item = Key>,
    with_watermark: bool,
    page_size: usize,
    at_once: usize,
) -> anyhow::Result<HashMap<Key, Totals>> {
    let select = stored_columns(true);
    read_keys_in_lists(
        client,
        MONTHLY_TABLE,
        &select,
        keys,
        at_once,
        move |client, filters| async move {
            let mut out = HashMap::new();
            read_stored_where(&client, &filters, with_watermark, &mut out, page_size).await?;
            Ok(out)
        },
    )
    .await
}

/// Reads rows of `table` for these keys, month by month, with
/// `portal_id=in.(...)` lists cut to fit the URL budget, `at_once` lists
/// at a time (a batch that touched 30,000 keys reads them in about 45
/// lists, which one after another cost a catch-up more than its scan did);
/// `read` reads one list's filters.
pub(crate) async fn read_keys_in_lists<K, V, F, Fut>(
    client: &Client,
    table: &str,
    select: &str,
    keys: impl IntoIterator<Item = Key>,
    at_once: usize,
    read: F,
) -> anyhow::Result<HashMap<K, V>>
where
    K: Eq + std::hash::Hash + Send + 'static,
    V: Send + 'static,
    F: Fn(Client, Query) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<HashMap<K, V>>> + Send + 'static,
{
    let mut by_month: HashMap<Month, Vec<i64>> = HashMap::new();
    for k in keys {
        by_month.entry(k.month).or_default().push(k.portal_id);
    }
    let mut lists = Vec::new();
    for (month, portals) in by_month {
        for chunk in chunk_in_list_for(client, table, select, &portals) {
            lists.push(vec![
                ("month_year".into(), format!("eq.{month}")),
                ("portal_id".into(), format!("in.({chunk})")),
            ]);
        }
    }
    let mut out = HashMap::new();
    let mut running = tokio::task::JoinSet::new();
    let mut lists = lists.into_iter();
    loop {
        while running.len() < at_once.max(1) {
            let Some(filters) = lists.next() else { break };
            running.spawn(read(client.clone(), filters));
        }
        let Some(done) = running.join_next().await else {
            return Ok(out);
        };
        out.extend(done.context("a read of stored rows panicked")??);
    }
}

/// Cuts ids into comma lists whose URLs stay under [`MAX_URL_LEN`]
/// (measured on the encoded URL of a read of `table` selecting `select`,
/// with room for the other parameters).
pub(crate) fn chunk_in_list_for(
    client: &Client,
    table: &str,
    select: &str,
    ids: &[i64],
) -> Vec<String> {
    let base_len = client.url_len(
        table,
        &vec![
            ("month_year".into(), "eq.2025-01".into()),
            ("source".into(), "eq.manual".into()),
            ("select".into(), select.into()),
            ("id".into(), format!("gt.{}", i64::MAX)),
            ("order".into(), "id.asc".into()),
            ("limit".into(), "1000000".into()),
            ("portal_id".into(), "in.()".into()),
        ],
    );
    let mut chunks = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut len = base_len;
    for id in ids {
        let piece = id.to_string();
        // A comma goes on the wire as %2C: three bytes.
        let sep = if current.is_empty() { 0 } else { 3 };
        if !current.is_empty() && len + sep + piece.len() > MAX_URL_LEN {
            chunks.push(current.join(","));
            current.clear();
            len = base_len;
        }
        len += piece.len() + if current.is_empty() { 0 } else { 3 };
        current.push(piece);
    }
    if !current.is_empty() {
        chunks.push(current.join(","));
    }
    chunks
}

/// A `portal_usage_monthly` row as written: every object of a bulk request
/// has the same keys (PGRST102 otherwise), so the watermark is present in
/// all or in none.
#[derive(Debug, Clone, Serialize)]
struct MonthlyRow {
    portal_id: i64,
    month_year: String,
    request_count: i64,
    success_count: i64,
    error_count: i64,
    last_request_at: Option<String>,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_request_id: Option<i64>,
}

impl MonthlyRow {
    /// What this row says, as a stored row would read back.
    fn totals(&self) -> Totals {
        Totals {
            requests: self.request_count,
            successes: self.success_count,
            errors: self.error_count,
            last_request_at: self.last_request_at.as_deref().and_then(parse_timestamp),
            last_request_id: self.last_request_id.unwrap_or(0),
        }
    }
}

/// How the writes went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteStats {
    /// Keys whose write took effect.
    pub written: usize,
    pub bulk_requests: usize,
    /// Keys written one by one because the bulk upsert was refused.
    pub fallback_keys: usize,
    /// Why the bulk upsert was refused, once.
    pub fallback_reason: Option<String>,
    /// Keys another run had already counted further (a higher watermark):
    /// the guard kept its newer state, as it should.
    pub superseded: Vec<Key>,
    /// Keys whose write should have taken effect and did not: the row the
    /// database answered with is neither ours nor newer.
    pub lost: Vec<Key>,
}

impl WriteStats {
    pub fn absorb(&mut self, other: WriteStats) {
        self.written += other.written;
        self.bulk_requests += other.bulk_requests;
        self.fallback_keys += other.fallback_keys;
        self.fallback_reason = self.fallback_reason.take().or(other.fallback_reason);
        self.superseded.extend(other.superseded);
        self.lost.extend(other.lost);
    }
}

/// What became of one key's write, judged from the row the database
/// answered with (after the guard trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landed {
    Written,
    Superseded,
    Lost,
}

/// Our write took effect when the row holds what we sent; a higher
/// watermark means a newer run's state won, which is the contract
/// (docs/semantics.md, "Overlapping runs"). Anything else, a missing row
/// included, is a write that silently did not happen.
pub fn landed(sent: &Totals, stored: Option<&Totals>, with_watermark: bool) -> Landed {
    match stored {
        Some(s) if with_watermark && s.last_request_id > sent.last_request_id => Landed::Superseded,
        Some(s)
            if s.same_values(sent)
                && (!with_watermark || s.last_request_id == sent.last_request_id) =>
        {
            Landed::Written
        }
        _ => Landed::Lost,
    }
}

/// Writes each key's full state (absolute values, never deltas: a repeated
/// write is harmless, docs/semantics.md). Bulk upsert in chunks; when the
/// server refuses the upsert itself (no unique constraint to match: 42P10),
/// falls back to writing key by key. Every key's answer is checked.
pub async fn write_states(
    client: &Client,
    states: &[(Key, Totals)],
    with_watermark: bool,
    now: NaiveDateTime,
    at_once: usize,
) -> anyhow::Result<WriteStats> {
    let updated_at = format_timestamp(now);
    let rows: Vec<MonthlyRow> = states
        .iter()
        .map(|(k, t)| MonthlyRow {
            portal_id: k.portal_id,
            month_year: k.month.to_string(),
            request_count: t.requests,
            success_count: t.successes,
            error_count: t.errors,
            last_request_at: t.last_request_at.map(format_timestamp),
            updated_at: updated_at.clone(),
            last_request_id: with_watermark.then_some(t.last_request_id),
        })
        .collect();
    debug_assert!(
        states.windows(2).all(|w| w[0].0 < w[1].0),
        "keys must be sorted and unique: one request must not hold a key twice (Postgres 21000)"
    );
    let select = stored_columns(with_watermark);
    let mut stats = WriteStats::default();
    let chunks: Vec<_> = rows
        .chunks(UPSERT_CHUNK)
        .zip(states.chunks(UPSERT_CHUNK))
        .collect();
    // Bulk upserts, `at_once` at a time (60 chunks, 30,000 keys, one after
    // another were half of a catch-up's time): each carries whole keys'
    // states, so they may land in any order, and a crash may leave any.
    let mut key_by_key: Vec<usize> = Vec::new();
    let mut running = tokio::task::JoinSet::new();
    let mut next = 0;
    loop {
        while stats.fallback_reason.is_none()
            && running.len() < at_once.max(1)
            && next < chunks.len()
        {
            let (client, select, rows) = (client.clone(), select.clone(), chunks[next].0.to_vec());
            let i = next;
            running.spawn(async move {
                let back = client
                    .upsert::<_, StoredRow>(MONTHLY_TABLE, CONFLICT_TARGET, &select, &rows)
                    .await;
                (i, back)
            });
            next += 1;
        }
        let Some(done) = running.join_next().await else {
            break;
        };
        let (i, back) = done.context("a write to portal_usage_monthly panicked")?;
        let sent = chunks[i].1;
        match back {
            Ok(back) => {
                stats.bulk_requests += 1;
                let answered: HashMap<Key, Totals> = back
                    .iter()
                    .filter_map(|r| Some((r.key()?, r.totals())))
                    .collect();
                judge(sent, &answered, with_watermark, &mut stats);
                crate::failpoint::hit("chunk");
            }
            Err(e) if e.kind() == Kind::UpsertRefused => {
                if stats.fallback_reason.is_none() {
                    tracing::warn!("bulk upsert refused, writing key by key: {e}");
                    stats.fallback_reason = Some(e.to_string());
                }
                key_by_key.push(i);
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("writing {} keys to {MONTHLY_TABLE}", sent.len()))
            }
        }
    }
    key_by_key.extend(next..chunks.len());
    key_by_key.sort_unstable();
    for i in key_by_key {
        let (chunk, sent) = chunks[i];
        let mut answered: HashMap<Key, Totals> = HashMap::new();
        for (row, (key, _)) in chunk.iter().zip(sent) {
            if let Some(t) = write_one(client, row, &select).await? {
                answered.insert(*key, t);
            }
            stats.fallback_keys += 1;
        }
        judge(sent, &answered, with_watermark, &mut stats);
    }
    if !stats.lost.is_empty() {
        tracing::error!(keys = stats.lost.len(), "writes that did not take effect");
    }
    Ok(stats)
}

pub(crate) fn judge(
    sent: &[(Key, Totals)],
    answered: &HashMap<Key, Totals>,
    with_watermark: bool,
    stats: &mut WriteStats,
) {
    for (key, t) in sent {
        match landed(t, answered.get(key), with_watermark) {
            Landed::Written => stats.written += 1,
            Landed::Superseded => stats.superseded.push(*key),
            Landed::Lost => stats.lost.push(*key),
        }
    }
}

/// One key, without upsert: PATCH by (portal_id, month_year); if no row
/// matched, POST; if that POST lost a race to another insert (409), PATCH
/// again. Writing absolute values makes each step safe to repeat. Returns
/// the row as the database left it (a POST that succeeded left ours).
async fn write_one(
    client: &Client,
    row: &MonthlyRow,
    select: &str,
) -> anyhow::Result<Option<Totals>> {
    let filters: Query = vec![
        ("portal_id".into(), format!("eq.{}", row.portal_id)),
        ("month_year".into(), format!("eq.{}", row.month_year)),
    ];
    let ctx = || {
        format!(
            "writing {}:{} to {MONTHLY_TABLE} (fallback)",
            row.portal_id, row.month_year
        )
    };
    let patched: Vec<StoredRow> = client
        .update(MONTHLY_TABLE, &filters, select, row)
        .await
        .with_context(ctx)?;
    if let Some(r) = patched.first() {
        return Ok(Some(r.totals()));
    }
    match client.insert(MONTHLY_TABLE, row).await {
        Ok(()) => Ok(Some(row.totals())),
        Err(e) if e.kind() == Kind::Conflict => {
            let patched: Vec<StoredRow> = client
                .update(MONTHLY_TABLE, &filters, select, row)
                .await
                .with_context(ctx)?;
            anyhow::ensure!(
                !patched.is_empty(),
                "{}: insert conflicted, yet no row matched the update",
                ctx()
            );
            Ok(patched.first().map(StoredRow::totals))
        }
        Err(e) => Err(e).with_context(ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(requests: i64, watermark: i64) -> Totals {
        Totals {
            requests,
            successes: requests,
            last_request_id: watermark,
            ..Totals::default()
        }
    }

    #[test]
    fn a_write_is_judged_by_the_row_the_database_answered_with() {
        assert_eq!(landed(&t(5, 10), Some(&t(5, 10)), true), Landed::Written);
        assert_eq!(landed(&t(5, 10), Some(&t(9, 12)), true), Landed::Superseded);
        // The guard kept an equal watermark's other values, or something
        // else undid the write, or the row is gone: lost.
        assert_eq!(landed(&t(5, 10), Some(&t(4, 10)), true), Landed::Lost);
        assert_eq!(landed(&t(5, 10), Some(&t(3, 2)), true), Landed::Lost);
        assert_eq!(landed(&t(5, 10), None, true), Landed::Lost);
        // Without the migration only the values count.
        assert_eq!(landed(&t(5, 0), Some(&t(5, 0)), false), Landed::Written);
        assert_eq!(landed(&t(5, 0), Some(&t(6, 0)), false), Landed::Lost);
    }

    #[test]
    fn in_lists_are_cut_to_keep_every_url_under_the_budget() {
        let client = Client::new(
            "https://abc.supabase.co/rest/v1/".parse().unwrap(),
            &crate::config::Secret::new("k"),
            crate::config::KeyKind::SecretKey,
            std::time::Duration::from_secs(1),
            crate::postgrest::RetryPolicy::default(),
        )
        .unwrap();
        let ids: Vec<i64> = (0..3000).map(|i| i64::MAX - i).collect();
        let chunks = chunk_in_list_for(&client, MONTHLY_TABLE, &stored_columns(true), &ids);
        assert!(chunks.len() > 1);
        let back: Vec<i64> = chunks
            .iter()
            .flat_map(|c| c.split(',').map(|x| x.parse::<i64>().unwrap()))
            .collect();
        assert_eq!(back, ids, "every id once, in order");
        for c in &chunks {
            let q: Query = vec![
                ("month_year".into(), "eq.2025-01".into()),
                ("portal_id".into(), format!("in.({c})")),
                ("select".into(), stored_columns(true)),
                ("id".into(), format!("gt.{}", i64::MAX)),
                ("order".into(), "id.asc".into()),
                ("limit".into(), "1000000".into()),
            ];
            assert!(client.url_len(MONTHLY_TABLE, &q) <= MAX_URL_LEN);
        }
        assert!(chunk_in_list_for(&client, MONTHLY_TABLE, &stored_columns(true), &[]).is_empty());
    }

    #[test]
    fn id_ranges_cover_every_id_once_even_near_the_top_of_bigint() {
        for (after, upto, n) in [
            (0, 10, 4),
            (0, 3, 8),
            (5, 5, 4),
            (0, i64::MAX, 32),
            (300_000_000_000_000_000, 300_000_000_000_002_700, 32),
            (0, 300_000_000_000_002_700, 32),
            (i64::MAX - 100, i64::MAX, 3),
        ] {
            let r = split_ids(after, upto, n);
            assert!(r.len() <= n, "{after}..{upto}/{n}");
            if upto > after {
                assert_eq!(r.first().unwrap().0, after, "{after}..{upto}/{n}");
                assert_eq!(r.last().unwrap().1, upto, "{after}..{upto}/{n}");
            } else {
                assert!(r.is_empty());
            }
            assert!(r.iter().all(|(lo, hi)| lo < hi));
            assert!(r.windows(2).all(|w| w[0].1 == w[1].0), "adjacent: {r:?}");
        }
    }
}
