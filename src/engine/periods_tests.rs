//! Closed months in memory (docs/semantics.md, "Closed months"): rows of a
//! closed month go to its late adjustment booked in the open month, never
//! to its frozen monthly row, exactly once, whatever kills, reopenings and
//! closes land in between; rebuilds leave closed months alone. The same
//! properties are checked against PostgreSQL in tests/it/billing.rs.

use std::time::Duration;

use crate::aggregation::{Key, Month};
use crate::cli::Engine;
use crate::engine::rebuild::{self, Marks, Scope};
use crate::engine::{Options, Outcome, Verdict};
use crate::exit::{self, Status};
use crate::job::Job;
use crate::periods::Periods;
use crate::progress::Progress;
use crate::store::memory::{Kill, MemoryStore};
use crate::store::Store;

fn m(s: &str) -> Month {
    Month::parse(s).unwrap()
}

fn job(scope: Scope, full: bool, batch_rows: u64) -> Job {
    Job {
        scope,
        full,
        rebase: false,
        engine: Engine::Rest,
        batch_ids: 1_000_000,
        opts: Options {
            dry_run: false,
            page_size: 5,
            batch_rows,
            allow_decrease: false,
            owner: None,
            lease_ttl: Duration::from_secs(600),
            horizon_wait: Duration::from_millis(10),
            progress: Progress::for_terminal(true),
            pace: crate::pace::Pace::new(crate::pace::PaceSettings::flat_out(2)),
            batch_target: None,
        },
        owner: "test@memory:2".into(),
        force: false,
    }
}

async fn run(store: &MemoryStore, j: Job) -> anyhow::Result<Outcome> {
    j.run(store, &mut Vec::new()).await
}

async fn incremental(store: &MemoryStore) -> Outcome {
    run(store, job(Scope::All, false, 6)).await.unwrap()
}

