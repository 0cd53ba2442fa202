//! The job's state in the database, as the migration defines it: the cursor,
//! the lease, the safe horizon and the run record, all through RPCs so that
//! every time is the database's clock.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use serde_json::json;

use crate::config::JOB;
use crate::postgrest::{Client, Failure, Idempotent, Kind, Query};

pub const STATE_TABLE: &str = "usage_aggregation_state";

/// Whether the rejected-rows tally (the newest migration's columns) is
/// there: a read of one of its columns, answered 42703 when it is not.
pub async fn rejected_tally_installed(client: &Client) -> anyhow::Result<bool> {
    let q: Query = vec![
        ("select".into(), "rejected_rows".into()),
        ("limit".into(), "1".into()),
    ];
    match client.select::<serde_json::Value>(STATE_TABLE, &q).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == Kind::MissingColumn => Ok(false),
        Err(e) => Err(e).context("reading the rejected-rows tally"),
    }
}
/// Whether the adjust-rules migration is there (the bound on manual
/// adjustments, and the months they may be booked in): its
/// `usage_agg_adjust_bound`, answered 404 when it is not.
pub async fn adjust_rules_installed(client: &Client) -> anyhow::Result<bool> {
    match client
        // Idempotent: it only reads.
        .rpc::<_, i64>("usage_agg_adjust_bound", &json!({}), Idempotent::Yes)
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == Kind::MissingFunction => Ok(false),
        Err(e) => {
            Err(e).context("reading the bound on manual adjustments (usage_agg_adjust_bound)")
        }
    }
}
/// What `usage_agg_supabase_facts` answers, for `doctor`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct SupabaseFacts {
    pub migrations_owner: Option<String>,
    pub table_owners: std::collections::BTreeMap<String, String>,
    pub rls: std::collections::BTreeMap<String, bool>,
    pub open_policies: Vec<String>,
    pub grant_leaks: Vec<String>,
    pub api_statement_timeout: Option<String>,
    pub cron_statement_timeout: Option<crate::schedule::StatementTimeout>,
}

/// The facts of a Supabase project around the migrations (a read).
pub async fn supabase_facts(client: &Client) -> anyhow::Result<SupabaseFacts> {
    client
        .rpc(
            "usage_agg_supabase_facts",
            &json!({"p_job": JOB}),
            Idempotent::Yes,
        )
        .await
        .context("reading the project's owners, row level security and grants (usage_agg_supabase_facts)")
}

/// The lease a run tried to take, and who had it.
#[derive(Debug, Clone, Deserialize)]
pub struct Lease {
    pub acquired: bool,
    /// Empty when `blocked`.
    #[serde(default)]
    pub owner: String,
    /// A transaction held the job's state row past the lock timeout.
    #[serde(default)]
    pub blocked: bool,
    /// With `blocked`: the prepared transactions there are.
    #[serde(default)]
    pub prepared: Vec<String>,
    pub since: Option<String>,
    pub expires_at: Option<String>,
    /// None until the first incremental run finishes: the next run rebuilds.
    pub cursor: Option<i64>,
}

/// Another run holds the lease: exit 75, try later.
#[derive(Debug, thiserror::Error)]
#[error("another run holds the lease: {owner}, since {since}, until {expires_at} (database time); it is doing this work")]
pub struct LeaseHeld {
    pub owner: String,
    pub since: String,
    pub expires_at: String,
}

/// A transaction that has not ended holds the job's state row: one that
/// inserted a row at or below the cursor (the trigger that records the
/// reset wrote the row, and holds it until the transaction ends). Exit 75:
/// nothing was counted; the message says which transaction to end.
#[derive(Debug, thiserror::Error)]
#[error(
    "the job's state row is held by a transaction that has not ended, most likely one that inserted a row at or \
     below the cursor (the trigger that records such a row wrote it){}; nothing was counted. End that \
     transaction: COMMIT PREPARED or ROLLBACK PREPARED a prepared one, or find the open session in \
     pg_stat_activity; then `usage-agg aggregate --rebase` repairs the reset it recorded",
    if prepared.is_empty() { String::new() } else { format!(" (prepared transactions: {})", prepared.join(", ")) }
)]
pub struct StateBlocked {
    pub prepared: Vec<String>,
}

