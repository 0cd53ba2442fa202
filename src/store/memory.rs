//! A [`Store`] in memory, for unit tests of the engines and the job: the
//! same contract as the database (the watermark guard, the cursor that
//! never moves back, the lease, the refusals), and kill points: after a
//! chosen number of calls of one kind the store "dies" (every later call
//! fails, as the process would have), and [`MemoryStore::restart`] brings
//! it back for the next run.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use serde_json::json;

use super::{Batch, BatchAsk, RawFilter, Refusal, Store, StoredFilter};
use crate::adjustments::LateKey;
use crate::aggregation::{Fold, Key, Month, RawRow, Totals};
use crate::booking::{Booked, BookedChange, Rebased, Stated};
use crate::ledger::{CloseAnswer, PeriodInfo, ReopenAnswer};
use crate::pace::Pace;
use crate::periods::Periods;
use crate::preflight::Facts;
use crate::schedule::CronAnswer;
use crate::state::{Lease, StateRow};
use crate::tables::{judge, ParallelScan, WriteStats};

/// Where a test kills the store: the `n`th call (from 1) of this kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// A page of a scan.
    Page(usize),
    /// A write of totals, monthly or late (the write is lost with the
    /// process).
    Write(usize),
    /// A cursor move (it does not happen).
    Advance(usize),
}

#[derive(Default)]
struct Inner {
    raw: BTreeMap<i64, RawRow>,
    seq: i64,
    monthly: BTreeMap<Key, Totals>,
    late: BTreeMap<LateKey, Totals>,
    closed: BTreeSet<Month>,
    /// Closed (or, false, reopened) just before the next write arrives:
    /// a close racing a run that read the months before it.
    flip_before_write: Option<(Month, bool)>,
    cursor: Option<i64>,
    lease: Option<String>,
    lease_expired: bool,
    outcome: Option<String>,
    refused: BTreeMap<Key, (i64, i64)>,
    kill: Option<Kill>,
    pages: usize,
    writes: usize,
    advances: usize,
    dead: bool,
}

#[derive(Default)]
pub struct MemoryStore {
    inner: RefCell<Inner>,
}

fn killed() -> anyhow::Error {
    anyhow::anyhow!("the process was killed (memory store)")
}

impl MemoryStore {
    /// Appends rows `(portal, month, success)` with ids from the sequence.
    pub fn insert(&self, rows: &[(i64, &str, bool)]) {
        let mut s = self.inner.borrow_mut();
        for (portal, month, ok) in rows {
            s.seq += 1;
            let id = s.seq;
            s.raw.insert(
                id,
                RawRow::from_json(&json!({
                    "id": id,
                    "portal_id": portal,
                    "month_year": month,
                    "success": ok,
                    "request_timestamp": format!("{month}-02T10:00:{:02}", id % 60),
                }))
                .expect("a row the test wrote"),
            );
        }
    }

    /// Deletes raw rows by id (a duplicate delivery removed).
    pub fn delete_raw(&self, ids: &[i64]) {
        let mut s = self.inner.borrow_mut();
        for id in ids {
            s.raw.remove(id);
        }
    }

    /// Kills the store at `kill` during the next run.
    pub fn kill_at(&self, kill: Kill) {
        let mut s = self.inner.borrow_mut();
        s.kill = Some(kill);
        s.pages = 0;
        s.writes = 0;
        s.advances = 0;
    }

    /// After a kill: the next process starts; the dead one's lease is gone.
    pub fn restart(&self) {
        let mut s = self.inner.borrow_mut();
        s.dead = false;
        s.kill = None;
        s.lease = None;
    }

    /// Whether the last run's process was killed.
    pub fn was_killed(&self) -> bool {
        self.inner.borrow().dead
    }

    /// Makes the lease run out, as under a stalled run.
    pub fn expire_lease(&self) {
        self.inner.borrow_mut().lease_expired = true;
    }

    pub fn cursor(&self) -> Option<i64> {
        self.inner.borrow().cursor
    }

    pub fn outcome(&self) -> Option<String> {
        self.inner.borrow().outcome.clone()
    }

    pub fn monthly(&self) -> BTreeMap<Key, Totals> {
        self.inner.borrow().monthly.clone()
    }

    pub fn late_adjustments(&self) -> BTreeMap<LateKey, Totals> {
        self.inner.borrow().late.clone()
    }

    /// Closes a month as `usage-agg close` would once caught up.
    pub fn close(&self, m: Month) {
        self.inner.borrow_mut().closed.insert(m);
    }

    pub fn reopen(&self, m: Month) {
        self.inner.borrow_mut().closed.remove(&m);
    }

