//! SQLite's WAL checkpoints, off the writer's path. A connection of its own copies committed
//! frames from the write-ahead log into the database file every [`INTERVAL`], as a `PASSIVE`
//! checkpoint (it never waits for, nor blocks, the writer or the readers), so that no commit
//! pays for one: with SQLite's automatic checkpoints every 1,000th page's commit also copied
//! the log into the database and synced it, a stall of many milliseconds that every change
//! of the batch, and every attempt whose permit was taken before it, waited for. The writer
//! still checkpoints by itself past [`WRITER_FALLBACK_PAGES`] pages, should this fall behind
//! or fail.

use std::time::Duration;

use sqlx::SqliteConnection;

/// How often committed frames are copied into the database.
pub(super) const INTERVAL: Duration = Duration::from_millis(100);

/// The writer's own `wal_autocheckpoint`: only reached when [`run`] falls behind or fails
/// (40 MiB of log).
pub(super) const WRITER_FALLBACK_PAGES: u32 = 10_000;

/// Checkpoints every [`INTERVAL`] until dropped (with the writer, which it runs beside).
pub(super) async fn run(mut conn: SqliteConnection) {
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut conn)
            .await
        {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("WAL checkpoints work again");
            }
            Ok(_) => {}
            Err(error) if !failing => {
                failing = true;
                tracing::warn!(%error, "WAL checkpoint failed; the writer checkpoints by itself meanwhile");
            }
            Err(_) => {}
        }
    }
}