/// Writers stayed in flight past the wait: nothing new can be counted safely.
#[derive(Debug, thiserror::Error)]
#[error(
    "{writers} transactions writing usage_requests were still open after {waited_ms} ms{}, so no id above the \
     cursor is known to be complete; nothing new was counted. If this repeats, look for transactions left \
     open (pg_stat_activity, state 'idle in transaction'; pg_prepared_xacts, then COMMIT PREPARED or \
     ROLLBACK PREPARED)",
    if *prepared > 0 { format!(" ({prepared} of them prepared, two-phase transactions)") } else { String::new() }
)]
pub struct HorizonNotSafe {
    pub writers: i64,
    pub prepared: i64,
    pub waited_ms: u64,
}

#[derive(Debug, Deserialize)]
struct HorizonAnswer {
    horizon: Option<i64>,
    #[serde(default)]
    writers_in_flight: i64,
    #[serde(default)]
    prepared_in_flight: i64,
}

/// A row of usage_aggregation_state (times as PostgREST sends timestamptz).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StateRow {
    pub cursor_id: Option<i64>,
    #[serde(default)]
    pub lease_owner: Option<String>,
    #[serde(default)]
    pub lease_taken_at: Option<String>,
    #[serde(default)]
    pub lease_expires_at: Option<String>,
    #[serde(default)]
    pub last_run_started_at: Option<String>,
    #[serde(default)]
    pub last_run_finished_at: Option<String>,
    #[serde(default)]
    pub last_run_outcome: Option<String>,
    #[serde(default)]
    pub last_run_rows: Option<i64>,
    #[serde(default)]
    pub last_success_at: Option<String>,
    /// Rows rejected as bad data over all runs, and the first ids.
    #[serde(default)]
    pub rejected_rows: Option<i64>,
    #[serde(default)]
    pub rejected_ids: Option<Vec<i64>>,
    /// Who ran the last run: a lease owner (`usage-agg@<host>:<pid>`, or
    /// `pg_cron@<database>:<pid>` for a scheduled run). With the schedule
    /// migration.
    #[serde(default)]
    pub last_run_by: Option<String>,
}

/// The job's state over a client.
pub struct JobState<'a> {
    client: &'a Client,
}

impl<'a> JobState<'a> {
    pub fn new(client: &'a Client) -> Self {
        JobState { client }
    }