    /// Closes (`true`) or reopens `m` just before the next write of totals
    /// arrives, as a close from another process would land mid-run.
    pub fn flip_before_next_write(&self, m: Month, closed: bool) {
        self.inner.borrow_mut().flip_before_write = Some((m, closed));
    }

    fn flip_now(s: &mut Inner) {
        if let Some((m, closed)) = s.flip_before_write.take() {
            if closed {
                s.closed.insert(m);
            } else {
                s.closed.remove(&m);
            }
        }
    }

    /// What the tables must hold together: every good row, per key
    /// (watermarks aside).
    pub fn truth(&self) -> BTreeMap<Key, (i64, i64, i64)> {
        let s = self.inner.borrow();
        let mut fold = Fold::default();
        for row in s.raw.values() {
            fold.add(row, |_, _| true);
        }
        fold.groups
            .into_iter()
            .map(|(k, t)| (k, (t.requests, t.successes, t.errors)))
            .collect()
    }

    /// Each key's monthly row plus its late adjustments.
    fn counted(s: &Inner) -> BTreeMap<Key, Totals> {
        let mut out = s.monthly.clone();
        for ((k, _), t) in &s.late {
            let e = out.entry(*k).or_default();
            *e = e.plus(*t);
        }
        out
    }

    /// The stored counts (monthly plus late adjustments), keys with none
    /// left out.
    pub fn counts(&self) -> BTreeMap<Key, (i64, i64, i64)> {
        Self::counted(&self.inner.borrow())
            .into_iter()
            .filter(|(_, t)| t.requests != 0)
            .map(|(k, t)| (k, (t.requests, t.successes, t.errors)))
            .collect()
    }

    /// The invariant of docs/semantics.md: each stored key's monthly row
    /// and late adjustments hold exactly its good rows up to its highest
    /// watermark.
    pub fn consistent(&self) -> bool {
        let s = self.inner.borrow();
        Self::counted(&s).iter().all(|(key, t)| {
            let mut fold = Fold::default();
            for row in s.raw.values().filter(|r| r.id <= t.last_request_id) {
                fold.add(row, |k, _| k == key);
            }
            let truth = fold.groups.get(key).copied().unwrap_or_default();
            (truth.requests, truth.successes, truth.errors) == (t.requests, t.successes, t.errors)
        })
    }

    fn periods_now(s: &Inner) -> Periods {
        Periods::new(s.closed.iter().copied())
    }

    fn alive(&self) -> anyhow::Result<()> {
        if self.inner.borrow().dead {
            return Err(killed());
        }
        Ok(())
    }

    /// Counts a call of one kind; true when this is the one to die at.
    fn dies(&self, kind: fn(usize) -> Kill, count: impl Fn(&mut Inner) -> &mut usize) -> bool {
        let mut s = self.inner.borrow_mut();
        let n = {
            let c = count(&mut s);
            *c += 1;
            *c
        };
        if s.kill == Some(kind(n)) {
            s.dead = true;
        }
        s.dead
    }
}

fn matches(filter: RawFilter, row: &RawRow) -> bool {
    match filter {
        RawFilter::All => true,
        // Rows of a month the server would match: ours are all good rows.
        RawFilter::Month(m) => row.good().is_some_and(|g| g.key.month == m),
    }
}

impl Store for MemoryStore {
    fn scan(
        &self,
        filter: RawFilter,
        after: i64,
        upto: i64,
        page_size: usize,
        _pace: &Pace,
    ) -> ParallelScan {
        let rows: Vec<RawRow> = self
            .inner
            .borrow()
            .raw
            .range(after + 1..=upto.max(after))
            .map(|(_, r)| r.clone())
            .filter(|r| matches(filter, r))
            .collect();
        let mut pages = Vec::new();
        for chunk in rows.chunks(page_size.max(1)) {
            if self.dies(Kill::Page, |s| &mut s.pages) {
                pages.push(Err(killed()));
                break;
            }
            pages.push(Ok(chunk.to_vec()));
        }
        ParallelScan::from_pages(pages)
    }

