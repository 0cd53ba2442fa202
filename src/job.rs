//! A run's life, from the migration check to the run record: what
//! `usage-agg aggregate` does once its arguments are turned into a [`Job`].
//! It picks the engine, holds the lease, reads the marks (cursor and safe
//! horizon), checks the assumptions first, and records how the run ended
//! (the label from [`crate::engine::Verdict`]). It knows only the
//! [`Store`], so it runs the same against PostgREST and in memory.

use std::time::Duration;

use crate::cli::AggregateArgs;
use crate::engine::rebuild::{self, Marks, Scope};
use crate::engine::Engine;
use crate::engine::{incremental, rpc, Mode, Options, Outcome, Refusals, UsageError};
use crate::exit::{self, Status};
use crate::migrations::MIGRATION_FILE;
use crate::periods::Periods;
use crate::preflight;
use crate::progress::Progress;
use crate::state::{self, LeaseHeld};
use crate::store::Store;

/// What a server-side batch aims to take when sized by time: a quarter of
/// Supabase's 8 s statement timeout, long enough that a batch writes each
/// key once for many rows (every batch writes its keys again).
const DEFAULT_BATCH_SECONDS: Duration = Duration::from_secs(2);
/// With `--aggressive`: half of Supabase's 8 s statement timeout, and the
/// first batch the fixed default (a million ids) rather than a small one.
const AGGRESSIVE_BATCH_SECONDS: Duration = Duration::from_secs(4);

/// What to run, decided from the command line once.
pub struct Job {
    /// Every key, or one month's (`--month`).
    pub scope: Scope,
    /// Recompute every key in scope (`--full`), rather than new rows only.
    pub full: bool,
    /// Reset the cursor and the watermarks first (`--rebase`).
    pub rebase: bool,
    pub engine: Engine,
    /// Ids per server-side batch.
    pub batch_ids: u64,
    pub opts: Options,
    /// Who this run is in the lease.
    pub owner: String,
    /// A dry run beside a run that holds the lease goes ahead anyway.
    pub force: bool,
}

impl Job {
    /// The run `aggregate`'s arguments ask for, resolved once: every
    /// default and every combination decided here. A catch-up run inside
    /// another command (`close`, `--auto-close`) is `aggregate` with its
    /// defaults ([`AggregateArgs::defaults`]), so the two cannot drift.
    pub fn plan(
        args: &AggregateArgs,
        progress: Progress,
        deadline: Option<std::time::Instant>,
    ) -> Job {
        Job {
            scope: args.month.map_or(Scope::All, Scope::Month),
            full: args.full,
            rebase: args.rebase,
            engine: args.engine,
            batch_ids: args.batch_ids_for(Engine::Rpc),
            opts: Options {
                dry_run: args.dry_run,
                page_size: args.scan.page_size,
                batch_rows: args.batch_ids_for(Engine::Rest),
                allow_decrease: args.allow_decrease,
                owner: None,
                lease_ttl: args.lease_ttl,
                horizon_wait: Duration::from_millis(args.horizon_wait_ms),
                progress,
                pace: crate::pace::Pace::with_deadline(args.scan.pace(args.batch_pause), deadline),
                // Server-side batches: a fixed --batch-size, or sized by
                // time (--batch-seconds, about 2 s by default).
                batch_target: match args.batch_size {
                    Some(_) => None,
                    None => Some(args.batch_seconds.unwrap_or(if args.scan.aggressive {
                        AGGRESSIVE_BATCH_SECONDS
                    } else {
                        DEFAULT_BATCH_SECONDS
                    })),
                },
            },
            owner: state::owner_id(),
            force: args.force,
        }
    }

