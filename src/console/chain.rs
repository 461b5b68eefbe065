//! The chain's state for the status bar: verified once in the background at start, then only
//! the events added since, every [`RECHECK`]. A page load never verifies anything; it reads
//! the last result.
//!
//! Continuing from the last verified event would not notice a change to events already
//! verified: someone who edits an old event and recomputes every later hash leaves a chain
//! that verifies. So each round first re-reads the last verified event (the head) and checks
//! that it is still the one verified. If it changed or is gone, that is shown as a break at
//! its seq, and the whole chain is verified again from the start; the break stays shown
//! until the console restarts, since a rewritten log verifies from scratch by construction.
//! And the whole chain is verified again every [`FULL_RECHECK`] anyway.

use std::{sync::Arc, time::Duration};

use parking_lot::RwLock;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{AuditKind, AuditRecord, ChainVerifier, RecordKind, VerifyReport},
    domain::job::UnixMillis,
    store::{EventQuery, Store, StoreError},
};

/// How often the events added since the last check are verified.
pub const RECHECK: Duration = Duration::from_secs(10);

/// How often the whole chain is verified again from the start.
pub const FULL_RECHECK: Duration = Duration::from_secs(10 * 60);

/// What the status bar says about the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainState {
    /// The first verification has not finished yet.
    Checking,
    /// Every event up to `seq` verified (`None`: there are no events yet).
    Intact { up_to: Option<i64>, detail: String },
    /// The first broken seq and why.
    Broken { seq: i64, detail: String },
    /// The database did not answer the last check (the cause is logged, not shown).
    Unavailable,
}

/// The latest verification and when it finished.
#[derive(Debug, Clone)]
pub struct ChainStatus {
    pub state: ChainState,
    /// When the state above was established (`None` while the first check runs).
    pub checked_at: Option<UnixMillis>,
    /// Events verified so far.
    pub events_checked: u64,
}

/// The shared, always-current status; cheap to clone.
#[derive(Debug, Clone)]
pub struct ChainWatch(Arc<RwLock<ChainStatus>>);

/// What became of the last verified event since it was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Head {
    /// Still there, with the hash that was verified (or nothing was verified yet).
    Same,
    /// Still there, with another hash: the log was rewritten.
    Changed(i64),
    /// Removed, and not by retention: the tail was cut.
    Gone(i64),
    /// Removed by retention, which left a checkpoint carrying its hash (or a later one).
    Pruned,
}

impl ChainWatch {
    /// The status before the first check.
    pub fn new() -> Self {
        Self(Arc::new(RwLock::new(ChainStatus {
            state: ChainState::Checking,
            checked_at: None,
            events_checked: 0,
        })))
    }

    pub fn get(&self) -> ChainStatus {
        self.0.read().clone()
    }

    fn set(&self, state: ChainState, events_checked: u64) {
        *self.0.write() = ChainStatus {
            state,
            checked_at: Some(UnixMillis::now()),
            events_checked,
        };
    }

