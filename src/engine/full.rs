//! The full recompute: every key from all its rows, written as absolute
//! values. O(all rows) per run, but needs nothing beyond the seed's schema,
//! and a rerun changes nothing. The incremental engine replaces it once the
//! migration is applied.

use chrono::Utc;

use super::{Change, Options, Outcome};
use crate::aggregation::Fold;
use crate::postgrest::Client;
use crate::tables::{self, RawScan};

pub async fn run(client: &Client, opts: &Options) -> anyhow::Result<Outcome> {
    let mut fold = Fold::default();
    let mut scan = RawScan::new(client, 0, None, opts.page_size);
    while let Some(page) = scan.next_page().await? {
        for row in &page {
            fold.add(row, |_| 0);
        }
        tracing::debug!(
            rows = scan.rows_read,
            keys = fold.groups.len(),
            "page folded"
        );
    }

    let stored = tables::read_all_stored(client, false, opts.page_size).await?;
    let changes: Vec<Change> = fold
        .groups
        .iter()
        .filter(|(key, new)| stored.get(key).is_none_or(|old| !old.same_values(new)))
        .map(|(key, new)| Change {
            key: *key,
            before: stored.get(key).copied(),
            after: *new,
        })
        .collect();

    let mut outcome = Outcome {
        rows_read: scan.rows_read,
        rows_counted: fold.good_rows(),
        keys_touched: fold.groups.len(),
        bad: fold.bad,
        dry_run: opts.dry_run,
        ..Outcome::default()
    };
    if !opts.dry_run && !changes.is_empty() {
        let states: Vec<_> = changes.iter().map(|c| (c.key, c.after)).collect();
        outcome.write =
            tables::write_states(client, &states, false, Utc::now().naive_utc()).await?;
    }
    outcome.changes = changes;
    Ok(outcome)
}
