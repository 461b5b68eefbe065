//! Changes committed by other replicas, heard through PostgreSQL's `LISTEN`/`NOTIFY`.
//!
//! Each replica's writer sends one notification per changed job in the transaction that
//! changes it (so it is delivered at commit, and never for a rollback). Every replica listens:
//! a job another replica left waiting announces its client to this replica's dispatcher after
//! [`REMOTE_WORK_DELAY`] (the replica that submitted it dispatches it at once; the others take
//! it if it is still waiting then, rather than all racing for every job), and a
//! job someone here watches (an `Exchange` or `WatchJob` on this replica) is read back and
//! published on the local [`JobFeed`], so a caller learns promptly of a job another replica
//! ran. When the listening connection is lost, notifications are missed: once it is back,
//! every waiting client is announced again and every watched job re-read.

use std::{collections::HashSet, str::FromStr, sync::Arc, time::Duration};

use sqlx::postgres::{PgConnectOptions, PgListener, PgNotification, PgPoolOptions};

use super::{Store, feed::JobFeed};
use crate::domain::job::{Job, JobId, JobState};

/// The channel every replica's writer notifies and every replica listens on.
pub(super) const CHANNEL: &str = "token_broker_jobs";

/// How long to wait before listening again after the connection failed.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// How long after another replica left work waiting this replica looks at it too.
const REMOTE_WORK_DELAY: Duration = Duration::from_millis(50);

/// A notification's payload: who committed the change, and what the listeners need to know
/// without reading the job. The client id comes last: it may contain spaces.
pub(super) fn payload(instance: &str, job: &Job) -> String {
    format!(
        "{instance} {} {} {}",
        job.id,
        job.state.as_str(),
        job.client_id
    )
}

/// A payload from another replica, read back.
#[derive(Debug, PartialEq, Eq)]
struct Change<'a> {
    origin: &'a str,
    job_id: JobId,
    state: JobState,
    client_id: &'a str,
}

fn parse(payload: &str) -> Option<Change<'_>> {
    let mut parts = payload.splitn(4, ' ');
    Some(Change {
        origin: parts.next()?,
        job_id: JobId::from_str(parts.next()?).ok()?,
        state: JobState::from_str(parts.next()?).ok()?,
        client_id: parts.next()?,
    })
}

/// Listens until the process ends. `instance` is this process's name in the payloads its own
/// writer sends, which it skips.
pub(super) async fn run(
    options: PgConnectOptions,
    instance: Arc<str>,
    store: Store,
    feed: Arc<JobFeed>,
) {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(options);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for other replicas' changes; retrying");
                tokio::time::sleep(RETRY_PAUSE).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(%error, "cannot listen for other replicas' changes; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        // Whatever was committed while nobody listened (at start, or after a lost connection)
        // is caught up from the database.
        resync(&store, &feed).await;
        // Clients other replicas left work waiting for, announced together REMOTE_WORK_DELAY
        // after the first of them.
        let mut remote_work = RemoteWork::default();
        loop {
            let due = remote_work.due();
            let received = tokio::select! {
                received = listener.try_recv() => received,
                () = tokio::time::sleep_until(due.unwrap_or_else(tokio::time::Instant::now)),
                    if due.is_some() =>
                {
                    for client in remote_work.take() {
                        feed.work().announce(&client);
                    }
                    continue;
                }
            };
            match received {
                Ok(Some(notification)) => {
                    hear(&notification, &instance, &store, &feed, &mut remote_work).await
                }
                Ok(None) => {
                    tracing::warn!("lost the connection listening for other replicas' changes");
                    // The next receive reconnects and listens again; catch up first.
                    resync(&store, &feed).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "listening for other replicas' changes failed");
                    tokio::time::sleep(RETRY_PAUSE).await;
                    break;
                }
            }
        }
    }
}

/// Clients other replicas left work waiting for, not yet announced here.
#[derive(Debug, Default)]
struct RemoteWork {
    clients: HashSet<String>,
    /// When the first of them arrived.
    since: Option<tokio::time::Instant>,
}

impl RemoteWork {
    fn add(&mut self, client_id: &str) {
        if !self.clients.contains(client_id) {
            self.clients.insert(client_id.to_string());
        }
        self.since.get_or_insert_with(tokio::time::Instant::now);
    }

    /// When they are to be announced; `None` when there are none.
    fn due(&self) -> Option<tokio::time::Instant> {
        self.since.map(|since| since + REMOTE_WORK_DELAY)
    }

    fn take(&mut self) -> HashSet<String> {
        self.since = None;
        std::mem::take(&mut self.clients)
    }
}

async fn hear(
    notification: &PgNotification,
    instance: &str,
    store: &Store,
    feed: &JobFeed,
    remote_work: &mut RemoteWork,
) {
    let Some(change) = parse(notification.payload()) else {
        tracing::warn!("ignored a malformed change notification");
        return;
    };
    if change.origin == instance {
        return;
    }
    if matches!(change.state, JobState::Queued | JobState::RetryWait) {
        remote_work.add(change.client_id);
    }
    if feed.is_watched(change.job_id) {
        republish(store, feed, change.job_id).await;
    }
}

/// Reads a watched job back and publishes it to its local watchers.
async fn republish(store: &Store, feed: &JobFeed, id: JobId) {
    match store.get(id).await {
        Ok(Some(job)) => feed.publish(&job),
        Ok(None) => {}
        Err(error) => tracing::warn!(%error, job_id = %id, "cannot read a changed job"),
    }
}

/// Catches up after notifications may have been missed.
async fn resync(store: &Store, feed: &JobFeed) {
    match store.waiting_clients().await {
        Ok(clients) => {
            for client in clients {
                feed.work().announce(&client);
            }
        }
        Err(error) => tracing::warn!(%error, "cannot read the waiting clients"),
    }
    for id in feed.watched() {
        republish(store, feed, id).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_read_back_and_malformed_ones_are_refused() {
        let id = JobId::new();
        let text = format!("replica-1 {id} retry_wait client with spaces");
        assert_eq!(
            parse(&text),
            Some(Change {
                origin: "replica-1",
                job_id: id,
                state: JobState::RetryWait,
                client_id: "client with spaces",
            })
        );
        assert_eq!(parse("replica-1 not-a-uuid queued c"), None);
        assert_eq!(parse(&format!("replica-1 {id} sleeping c")), None);
        assert_eq!(parse(&format!("replica-1 {id} queued")), None);
    }
}