    /// Verifies the whole chain, then, every `every`, checks that the last verified event is
    /// unchanged and verifies what was added since; verifies the whole chain again every
    /// `full_every`, and at once when the last verified event changed. Until `stop`.
    pub async fn run(
        self,
        store: Store,
        every: Duration,
        full_every: Duration,
        stop: CancellationToken,
    ) {
        let mut verifier = ChainVerifier::new();
        let mut verified_from_start = Instant::now();
        // Evidence that the log changed under the console: the seq and what happened to it.
        let mut rewritten: Option<(i64, &'static str)> = None;
        loop {
            if let Err(error) = self
                .round(
                    &store,
                    &mut verifier,
                    &mut verified_from_start,
                    full_every,
                    &mut rewritten,
                )
                .await
            {
                tracing::warn!(%error, "console: cannot verify the audit chain");
                self.set(ChainState::Unavailable, self.get().events_checked);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    async fn round(
        &self,
        store: &Store,
        verifier: &mut ChainVerifier,
        verified_from_start: &mut Instant,
        full_every: Duration,
        rewritten: &mut Option<(i64, &'static str)>,
    ) -> Result<(), StoreError> {
        let mut from_start = verified_from_start.elapsed() >= full_every;
        let why = match head(store, verifier).await? {
            Head::Same => None,
            Head::Pruned => {
                from_start = true;
                None
            }
            Head::Changed(seq) => Some((
                seq,
                "changed after the console verified it: the log was rewritten",
            )),
            Head::Gone(seq) => Some((
                seq,
                "removed after the console verified it: the latest events were cut",
            )),
        };
        if let Some((seq, what)) = why {
            tracing::warn!(seq, what, "console: a verified audit event changed");
            rewritten.get_or_insert((seq, what));
            from_start = true;
            self.set(
                ChainState::Broken {
                    seq,
                    detail: format!("{what}; verifying the whole chain again"),
                },
                0,
            );
        }
        if from_start {
            *verifier = ChainVerifier::new();
            *verified_from_start = Instant::now();
        }
        let report = store.continue_verification(verifier).await?;
        let mut state = state_of(&report, verifier.last_seq());
        if let (ChainState::Intact { .. }, Some((seq, what))) = (&state, *rewritten) {
            // A rewritten log verifies from scratch: the evidence is what was seen change.
            state = ChainState::Broken {
                seq,
                detail: format!(
                    "{what} (verified again from the start, it reads: {}); restart the \
                     console once this is understood",
                    report.detail
                ),
            };
        }
        self.set(state, report.events_checked);
        Ok(())
    }
}

/// Re-reads the last event `verifier` accepted and says whether it is still that event.
async fn head(store: &Store, verifier: &ChainVerifier) -> Result<Head, StoreError> {
    let Some(seq) = verifier.last_seq() else {
        return Ok(Head::Same);
    };
    if verifier.clone().report().first_bad_seq.is_some() {
        // A broken verifier accepts nothing more; the break is already shown.
        return Ok(Head::Same);
    }
    let page = store
        .list_events(&EventQuery {
            after_seq: Some(seq - 1),
            limit: 1,
            ..EventQuery::default()
        })
        .await?;
    Ok(match page.items.first() {
        Some(record) if record.seq == seq => {
            if is_verified_head(verifier, record) {
                Head::Same
            } else {
                Head::Changed(seq)
            }
        }
        Some(record) if record.kind == RecordKind::Known(AuditKind::Checkpoint) => Head::Pruned,
        _ => Head::Gone(seq),
    })
}

/// Whether `record` is the event `verifier` accepted last, hash included. The verifier does
/// not show the hash it holds, but it accepts a next event only if that event's `prev_hash`
/// is that hash: a copy is offered a made-up next event chained to `record`.
fn is_verified_head(verifier: &ChainVerifier, record: &AuditRecord) -> bool {
    let mut next = record.clone();
    next.seq = record.seq + 1;
    next.kind = RecordKind::Unknown("console.head-probe".into());
    next.prev_hash = record.hash.clone();
    next.hash = next.expected_hash();
    verifier.last_seq() == Some(record.seq) && verifier.clone().check(&next)
}

impl Default for ChainWatch {
    fn default() -> Self {
        Self::new()
    }
}

fn state_of(report: &VerifyReport, last_seq: Option<i64>) -> ChainState {
    match report.first_bad_seq {
        Some(seq) => ChainState::Broken {
            seq,
            detail: report
                .detail
                .split_once(": ")
                .map_or(report.detail.clone(), |(_, why)| why.to_string()),
        },
        None => ChainState::Intact {
            up_to: last_seq,
            detail: report.detail.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_report_names_its_seq_and_only_the_reason() {
        let report = VerifyReport {
            ok: false,
            events_checked: 4,
            first_bad_seq: Some(5),
            detail: "chain broken at seq 5: the hash does not match".into(),
            checkpoints_checked: 0,
            last_checkpoint: None,
        };
        assert_eq!(
            state_of(&report, Some(4)),
            ChainState::Broken {
                seq: 5,
                detail: "the hash does not match".into()
            }
        );
    }
}