    /// Whether the migration is applied: its state table answers. A missing
    /// table is PGRST205 (PostgREST 12+) or 42P01 (older), both 404.
    pub async fn installed(&self) -> anyhow::Result<bool> {
        let q: Query = vec![
            ("select".into(), "job".into()),
            ("limit".into(), "1".into()),
        ];
        match self
            .client
            .select::<serde_json::Value>(STATE_TABLE, &q)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == Kind::MissingTable => Ok(false),
            Err(e) => Err(e).context("checking whether the usage-agg migration is applied"),
        }
    }

    /// The state row, if a run ever made one.
    pub async fn read(&self) -> anyhow::Result<Option<StateRow>> {
        let q: Query = vec![("job".into(), format!("eq.{JOB}"))];
        let rows: Vec<StateRow> = self
            .client
            .select(STATE_TABLE, &q)
            .await
            .context("reading the job state")?;
        Ok(rows.into_iter().next())
    }

    pub async fn acquire(
        &self,
        owner: &str,
        ttl: Duration,
        steal_from: Option<&str>,
    ) -> anyhow::Result<Lease> {
        let mut args = json!({"p_job": JOB, "p_owner": owner, "p_ttl_seconds": ttl.as_secs()});
        // Left out rather than sent as null, for its DEFAULT NULL to apply
        // (docs/postgrest.md, "Calling functions").
        if let Some(from) = steal_from {
            args["p_steal_from"] = json!(from);
        }
        self.client
            // Idempotent: taking the lease again for the same owner is a renewal.
            .rpc("usage_agg_acquire_lease", &args, Idempotent::Yes)
            .await
            .context("taking the lease")
    }

    /// False when the lease was lost (expired and taken by another run).
    pub async fn renew(&self, owner: &str, ttl: Duration) -> anyhow::Result<bool> {
        let args = json!({"p_job": JOB, "p_owner": owner, "p_ttl_seconds": ttl.as_secs()});
        self.client
            // Idempotent: it sets an expiry from now.
            .rpc("usage_agg_renew_lease", &args, Idempotent::Yes)
            .await
            .context("renewing the lease")
    }

    /// Moves the cursor to `to` unless it is already further; returns where it is.
    pub async fn advance(&self, to: i64) -> anyhow::Result<i64> {
        let args = json!({"p_job": JOB, "p_cursor": to});
        self.client
            // Idempotent: greatest(cursor, to).
            .rpc("usage_agg_advance_cursor", &args, Idempotent::Yes)
            .await
            .context("moving the cursor")
    }

    pub async fn finish(&self, owner: &str, outcome: &str, rows: u64) -> Result<(), Failure> {
        let args = json!({"p_job": JOB, "p_owner": owner, "p_outcome": outcome, "p_rows": rows});
        self.client
            // Idempotent: it sets the same record again.
            .rpc::<_, serde_json::Value>("usage_agg_finish_run", &args, Idempotent::Yes)
            .await
            .map(drop)
    }

    /// The highest id below which every transaction has ended (docs/semantics.md,
    /// "The safe horizon"), waiting at most `wait` for writers in flight.
    pub async fn safe_horizon(&self, wait: Duration) -> anyhow::Result<i64> {
        let args = json!({"max_wait_ms": wait.as_millis() as u64});
        let answer: HorizonAnswer = self
            .client
            // Idempotent: it only reads.
            .rpc("usage_agg_safe_horizon", &args, Idempotent::Yes)
            .await
            .context("reading the safe horizon")?;
        answer.horizon.ok_or_else(|| {
            HorizonNotSafe {
                writers: answer.writers_in_flight,
                prepared: answer.prepared_in_flight,
                waited_ms: wait.as_millis() as u64,
            }
            .into()
        })
    }
}

impl JobState<'_> {
    /// The facts a run checks before counting (docs/semantics.md,
    /// "Assumptions"); [`crate::preflight`] judges them.
    pub async fn preflight(&self) -> anyhow::Result<crate::preflight::Facts> {
        self.client
            // Idempotent: it only reads.
            .rpc(
                "usage_agg_preflight",
                &json!({"p_job": JOB}),
                Idempotent::Yes,
            )
            .await
            .context("checking the job's assumptions (usage_agg_preflight)")
    }

    /// Ends a rebase: the cursor to `to`, the recorded reset cleared.
    pub async fn finish_rebase(&self, to: i64) -> anyhow::Result<i64> {
        self.client
            // Idempotent: greatest(cursor, to), and the flag cleared again.
            .rpc(
                "usage_agg_finish_rebase",
                &json!({"p_job": JOB, "p_cursor": to}),
                Idempotent::Yes,
            )
            .await
            .context("finishing the rebase")
    }

    /// Replaces the refused keys of a rebuild's scope (`all`, or one month
    /// as `YYYY-MM`); returns how many stand in all.
    pub async fn record_refusals(
        &self,
        scope: &str,
        keys: &[crate::booking::Refusal],
        horizon: i64,
    ) -> anyhow::Result<u64> {
        let keys: Vec<_> = keys
            .iter()
            .map(|r| {
                json!({"portal_id": r.key.portal_id, "month_year": r.key.month.to_string(),
                       "stored_requests": r.stored, "raw_requests": r.raw, "kind": r.kind.label()})
            })
            .collect();
        self.client
            // Idempotent: it replaces the scope's list with the same list.
            .rpc(
                "usage_agg_record_refusals",
                &json!({"p_job": JOB, "p_scope": scope, "p_keys": keys, "p_horizon": horizon}),
                Idempotent::Yes,
            )
            .await
            .context("recording the keys whose decrease was refused")
    }

    /// Adds a run's rejected rows to the job's tally.
    pub async fn note_rejected(&self, count: u64, ids: &[i64]) -> anyhow::Result<()> {
        self.client
            // Not idempotent (it adds), and a lost answer only costs the tally.
            .rpc::<_, serde_json::Value>(
                "usage_agg_note_rejected",
                &json!({"p_job": JOB, "p_count": count, "p_ids": ids}),
                Idempotent::No,
            )
            .await
            .context("recording the rows rejected")?;
        Ok(())
    }

    /// Rebuilds the keys whose monthly row was deleted, from all their rows
    /// up to the cursor; returns them as `portal:month`.
    pub async fn restore_deleted_keys(&self) -> anyhow::Result<Vec<String>> {
        self.client
            // Idempotent: the log is emptied in the same transaction.
            .rpc(
                "usage_agg_restore_deleted_keys",
                &json!({"p_job": JOB}),
                Idempotent::Yes,
            )
            .await
            .context("rebuilding keys whose monthly row was deleted")
    }
}