/// `n` rows over 4 portals and the months given, reproducibly.
fn rows(seed: u64, n: usize, months: &[&'static str]) -> Vec<(i64, &'static str, bool)> {
    (0..n as u64)
        .map(|i| {
            let x = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(i.wrapping_mul(1_442_695_040_888_963_407))
                >> 33;
            (
                1 + (x % 4) as i64,
                months[(x / 4 % months.len() as u64) as usize],
                x % 7 != 0,
            )
        })
        .collect()
}

/// No drift anywhere: what `verify` checks (monthly plus late adjustments
/// against the raw rows, every month).
async fn verified(store: &MemoryStore) -> bool {
    let cursor = store.cursor();
    let periods = store.periods().await.unwrap();
    let rc = rebuild::recount(
        store,
        Scope::All,
        Some(Marks {
            cursor,
            horizon: cursor.unwrap_or(0),
        }),
        &periods,
        5,
        &crate::pace::Pace::new(crate::pace::PaceSettings::flat_out(1)),
        &Progress::for_terminal(true),
        None,
    )
    .await
    .unwrap();
    rc.drift(true).is_empty()
}

#[tokio::test]
async fn rows_of_a_closed_month_become_its_late_adjustment_booked_in_the_open_month() {
    let store = MemoryStore::default();
    store.insert(&rows(1, 40, &["2025-05", "2025-06"]));
    incremental(&store).await;
    store.close(m("2025-05"));
    let frozen: Vec<_> = store
        .monthly()
        .into_iter()
        .filter(|(k, _)| k.month == m("2025-05"))
        .collect();

    store.insert(&rows(2, 30, &["2025-05", "2025-06", "2025-07"]));
    let o = incremental(&store).await;
    assert_eq!(o.verdict(), Verdict::Ok);
    let late = store.late_adjustments();
    assert!(!late.is_empty());
    assert!(
        late.keys()
            .all(|(k, booked)| k.month == m("2025-05") && *booked == m("2025-06")),
        "{late:?}"
    );
    assert_eq!(
        o.late.rows,
        late.values().map(|t| t.requests).sum::<i64>() as u64
    );
    let still: Vec<_> = store
        .monthly()
        .into_iter()
        .filter(|(k, _)| k.month == m("2025-05"))
        .collect();
    assert_eq!(still, frozen, "a closed month's monthly rows never change");
    assert_eq!(store.counts(), store.truth());
    assert!(store.consistent() && verified(&store).await);

    // Closing June moves the booking month: May's late rows now go to July.
    store.close(m("2025-06"));
    store.insert(&rows(3, 30, &["2025-05", "2025-06"]));
    incremental(&store).await;
    let booked: std::collections::BTreeSet<_> =
        store.late_adjustments().keys().map(|(_, b)| *b).collect();
    assert_eq!(booked, [m("2025-06"), m("2025-07")].into());
    assert_eq!(store.counts(), store.truth());
    assert!(store.consistent() && verified(&store).await);
}

#[tokio::test]
async fn a_run_killed_anywhere_on_the_adjustment_path_is_finished_by_the_next_exactly_once() {
    let kills = (1..=4).flat_map(|n| [Kill::Page(n), Kill::Write(n), Kill::Advance(n)]);
    let mut died = 0;
    for (round, kill) in kills.enumerate() {
        let store = MemoryStore::default();
        store.insert(&rows(round as u64, 30, &["2025-05", "2025-06"]));
        incremental(&store).await;
        store.close(m("2025-05"));
        // Late and current rows, in batches of 6 ids: several writes of
        // both kinds, each followed by a cursor move.
        store.insert(&rows(100 + round as u64, 45, &["2025-05", "2025-06"]));
        store.kill_at(kill);
        let killed = run(&store, job(Scope::All, false, 6)).await;
        assert!(store.consistent(), "{kill:?}: the invariant holds mid-way");
        if store.was_killed() {
            died += 1;
            assert!(killed.is_err(), "{kill:?}");
            store.restart();
        }
        store.insert(&rows(200 + round as u64, 7, &["2025-05"]));
        incremental(&store).await;
        assert_eq!(store.counts(), store.truth(), "{kill:?}");
        assert!(store.consistent() && verified(&store).await, "{kill:?}");
    }
    assert!(died >= 9, "only {died} of 12 kill points were reached");
}

#[tokio::test]
async fn a_month_closed_while_a_run_counts_it_stops_the_run_and_the_next_books_its_rows_late() {
    let store = MemoryStore::default();
    store.insert(&rows(4, 20, &["2025-05"]));
    incremental(&store).await;
    store.insert(&rows(5, 10, &["2025-05"]));
    let before = store.monthly();
    store.flip_before_next_write(m("2025-05"), true);
    let err = run(&store, job(Scope::All, false, 100)).await.unwrap_err();
    assert_eq!(exit::classify(&err), Status::TempFail, "{err:#}");
    assert!(
        format!("{err:#}").contains("closed months changed"),
        "{err:#}"
    );
    assert_eq!(store.monthly(), before, "nothing written");
    let o = incremental(&store).await;
    assert_eq!(o.late.rows, 10);
    assert_eq!(store.monthly(), before);
    assert_eq!(store.counts(), store.truth());
}

#[tokio::test]
async fn a_month_reopened_while_a_run_books_it_late_stops_the_run_and_nothing_counts_twice() {
    let store = MemoryStore::default();
    store.insert(&rows(6, 20, &["2025-05"]));
    incremental(&store).await;
    store.close(m("2025-05"));
    store.insert(&rows(7, 10, &["2025-05"]));
    incremental(&store).await;
    store.insert(&rows(8, 10, &["2025-05"]));
    store.flip_before_next_write(m("2025-05"), false);
    let err = run(&store, job(Scope::All, false, 100)).await.unwrap_err();
    assert_eq!(exit::classify(&err), Status::TempFail, "{err:#}");
    // Open again: its new rows go to the monthly row, counted above the
    // late adjustment's watermark, so none of them twice.
    incremental(&store).await;
    assert_eq!(store.counts(), store.truth());
    assert!(store.consistent() && verified(&store).await);
    assert_eq!(
        store
            .late_adjustments()
            .values()
            .map(|t| t.requests)
            .sum::<i64>(),
        10
    );
}

#[tokio::test]
async fn rebuilds_leave_closed_months_alone_and_subtract_late_rows_of_a_reopened_one() {
    let store = MemoryStore::default();
    store.insert(&rows(9, 40, &["2025-05", "2025-06"]));
    incremental(&store).await;
    store.close(m("2025-05"));
    store.insert(&rows(10, 20, &["2025-05", "2025-06"]));
    incremental(&store).await;
    let may: Vec<_> = store
        .monthly()
        .into_iter()
        .filter(|(k, _)| k.month == m("2025-05"))
        .collect();

    let full = run(&store, job(Scope::All, true, 6)).await.unwrap();
    assert_eq!(full.closed_left_alone, vec![m("2025-05")]);
    assert_eq!(full.verdict(), Verdict::Ok, "{:?}", full.refused_decreases);
    let month = run(&store, job(Scope::Month(m("2025-05")), false, 6))
        .await
        .unwrap();
    assert_eq!(
        (month.closed_left_alone.clone(), month.rows_read),
        (vec![m("2025-05")], 0)
    );
    let after: Vec<_> = store
        .monthly()
        .into_iter()
        .filter(|(k, _)| k.month == m("2025-05"))
        .collect();
    assert_eq!(after, may);
    assert_eq!(store.counts(), store.truth());

    // Reopened: a rebuild brings its monthly rows to their rows minus the
    // late adjustments, which stay as booked.
    store.reopen(m("2025-05"));
    let o = run(&store, job(Scope::Month(m("2025-05")), false, 6))
        .await
        .unwrap();
    assert_eq!(o.verdict(), Verdict::Ok);
    assert!(o.drift.is_empty(), "{:?}", o.drift);
    assert_eq!(store.counts(), store.truth());
    store.insert(&rows(11, 12, &["2025-05"]));
    incremental(&store).await;
    run(&store, job(Scope::All, true, 6)).await.unwrap();
    assert_eq!(store.counts(), store.truth());
    assert!(store.consistent() && verified(&store).await);
}

#[tokio::test]
async fn verify_sees_a_late_adjustment_that_disagrees_with_its_rows() {
    let store = MemoryStore::default();
    store.insert(&rows(12, 20, &["2025-05"]));
    incremental(&store).await;
    store.close(m("2025-05"));
    store.insert(&[(1, "2025-05", true), (1, "2025-05", true)]);
    incremental(&store).await;
    assert!(verified(&store).await);
    // A late row deleted after it was counted: stored above its rows.
    let newest = store.cursor().unwrap();
    store.delete_raw(&[newest]);
    assert!(!verified(&store).await);
    let k = Key {
        portal_id: 1,
        month: m("2025-05"),
    };
    assert!(Periods::new([m("2025-05")]).is_closed(k.month));
}