    async fn newest_id(&self) -> anyhow::Result<i64> {
        self.alive()?;
        Ok(self
            .inner
            .borrow()
            .raw
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0))
    }

    async fn stored(
        &self,
        filter: StoredFilter,
        _with_watermark: bool,
        _page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        self.alive()?;
        Ok(self
            .inner
            .borrow()
            .monthly
            .iter()
            .filter(|(k, t)| match filter {
                StoredFilter::All => true,
                StoredFilter::Month(m) => k.month == m,
                StoredFilter::WatermarkAbove(id) => t.last_request_id > id,
                StoredFilter::Portal(p) => k.portal_id == p,
            })
            .map(|(k, t)| (*k, *t))
            .collect())
    }

    async fn stored_for(
        &self,
        keys: &[Key],
        _page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        self.alive()?;
        let s = self.inner.borrow();
        Ok(keys
            .iter()
            .filter_map(|k| s.monthly.get(k).map(|t| (*k, *t)))
            .collect())
    }

    async fn newest_month(&self) -> anyhow::Result<Option<Month>> {
        self.alive()?;
        Ok(self.inner.borrow().monthly.keys().map(|k| k.month).max())
    }

    async fn top_of_month(&self, month: Month, n: usize) -> anyhow::Result<Vec<(Key, Totals)>> {
        self.alive()?;
        let mut v: Vec<(Key, Totals)> = self
            .inner
            .borrow()
            .monthly
            .iter()
            .filter(|(k, _)| k.month == month)
            .map(|(k, t)| (*k, *t))
            .collect();
        v.sort_by_key(|(k, t)| (-t.requests, k.portal_id));
        v.truncate(n);
        Ok(v)
    }

    /// Writes as the database does, the guard included: a write that would
    /// lower a watermark keeps the row as it is; a closed month's row
    /// refuses the whole request.
    async fn write(
        &self,
        states: &[(Key, Totals)],
        with_watermark: bool,
    ) -> anyhow::Result<WriteStats> {
        self.alive()?;
        if self.dies(Kill::Write, |s| &mut s.writes) {
            return Err(killed());
        }
        let mut s = self.inner.borrow_mut();
        Self::flip_now(&mut s);
        if let Some((k, _)) = states.iter().find(|(k, _)| s.closed.contains(&k.month)) {
            anyhow::bail!("usage_agg: {} is closed (memory store; key {k})", k.month);
        }
        let mut answered = HashMap::new();
        for (key, t) in states {
            let kept = s
                .monthly
                .get(key)
                .filter(|old| with_watermark && t.last_request_id < old.last_request_id)
                .copied();
            let now = kept.unwrap_or(*t);
            s.monthly.insert(*key, now);
            answered.insert(*key, now);
        }
        let mut stats = WriteStats {
            bulk_requests: 1,
            ..WriteStats::default()
        };
        judge(states, &answered, with_watermark, &mut stats);
        Ok(stats)
    }

    async fn probe(&self, _with_watermark: bool) -> anyhow::Result<()> {
        self.alive()
    }

    async fn installed(&self) -> anyhow::Result<bool> {
        self.alive()?;
        Ok(true)
    }

    async fn state(&self) -> anyhow::Result<Option<StateRow>> {
        self.alive()?;
        let s = self.inner.borrow();
        Ok(Some(StateRow {
            cursor_id: s.cursor,
            lease_owner: s.lease.clone(),
            last_run_outcome: s.outcome.clone(),
            ..StateRow::default()
        }))
    }

    async fn acquire(
        &self,
        owner: &str,
        _ttl: Duration,
        steal_from: Option<&str>,
    ) -> anyhow::Result<Lease> {
        self.alive()?;
        let mut s = self.inner.borrow_mut();
        let free = match &s.lease {
            None => true,
            Some(o) => o == owner || s.lease_expired || Some(o.as_str()) == steal_from,
        };
        if free {
            s.lease = Some(owner.to_string());
            s.lease_expired = false;
        }
        Ok(Lease {
            acquired: free,
            owner: s.lease.clone().unwrap_or_default(),
            blocked: false,
            prepared: Vec::new(),
            since: None,
            expires_at: None,
            cursor: s.cursor,
        })
    }

    async fn renew(&self, owner: &str, _ttl: Duration) -> anyhow::Result<bool> {
        self.alive()?;
        Ok(self.inner.borrow().lease.as_deref() == Some(owner))
    }

    async fn advance(&self, to: i64) -> anyhow::Result<i64> {
        self.alive()?;
        if self.dies(Kill::Advance, |s| &mut s.advances) {
            return Err(killed());
        }
        let mut s = self.inner.borrow_mut();
        let now = s.cursor.unwrap_or(0).max(to);
        s.cursor = Some(now);
        Ok(now)
    }

    async fn finish(&self, owner: &str, outcome: &str, _rows: u64) -> anyhow::Result<()> {
        self.alive()?;
        let mut s = self.inner.borrow_mut();
        s.outcome = Some(outcome.to_string());
        if s.lease.as_deref() == Some(owner) {
            s.lease = None;
        }
        Ok(())
    }

    async fn safe_horizon(&self, _wait: Duration) -> anyhow::Result<i64> {
        self.alive()?;
        Ok(self.inner.borrow().seq)
    }

    async fn preflight(&self) -> anyhow::Result<Facts> {
        self.alive()?;
        let s = self.inner.borrow();
        let refused: Vec<String> = s.refused.keys().take(5).map(|k| k.to_string()).collect();
        Ok(Facts {
            sequence: Some("memory.usage_requests_id_seq".into()),
            sequence_last_value: (s.seq > 0).then_some(s.seq),
            sequence_cache: Some(1),
            id_from_sequence: Some(true),
            newest_id: s.raw.keys().next_back().copied(),
            cursor: s.cursor,
            highest_watermark: s
                .monthly
                .values()
                .chain(s.late.values())
                .map(|t| t.last_request_id)
                .max(),
            refused_keys: s.refused.len() as u64,
            refused_examples: refused,
            problems: Some(Vec::new()),
            ..Facts::default()
        })
    }

    async fn rebase(&self, _owner: &str, _horizon: i64) -> anyhow::Result<Rebased> {
        self.alive()?;
        let mut s = self.inner.borrow_mut();
        let inner = &mut *s;
        for t in inner.monthly.values_mut().chain(inner.late.values_mut()) {
            t.last_request_id = 0;
        }
        s.cursor = None;
        s.refused.clear();
        Ok(Rebased {
            watermarks_reset: s.monthly.len() as i64,
            ..Rebased::default()
        })
    }

    async fn finish_rebase(&self, to: i64) -> anyhow::Result<i64> {
        self.advance(to).await
    }

    async fn record_refusals(
        &self,
        scope: &str,
        keys: &[Refusal],
        _horizon: i64,
    ) -> anyhow::Result<u64> {
        self.alive()?;
        let mut s = self.inner.borrow_mut();
        s.refused
            .retain(|k, _| scope != "all" && k.month.to_string() != scope);
        for r in keys {
            s.refused.insert(r.key, (r.stored, r.raw));
        }
        Ok(s.refused.len() as u64)
    }

    /// A stand-in for the rule book, for the job's own flow (leases, dry
    /// runs, kills, refusals): monthly rows only. Where rows go once months
    /// close, and how raced keys are counted again, are the database's
    /// (`usage_agg_book_folded`), and tested on the real stack only, so
    /// that the rules have one implementation.
    async fn book(
        &self,
        from: i64,
        to: i64,
        keys: &[(Key, Totals)],
        advance: Option<u64>,
        dry_run: bool,
    ) -> anyhow::Result<Booked> {
        self.alive()?;
        // One transaction: a kill at the write or at the cursor loses both.
        if !dry_run && self.dies(Kill::Write, |s| &mut s.writes) {
            return Err(killed());
        }
        if advance.is_some() && self.dies(Kill::Advance, |s| &mut s.advances) {
            return Err(killed());
        }
        let mut s = self.inner.borrow_mut();
        if let Some((k, _)) = keys.iter().find(|(k, _)| s.closed.contains(&k.month)) {
            anyhow::bail!("the memory store books no closed month ({k}): the database does");
        }
        let mut b = Booked::default();
        for (key, folded) in keys {
            let before = s.monthly.get(key).copied();
            let w = before.map_or(0, |t| t.last_request_id);
            let new = if w <= from {
                *folded
            } else if w >= folded.last_request_id {
                b.superseded_keys += 1;
                continue;
            } else {
                b.raced_keys += 1;
                let mut fold = Fold::default();
                for row in s.raw.range(w + 1..=to).map(|(_, r)| r) {
                    fold.add(row, |k, _| k == key);
                }
                fold.groups.get(key).copied().unwrap_or_default()
            };
            let after = before.unwrap_or_default().plus(new);
            b.keys += 1;
            b.rows += new.requests as u64;
            if dry_run {
                b.changes.push(BookedChange {
                    portal_id: key.portal_id,
                    month_year: key.month.to_string(),
                    booked_month: None,
                    before: before.map(Stated::from),
                    after: Stated::from(after),
                    counted_from: w.max(from),
                });
            } else {
                s.monthly.insert(*key, after);
            }
        }
        if let (Some(good), false) = (advance, dry_run) {
            let mut fold = Fold::default();
            for row in s.raw.range(from + 1..=to).map(|(_, r)| r) {
                fold.add(row, |_, _| true);
            }
            anyhow::ensure!(
                fold.good_rows() == good,
                "({from}, {to}] holds {} good rows, not {good} (memory store)",
                fold.good_rows()
            );
            // As usage_agg_book: every key with good rows there holds its
            // newest one.
            let short = fold
                .groups
                .iter()
                .filter(|(k, t)| {
                    s.monthly
                        .get(k)
                        .is_none_or(|m| m.last_request_id < t.last_request_id)
                })
                .count();
            anyhow::ensure!(
                short == 0,
                "{short} keys with good rows in ({from}, {to}] do not hold them yet (memory store)"
            );
            let now = s.cursor.unwrap_or(0).max(to);
            s.cursor = Some(now);
        }
        Ok(b)
    }

    async fn note_rejected(&self, _count: u64, _ids: &[i64]) -> anyhow::Result<()> {
        self.alive()
    }

    async fn restore_deleted_keys(&self) -> anyhow::Result<Vec<String>> {
        self.alive()?;
        Ok(Vec::new())
    }

    // Quotas are the database's (the rule book): none here.
    async fn record_crossings(
        &self,
        _months: Option<&[Month]>,
        _above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        self.alive()?;
        Ok(Vec::new())
    }

    async fn mark_crossings_pending(&self, _months: &[Month]) -> anyhow::Result<bool> {
        self.alive()?;
        Ok(true)
    }

    async fn sweep_pending_crossings(&self) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        self.alive()?;
        Ok(Vec::new())
    }

    async fn preview_crossings(
        &self,
        _planned: &[(Key, i64)],
        _months: &[Month],
        _above: Option<i64>,
    ) -> anyhow::Result<Vec<crate::alerts::Crossing>> {
        self.alive()?;
        Ok(Vec::new())
    }

    async fn periods(&self) -> anyhow::Result<Periods> {
        self.alive()?;
        Ok(Self::periods_now(&self.inner.borrow()))
    }

    async fn late(
        &self,
        filter: StoredFilter,
        _page_size: usize,
    ) -> anyhow::Result<HashMap<LateKey, Totals>> {
        self.alive()?;
        Ok(self
            .inner
            .borrow()
            .late
            .iter()
            .filter(|((k, _), t)| match filter {
                StoredFilter::All => true,
                StoredFilter::Month(m) => k.month == m,
                StoredFilter::WatermarkAbove(id) => t.last_request_id > id,
                StoredFilter::Portal(p) => k.portal_id == p,
            })
            .map(|(lk, t)| (*lk, *t))
            .collect())
    }

    async fn pruned(
        &self,
        _month: Option<Month>,
        _page_size: usize,
    ) -> anyhow::Result<HashMap<Key, Totals>> {
        self.alive()?;
        Ok(HashMap::new())
    }

    async fn period_info(&self, month: Month, _grace_secs: u64) -> anyhow::Result<PeriodInfo> {
        self.alive()?;
        Ok(PeriodInfo {
            valid: true,
            closed: self.inner.borrow().closed.contains(&month),
            can_close: true,
            ..PeriodInfo::default()
        })
    }

    async fn close_month(
        &self,
        month: Month,
        _grace_secs: u64,
        _by: &str,
    ) -> anyhow::Result<CloseAnswer> {
        self.alive()?;
        let mut s = self.inner.borrow_mut();
        let already = !s.closed.insert(month);
        Ok(CloseAnswer {
            closed: !already,
            already_closed: already,
            up_to_id: s.cursor,
            ..CloseAnswer::default()
        })
    }

    async fn reopen_month(
        &self,
        month: Month,
        _reason: &str,
        _by: &str,
    ) -> anyhow::Result<ReopenAnswer> {
        self.alive()?;
        let was = self.inner.borrow_mut().closed.remove(&month);
        Ok(ReopenAnswer {
            reopened: was,
            not_closed: !was,
            ..ReopenAnswer::default()
        })
    }

    async fn rpc_batch(&self, _ask: BatchAsk) -> anyhow::Result<Batch> {
        anyhow::bail!("the server-side engine runs SQL: it is tested against the real stack")
    }

    async fn run_keys(&self, _from: i64, _to: i64) -> anyhow::Result<usize> {
        anyhow::bail!("the server-side engine runs SQL: it is tested against the real stack")
    }

    async fn schedule(&self, _cron: &str, _max_seconds: u64) -> anyhow::Result<CronAnswer> {
        anyhow::bail!("pg_cron runs in the database: scheduling is tested against the real stack")
    }

    async fn unschedule(&self) -> anyhow::Result<CronAnswer> {
        anyhow::bail!("pg_cron runs in the database: scheduling is tested against the real stack")
    }

    async fn schedule_show(&self, _runs: usize) -> anyhow::Result<CronAnswer> {
        anyhow::bail!("pg_cron runs in the database: scheduling is tested against the real stack")
    }
}