    /// Runs the job; `warnings` collects what the operator should read even
    /// when the run succeeds.
    pub async fn run<S: Store>(
        mut self,
        store: &S,
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Outcome> {
        if self.rebase {
            self.opts.allow_decrease = true;
        }
        if !store.installed().await? {
            if self.rebase {
                return Err(UsageError(format!(
                    "--rebase resets the cursor and the watermarks, which only exist with the migrations; \
                     without them every run recomputes every key anyway: run without --rebase, or apply \
                     {MIGRATION_FILE} first"
                ))
                .into());
            }
            warnings.push(format!(
                "the usage-agg migration is not applied, so every key is recomputed from all rows (slow on big \
                 tables, and overlapping runs are not guarded); apply {MIGRATION_FILE} (`usage-agg sql | psql`)"
            ));
            return rebuild::run(store, self.scope, None, &Periods::none(), false, &self.opts)
                .await;
        }

        // Before anything is counted: the assumptions the counts rest on.
        let facts = store.preflight().await?;
        let blocking: Vec<_> = preflight::problems(&facts)
            .into_iter()
            .filter(|p| !(self.rebase && p.rebase_repairs()))
            .collect();
        if !blocking.is_empty() {
            return Err(preflight::Refused(blocking).into());
        }

        let dry_run = self.opts.dry_run;
        let cursor = if dry_run {
            // A preview of a state another run is halfway through writing
            // is wrong, and recounting its keys one by one is slow: wait.
            if !self.force {
                if let Some(held) = lease_held_by_another(store, &self.owner).await? {
                    return Err(held.into());
                }
            }
            facts.cursor
        } else {
            let cursor = take_lease(store, &self.owner, self.opts.lease_ttl, warnings).await?;
            self.opts.owner = Some(self.owner.clone());
            cursor
        };
        let result = self.count(store, cursor, &facts, warnings).await;
        // Rows rejected among rows read for the first time (incremental and
        // server-side runs, the first rebuild): --full and --month read old
        // rows again and would count them twice.
        if let Ok(o) = &result {
            let first_read = matches!(
                o.mode,
                Mode::Incremental | Mode::Rpc { .. } | Mode::Rebuild { first_run: true }
            );
            if !dry_run && first_read && o.bad.count > 0 {
                let ids: Vec<i64> = o.bad.examples.iter().map(|(id, _)| *id).collect();
                if let Err(e) = store.note_rejected(o.bad.count, &ids).await {
                    tracing::warn!("could not record the rejected rows: {e:#}");
                }
            }
        }
        if !dry_run {
            let (label, rows) = match &result {
                Ok(o) => (o.verdict().label(), o.rows_counted),
                Err(e) if exit::classify(e) == Status::TempFail => ("stopped", 0),
                Err(_) => ("failed", 0),
            };
            if let Err(e) = store.finish(&self.owner, label, rows).await {
                tracing::warn!("could not record the run's outcome: {e:#}");
            }
        }
        result
    }

    /// The counting itself, once the lease is held (or, dry, not needed).
    async fn count<S: Store>(
        &self,
        store: &S,
        cursor: Option<i64>,
        facts: &preflight::Facts,
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Outcome> {
        let opts = &self.opts;
        // The months a rebuild killed between its writes and the record of
        // their quotas' crossings left pending: recorded first, whatever
        // the cursor did (docs/quotas.md, "Where crossings are recorded").
        let swept = if opts.dry_run {
            Vec::new()
        } else {
            store.sweep_pending_crossings().await?
        };
        let horizon = store.safe_horizon(opts.horizon_wait).await?;
        // Read once: a close or a reopening during the run makes the
        // database refuse what no longer fits, and the run stop (exit 75).
        let periods = store.periods().await?;
        if self.rebase {
            let rebased = store.rebase(&self.owner, horizon).await?;
            tracing::info!(
                keys = rebased.watermarks_reset,
                "watermarks reset for the rebase"
            );
            if !rebased.closed_booked.is_empty() {
                let rows: i64 = rebased.closed_booked.iter().map(|b| b.rows).sum();
                warnings.push(format!(
                    "{} of closed months committed but never counted booked as late adjustments, \
                     on the next invoice: {}",
                    crate::output::count(rows as u64, "row", "rows"),
                    rebased
                        .closed_booked
                        .iter()
                        .take(20)
                        .map(|b| format!("{} (+{})", b.key, b.rows))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !rebased.closed_refused.is_empty() {
                warnings.push(format!(
                    "{} of closed months {} fewer raw rows than billed, so rows that arrived since \
                     cannot be told from rows that were removed: refused, and every run exits 65 \
                     until a person decides (`usage-agg reopen --month M --reason ...`, then \
                     `usage-agg aggregate --month M --allow-decrease`, then `usage-agg close`): {}",
                    crate::output::count(
                        rebased.closed_refused.len() as u64,
                        "key",
                        "keys"
                    ),
                    if rebased.closed_refused.len() == 1 {
                        "has"
                    } else {
                        "have"
                    },
                    rebased
                        .closed_refused
                        .iter()
                        .take(20)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            let marks = Marks {
                cursor: None,
                horizon,
            };
            let mut outcome =
                rebuild::run(store, Scope::All, Some(marks), &periods, true, opts).await?;
            outcome.alerts = once_each(swept.into_iter().chain(outcome.alerts).collect());
            return Ok(outcome);
        }
        let restored = if facts.deleted_keys > 0 && !opts.dry_run {
            store.restore_deleted_keys().await?
        } else {
            Vec::new()
        };
        if !restored.is_empty() {
            warnings.push(format!(
                "{} portal_usage_monthly row deleted; rebuilt from all {} rows: {}",
                crate::output::count(restored.len() as u64, "key had its", "keys had their"),
                if restored.len() == 1 { "its" } else { "their" },
                restored
                    .iter()
                    .take(20)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        // Keys above the cursor were written by a run that has not moved
        // it: one in flight, or a rebuild killed between its writes and
        // the record of their quotas' crossings. Recorded now, before
        // counting (docs/quotas.md, "Where crossings are recorded").
        let mut caught_up = swept;
        let above = match (cursor, facts.highest_watermark) {
            (Some(c), Some(w)) if w > c => Some(c),
            _ => None,
        };
        if opts.dry_run {
            // What those two would record: the pending months', and the
            // crossings of keys above the cursor.
            caught_up.extend(store.preview_crossings(&[], &[], above).await?);
        } else if let Some(c) = above {
            caught_up.extend(store.record_crossings(None, Some(c)).await?);
        }
        let marks = Marks { cursor, horizon };
        let owner = (!opts.dry_run).then_some(self.owner.as_str());
        let incremental = self.scope == Scope::All && !self.full;
        let mut outcome = match cursor {
            Some(c) if incremental && self.engine == Engine::Rpc => {
                rpc::run(store, c, owner, self.batch_ids, opts).await?
            }
            Some(c) if incremental => incremental::run(store, c, horizon, owner, opts).await?,
            _ => rebuild::run(store, self.scope, Some(marks), &periods, false, opts).await?,
        };
        if matches!(outcome.mode, Mode::Incremental | Mode::Rpc { .. }) || opts.dry_run {
            outcome.refusals_standing = Refusals {
                count: facts.refused_keys,
                lost: facts.lost_keys.unwrap_or(0),
                closed: facts.closed_refused_keys.unwrap_or(0),
                since: facts.refused_since.clone(),
                examples: facts.refused_examples.clone(),
            };
        }
        outcome.restored_keys = restored;
        outcome.alerts.splice(0..0, caught_up);
        // A dry run's previews overlap (a pending month's key, booked
        // again): each alert once, as the run would record it, first.
        outcome.alerts = once_each(std::mem::take(&mut outcome.alerts));
        outcome.pace = opts.pace.report();
        Ok(outcome)
    }
}

/// Each alert once (by portal, month, threshold and limit, the alerts'
/// UNIQUE), the first kept: the one a run records first.
fn once_each(alerts: Vec<crate::alerts::Crossing>) -> Vec<crate::alerts::Crossing> {
    let mut seen = std::collections::HashSet::new();
    alerts
        .into_iter()
        .filter(|a| {
            seen.insert((
                a.portal_id,
                a.month_year.clone(),
                a.threshold_percent,
                a.request_limit,
            ))
        })
        .collect()
}

/// The live lease of another run, if there is one (read, never taken: a
/// dry run writes nothing). Expiry is judged on this machine's clock, which
/// is enough to tell a running run from one long gone.
async fn lease_held_by_another<S: Store>(store: &S, me: &str) -> anyhow::Result<Option<LeaseHeld>> {
    let Some(s) = store.state().await? else {
        return Ok(None);
    };
    let Some(owner) = s
        .lease_owner
        .filter(|o| o != me && !state::owner_is_dead_here(o))
    else {
        return Ok(None);
    };
    let live = s.lease_expires_at.as_deref().is_none_or(|t| {
        chrono::DateTime::parse_from_rfc3339(t).is_ok_and(|t| t > chrono::Utc::now())
    });
    Ok(live.then(|| LeaseHeld {
        owner,
        since: s.lease_taken_at.unwrap_or_default(),
        expires_at: s.lease_expires_at.unwrap_or_default(),
    }))
}

/// Takes the lease, or takes it over from a run on this host whose process
/// is gone; returns the cursor.
async fn take_lease<S: Store>(
    store: &S,
    owner: &str,
    ttl: Duration,
    warnings: &mut Vec<String>,
) -> anyhow::Result<Option<i64>> {
    let lease = store.acquire(owner, ttl, None).await?;
    if lease.acquired {
        return Ok(lease.cursor);
    }
    if lease.blocked {
        return Err(state::StateBlocked {
            prepared: lease.prepared,
        }
        .into());
    }
    // Gone: a run on this host whose process is gone, or a run in the
    // database (a scheduled one) whose backend is gone.
    let gone = state::owner_is_dead_here(&lease.owner)
        || store.preflight().await?.lease_holder_gone == Some(true);
    if gone {
        let taken = store.acquire(owner, ttl, Some(&lease.owner)).await?;
        if taken.acquired {
            warnings.push(format!(
                "took over the lease from {}, whose process is gone",
                lease.owner
            ));
            return Ok(taken.cursor);
        }
    }
    Err(LeaseHeld {
        owner: lease.owner,
        since: lease.since.unwrap_or_default(),
        expires_at: lease.expires_at.unwrap_or_default(),
    }
    .into())
}

/// The contract checked in memory, in milliseconds: the same properties the
/// integration tests check against PostgreSQL (docs/semantics.md, "Traps
/// and the tests that cover them"), for the logic of the engines and the job.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregation::Month;
    use crate::engine::Verdict;
    use crate::progress::Progress;
    use crate::store::memory::{Kill, MemoryStore};

    fn job(scope: Scope, full: bool, allow_decrease: bool, batch_rows: u64) -> Job {
        Job {
            scope,
            full,
            rebase: false,
            engine: Engine::Rest,
            batch_ids: 1_000_000,
            opts: Options {
                dry_run: false,
                page_size: 7,
                batch_rows,
                allow_decrease,
                owner: None,
                lease_ttl: Duration::from_secs(600),
                horizon_wait: Duration::from_millis(10),
                progress: Progress::for_terminal(true),
                pace: crate::pace::Pace::new(crate::pace::PaceSettings::flat_out(2)),
                batch_target: None,
            },
            owner: "test@memory:1".into(),
            force: false,
        }
    }

    async fn run(store: &MemoryStore, j: Job) -> anyhow::Result<Outcome> {
        j.run(store, &mut Vec::new()).await
    }

    /// A reproducible workload: `n` rows over a few portals and months.
    fn rows(seed: u64, n: usize) -> Vec<(i64, &'static str, bool)> {
        const MONTHS: [&str; 3] = ["2025-05", "2025-06", "2025-07"];
        (0..n as u64)
            .map(|i| {
                let x = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(i.wrapping_mul(1_442_695_040_888_963_407))
                    >> 33;
                (
                    1 + (x % 5) as i64,
                    MONTHS[(x / 5 % 3) as usize],
                    x % 10 != 0,
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn the_first_run_rebuilds_and_later_runs_count_only_new_rows() {
        let store = MemoryStore::default();
        store.insert(&rows(1, 40));
        let first = run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        assert_eq!(first.mode, Mode::Rebuild { first_run: true });
        assert_eq!(store.cursor(), Some(40));
        store.insert(&rows(2, 25));
        let next = run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        assert_eq!((next.mode, next.rows_read), (Mode::Incremental, 25));
        assert_eq!(store.counts(), store.truth());
        assert!(store.consistent());
        assert_eq!(store.outcome().as_deref(), Some("ok"));
    }

    #[tokio::test]
    async fn a_run_killed_at_any_point_is_finished_by_the_next_with_every_row_counted_once() {
        let kills = (1..=4).flat_map(|n| [Kill::Page(n), Kill::Write(n), Kill::Advance(n)]);
        let mut died = 0;
        for (round, kill) in kills.enumerate() {
            let store = MemoryStore::default();
            store.insert(&rows(round as u64, 30));
            run(&store, job(Scope::All, false, false, 6)).await.unwrap();
            store.insert(&rows(100 + round as u64, 45));
            store.kill_at(kill);
            let killed = run(&store, job(Scope::All, false, false, 6)).await;
            assert!(store.consistent(), "{kill:?}: the invariant holds mid-way");
            if store.was_killed() {
                died += 1;
                assert!(killed.is_err(), "{kill:?}");
                store.restart();
            }
            run(&store, job(Scope::All, false, false, 6)).await.unwrap();
            assert_eq!(store.counts(), store.truth(), "{kill:?}");
            assert!(store.consistent(), "{kill:?}");
        }
        assert!(died >= 9, "only {died} of 12 kill points were reached");
    }

    #[tokio::test]
    async fn a_live_lease_makes_a_second_run_step_aside() {
        let store = MemoryStore::default();
        store.insert(&rows(3, 10));
        store
            .acquire("someone@elsewhere:7", Duration::from_secs(60), None)
            .await
            .unwrap();
        let err = run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap_err();
        assert_eq!(exit::classify(&err), Status::TempFail);
        assert!(store.counts().is_empty());
        store.expire_lease();
        run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        assert_eq!(store.counts(), store.truth());
    }

    #[tokio::test]
    async fn a_refused_decrease_keeps_counting_new_rows_and_is_not_a_success() {
        let store = MemoryStore::default();
        store.insert(&[(1, "2025-05", true); 5]);
        run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        store.delete_raw(&[1, 2]);
        store.insert(&[(1, "2025-05", true); 3]);
        let full = run(&store, job(Scope::All, true, false, 10)).await.unwrap();
        assert_eq!(full.verdict(), Verdict::DecreasesRefused);
        assert_eq!(store.outcome().as_deref(), Some("decreases_refused"));
        let key = *store.monthly().keys().next().unwrap();
        assert_eq!(
            store.monthly()[&key].requests,
            8,
            "5 stored, 3 new; the 2 gone stand"
        );
        // Every later run says so, and still counts.
        store.insert(&[(1, "2025-05", false)]);
        let next = run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        assert_eq!(
            (next.verdict(), store.monthly()[&key].requests),
            (Verdict::DecreasesRefused, 9)
        );
        let fixed = run(&store, job(Scope::All, true, true, 10)).await.unwrap();
        assert_eq!(fixed.verdict(), Verdict::Ok);
        assert_eq!(store.counts(), store.truth());
    }

    #[tokio::test]
    async fn a_month_rebuild_lowers_only_its_month_and_only_when_allowed() {
        let store = MemoryStore::default();
        store.insert(&[
            (1, "2025-05", true),
            (1, "2025-05", true),
            (2, "2025-06", true),
        ]);
        run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        store.delete_raw(&[1]);
        let june = Month {
            year: 2025,
            month: 6,
        };
        let may = Month {
            year: 2025,
            month: 5,
        };
        let o = run(&store, job(Scope::Month(june), false, true, 10))
            .await
            .unwrap();
        assert_eq!(o.verdict(), Verdict::Ok, "June has nothing to lower");
        let o = run(&store, job(Scope::Month(may), false, false, 10))
            .await
            .unwrap();
        assert_eq!(
            (o.verdict(), o.refused_decreases.len()),
            (Verdict::DecreasesRefused, 1)
        );
        run(&store, job(Scope::Month(may), false, true, 10))
            .await
            .unwrap();
        assert_eq!(store.counts(), store.truth());
        assert!(store.consistent());
    }

    #[tokio::test]
    async fn a_dry_run_beside_a_held_lease_waits_unless_forced() {
        let store = MemoryStore::default();
        store.insert(&rows(5, 20));
        run(&store, job(Scope::All, false, false, 10))
            .await
            .unwrap();
        store.insert(&rows(6, 5));
        store
            .acquire("cron@elsewhere:9", Duration::from_secs(60), None)
            .await
            .unwrap();
        let mut dry = job(Scope::All, false, false, 10);
        dry.opts.dry_run = true;
        let err = run(&store, dry).await.unwrap_err();
        assert_eq!(exit::classify(&err), Status::TempFail);
        let mut forced = job(Scope::All, false, false, 10);
        forced.opts.dry_run = true;
        forced.force = true;
        assert_eq!(run(&store, forced).await.unwrap().rows_read, 5);
    }

    #[tokio::test]
    async fn a_dry_run_writes_nothing_and_takes_no_lease() {
        let store = MemoryStore::default();
        store.insert(&rows(4, 20));
        let mut dry = job(Scope::All, false, false, 10);
        dry.opts.dry_run = true;
        let o = run(&store, dry).await.unwrap();
        assert!(o.keys_changed > 0);
        assert!(store.monthly().is_empty());
        assert_eq!((store.cursor(), store.outcome()), (None, None));
    }
}
