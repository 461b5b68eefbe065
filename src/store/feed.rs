//! The change feed: every committed job change is published here, so `Exchange` and `WatchJob`
//! wait on events instead of polling the database.
//!
//! Only jobs someone is watching have a channel; publishing for an unwatched job is one map
//! lookup.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use parking_lot::Mutex;
use tokio::sync::{Notify, broadcast};

use crate::domain::job::{Job, JobId, JobState};

/// Per-job channel capacity. A job changes a handful of times; a watcher that still falls
/// behind is told so and re-reads the job.
const CHANNEL_CAPACITY: usize = 16;

#[derive(Debug, Default)]
pub struct JobFeed {
    /// One sender per watched job, removed when its last watcher leaves.
    watched: Mutex<HashMap<JobId, broadcast::Sender<Job>>>,
    /// The clients whose committed changes left a job waiting, for the dispatcher.
    work: WorkSignal,
}

/// Tells the dispatcher which clients have new waiting work (a submission, a scheduled retry,
/// a rescued attempt), and wakes it. Announced by the writer after the commit that made the
/// work waiting, so no announcement is lost when the caller that caused it goes away.
#[derive(Debug, Default)]
pub struct WorkSignal {
    notify: Notify,
    /// Clients announced since the dispatcher last looked, each once.
    clients: Mutex<HashSet<String>>,
}

impl WorkSignal {
    /// `client_id` has new waiting work.
    pub(crate) fn announce(&self, client_id: &str) {
        let mut clients = self.clients.lock();
        if !clients.contains(client_id) {
            clients.insert(client_id.to_string());
        }
        drop(clients);
        self.notify.notify_one();
    }

    /// Whether no client was announced since the last [`WorkSignal::take`].
    pub fn is_empty(&self) -> bool {
        self.clients.lock().is_empty()
    }

    /// The clients announced since the last call.
    pub fn take(&self) -> Vec<String> {
        self.clients.lock().drain().collect()
    }

    /// Completes when a client is announced (or was, since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum FeedEvent {
    /// The job as committed by a change.
    Changed(Box<Job>),
    /// Changes were missed; re-read the job from the store.
    Lagged,
}

impl JobFeed {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts receiving the changes of `id` committed from now on. Subscribe before reading
    /// the job's current state, so that no change falls between the read and the subscription.
    pub fn subscribe(self: &Arc<Self>, id: JobId) -> JobSubscription {
        let mut watched = self.watched.lock();
        let receiver = watched
            .entry(id)
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .subscribe();
        JobSubscription {
            feed: Arc::clone(self),
            id,
            receiver,
        }
    }

    /// Whether anyone here watches `id`.
    pub(crate) fn is_watched(&self, id: JobId) -> bool {
        self.watched.lock().contains_key(&id)
    }

    /// Every job someone here watches.
    pub(crate) fn watched(&self) -> Vec<JobId> {
        self.watched.lock().keys().copied().collect()
    }

    /// The dispatcher's side: which clients have new waiting work.
    pub fn work(&self) -> &WorkSignal {
        &self.work
    }

    /// Publishes a committed change. Called by the store after each commit; a job left waiting
    /// (queued, or waiting for a retry) announces its client to the dispatcher.
    pub fn publish(&self, job: &Job) {
        if matches!(job.state, JobState::Queued | JobState::RetryWait) {
            self.work.announce(&job.client_id);
        }
        let watched = self.watched.lock();
        if let Some(sender) = watched.get(&job.id) {
            // An error only means every receiver is gone; the entry is removed on their drop.
            let _ = sender.send(job.clone());
        }
    }
}

/// A watcher's handle on one job's changes.
#[derive(Debug)]
pub struct JobSubscription {
    feed: Arc<JobFeed>,
    id: JobId,
    receiver: broadcast::Receiver<Job>,
}

impl JobSubscription {
    pub async fn next(&mut self) -> FeedEvent {
        match self.receiver.recv().await {
            Ok(job) => FeedEvent::Changed(Box::new(job)),
            Err(broadcast::error::RecvError::Lagged(_)) => FeedEvent::Lagged,
            // The sender lives in the map while this receiver exists, so it cannot close.
            Err(broadcast::error::RecvError::Closed) => FeedEvent::Lagged,
        }
    }
}

impl Drop for JobSubscription {
    fn drop(&mut self) {
        let mut watched = self.feed.watched.lock();
        // This receiver still counts while it is being dropped.
        if watched
            .get(&self.id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            watched.remove(&self.id);
        }
    }
}