impl JobState<'_> {
    /// pg_cron: installs or updates the job `usage-agg-<job>` running
    /// `usage_agg_run_scheduled(max_seconds)` on the `cron` expression.
    pub async fn schedule(
        &self,
        cron: &str,
        max_seconds: u64,
    ) -> anyhow::Result<crate::schedule::CronAnswer> {
        self.client
            // Idempotent: cron.schedule updates the job of the same name.
            .rpc(
                "usage_agg_schedule",
                &json!({"p_job": JOB, "p_schedule": cron, "p_max_seconds": max_seconds}),
                Idempotent::Yes,
            )
            .await
            .context("scheduling the job with pg_cron (usage_agg_schedule)")
    }

    /// pg_cron: removes the job, if there is one.
    pub async fn unschedule(&self) -> anyhow::Result<crate::schedule::CronAnswer> {
        self.client
            // Idempotent: a second call finds no job and says so.
            .rpc(
                "usage_agg_unschedule",
                &json!({"p_job": JOB}),
                Idempotent::Yes,
            )
            .await
            .context("removing the pg_cron job (usage_agg_unschedule)")
    }

    /// pg_cron: the job and its last `runs` runs, newest first.
    pub async fn schedule_show(&self, runs: usize) -> anyhow::Result<crate::schedule::CronAnswer> {
        self.client
            // Idempotent: it only reads.
            .rpc(
                "usage_agg_schedule_show",
                &json!({"p_job": JOB, "p_runs": runs}),
                Idempotent::Yes,
            )
            .await
            .context("reading the pg_cron job (usage_agg_schedule_show)")
    }
}

/// Who a run is, in the lease: `usage-agg@<host>:<pid>`, enough for an
/// operator to find it, and for a later run on the same host to see that
/// the process is gone.
pub fn owner_id() -> String {
    format!(
        "usage-agg@{}:{}",
        crate::config::hostname(),
        std::process::id()
    )
}

/// Whether `owner` is a run on this host whose process no longer exists, so
/// its lease can be taken over at once rather than at expiry (after a crash,
/// a kill -9 or a reboot).
pub fn owner_is_dead_here(owner: &str) -> bool {
    let Some(rest) = owner.strip_prefix("usage-agg@") else {
        return false;
    };
    let Some((host, pid)) = rest.rsplit_once(':') else {
        return false;
    };
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    host == crate::config::hostname()
        && pid != std::process::id()
        && !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_local_owner_is_recognised_and_a_live_or_remote_one_is_not() {
        let me = owner_id();
        assert!(!owner_is_dead_here(&me), "this process is alive");
        let dead = format!("usage-agg@{}:{}", crate::config::hostname(), u32::MAX - 7);
        assert!(owner_is_dead_here(&dead));
        assert!(!owner_is_dead_here(&format!(
            "usage-agg@elsewhere:{}",
            u32::MAX - 7
        )));
        assert!(!owner_is_dead_here("someone"));
    }
}
