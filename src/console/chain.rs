//! The chain's state for the status bar: verified once in the background at start, then only
//! the events added since, every [`RECHECK`]. A page load never verifies anything; it reads
//! the last result.

use std::{sync::Arc, time::Duration};

use parking_lot::RwLock;
use tokio_util::sync::CancellationToken;

use crate::{
    audit::{ChainVerifier, VerifyReport},
    domain::job::UnixMillis,
    store::Store,
};

/// How often the events added since the last check are verified.
pub const RECHECK: Duration = Duration::from_secs(10);

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

    /// Verifies the whole chain, then what was added since, every `every`, until `stop`.
    pub async fn run(self, store: Store, every: Duration, stop: CancellationToken) {
        let mut verifier = ChainVerifier::new();
        loop {
            let result = store.continue_verification(&mut verifier).await;
            let status = match result {
                Ok(report) => ChainStatus {
                    state: state_of(&report, verifier.last_seq()),
                    checked_at: Some(UnixMillis::now()),
                    events_checked: report.events_checked,
                },
                Err(error) => {
                    tracing::warn!(%error, "console: cannot verify the audit chain");
                    ChainStatus {
                        state: ChainState::Unavailable,
                        checked_at: Some(UnixMillis::now()),
                        events_checked: self.get().events_checked,
                    }
                }
            };
            *self.0.write() = status;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
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
