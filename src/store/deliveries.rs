//! Jobs whose tokens the API handed to their callers, noted in the store by the next sweep
//! (a crash in between only keeps those tokens until they expire), so that tokens are erased
//! `security.token_retention_secs` after their first delivery.

use std::sync::Arc;

use parking_lot::Mutex;

/// Delivered job ids not yet noted in the store.
#[derive(Debug, Default)]
pub struct Deliveries(Mutex<Vec<String>>);

impl Deliveries {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The token of `job_id` was handed to its caller.
    pub fn record(&self, job_id: &str) {
        self.0.lock().push(job_id.to_string());
    }

    /// Puts back deliveries that could not be noted, for the next sweep.
    pub fn restore(&self, job_ids: Vec<String>) {
        self.0.lock().extend(job_ids);
    }

    /// The deliveries recorded since the last call.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock())
    }
}
