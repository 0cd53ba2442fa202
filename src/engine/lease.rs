//! Keeping the lease through long waits. A run renews its lease every
//! third of its life; a paced scan or a rest between batches can wait
//! longer than that for one page or one batch, so waits go through
//! [`Keeper::wait`], which renews while it waits. A lease another run took
//! meanwhile stops the run ([`LeaseLost`], exit 75): what it wrote is
//! correct, and the guard keeps its late writes from undoing newer ones.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Store;

/// The lease was lost mid-run (it expired and another run took it): stop at
/// the next safe point. What was written is correct; exit 75.
#[derive(Debug, thiserror::Error)]
#[error("the lease expired during the run and another run took it over; stopped after moving the cursor to {cursor}")]
pub struct LeaseLost {
    pub cursor: i64,
}

pub struct Keeper<'a, S> {
    store: &'a S,
    /// The holder, None for a dry run (which holds no lease).
    owner: Option<&'a str>,
    ttl: Duration,
    renewed: Instant,
}

impl<'a, S: Store> Keeper<'a, S> {
    pub fn new(store: &'a S, owner: Option<&'a str>, ttl: Duration) -> Self {
        Keeper {
            store,
            owner,
            ttl,
            renewed: Instant::now(),
        }
    }

    fn due(&self) -> Instant {
        self.renewed + self.ttl / 3
    }

    /// Renews now; `cursor` is where the run stands, for the error.
    pub async fn renew(&mut self, cursor: i64) -> anyhow::Result<()> {
        let Some(owner) = self.owner else {
            return Ok(());
        };
        if !self.store.renew(owner, self.ttl).await? {
            return Err(LeaseLost { cursor }.into());
        }
        self.renewed = Instant::now();
        Ok(())
    }

    /// Renews when a third of the lease has passed since the last renewal.
    pub async fn renew_if_due(&mut self, cursor: i64) -> anyhow::Result<()> {
        if self.owner.is_some() && Instant::now() >= self.due() {
            self.renew(cursor).await?;
        }
        Ok(())
    }

    /// Awaits `work`, renewing the lease as often as it is due meanwhile.
    pub async fn wait<T>(
        &mut self,
        cursor: i64,
        work: impl Future<Output = T>,
    ) -> anyhow::Result<T> {
        tokio::pin!(work);
        loop {
            if self.owner.is_none() {
                return Ok(work.await);
            }
            tokio::select! {
                out = &mut work => return Ok(out),
                _ = tokio::time::sleep_until(self.due()) => self.renew(cursor).await?,
            }
        }
    }

    /// Rests `how_long`, keeping the lease.
    pub async fn rest(&mut self, cursor: i64, how_long: Duration) -> anyhow::Result<()> {
        self.wait(cursor, tokio::time::sleep(how_long)).await
    }
}
