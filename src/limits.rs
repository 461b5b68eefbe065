//! Client-side rate limits: one global limiter and one per client id, so traffic stays under
//! upstream's limit instead of discovering it through 429s.
//!
//! Checks never block: a refusal says how long until the limiter has a permit, so the worker can
//! serve another client meanwhile instead of sitting on a busy one.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::{Arc, Mutex},
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::config::LimitsConfig;

/// The answer to "may an attempt for this client start now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Granted,
    /// This client's limit is exhausted for this long; other clients may proceed.
    ClientBusy(Duration),
    /// The global limit is exhausted for this long; no client may proceed.
    GlobalBusy(Duration),
}

#[derive(Debug)]
pub struct RateLimits {
    /// Shared by all clients; `None` when the global limit is off.
    global: Option<DefaultDirectRateLimiter>,
    /// Quota for clients without their own entry; `None` means unlimited.
    default_quota: Option<Quota>,
    /// Configured per-client quotas.
    overrides: HashMap<String, Quota>,
    /// One limiter per client id seen so far, created on first use.
    clients: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
    clock: DefaultClock,
}

fn quota(rps: u32, burst: u32) -> Option<Quota> {
    let rps = NonZeroU32::new(rps)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rps);
    Some(Quota::per_second(rps).allow_burst(burst))
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            global: quota(config.global_rps, config.global_burst).map(RateLimiter::direct),
            default_quota: quota(config.default_client_rps, config.default_client_burst),
            overrides: config
                .client
                .iter()
                .filter_map(|c| Some((c.client_id.clone(), quota(c.rps, c.burst)?)))
                .collect(),
            clients: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    fn client_limiter(&self, client_id: &str) -> Option<Arc<DefaultDirectRateLimiter>> {
        let quota = self
            .overrides
            .get(client_id)
            .copied()
            .or(self.default_quota)?;
        let mut clients = self.clients.lock().expect("limits lock poisoned");
        if let Some(limiter) = clients.get(client_id) {
            return Some(Arc::clone(limiter));
        }
        let limiter = Arc::new(RateLimiter::direct(quota));
        clients.insert(client_id.to_string(), Arc::clone(&limiter));
        Some(limiter)
    }

    /// Takes a permit for one attempt of `client_id`, if both limits have one.
    ///
    /// The client's limiter is asked first: when it refuses, the global permit stays available
    /// for other clients. When the global limiter then refuses, the client's permit is spent
    /// without an attempt, which errs on the side of sending less.
    pub fn try_acquire(&self, client_id: &str) -> Permit {
        if let Some(limiter) = self.client_limiter(client_id)
            && let Err(not_until) = limiter.check()
        {
            return Permit::ClientBusy(not_until.wait_time_from(self.clock.now()));
        }
        if let Some(global) = &self.global
            && let Err(not_until) = global.check()
        {
            return Permit::GlobalBusy(not_until.wait_time_from(self.clock.now()));
        }
        Permit::Granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientLimit;

    fn config(global_rps: u32, default_client_rps: u32) -> LimitsConfig {
        LimitsConfig {
            global_rps,
            global_burst: global_rps,
            default_client_rps,
            default_client_burst: 0,
            client: vec![ClientLimit {
                client_id: "vip".into(),
                rps: 5,
                burst: 5,
            }],
        }
    }

    #[test]
    fn a_busy_client_does_not_block_another() {
        let limits = RateLimits::new(&config(100, 2));
        assert_eq!(limits.try_acquire("a"), Permit::Granted);
        assert_eq!(limits.try_acquire("a"), Permit::Granted);
        let Permit::ClientBusy(wait) = limits.try_acquire("a") else {
            panic!("client a should be busy");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        assert_eq!(limits.try_acquire("b"), Permit::Granted);
    }

    #[test]
    fn overrides_and_the_global_limit_apply() {
        let limits = RateLimits::new(&config(6, 1));
        for _ in 0..5 {
            assert_eq!(limits.try_acquire("vip"), Permit::Granted);
        }
        assert!(matches!(limits.try_acquire("vip"), Permit::ClientBusy(_)));
        assert_eq!(limits.try_acquire("other"), Permit::Granted);
        assert!(matches!(limits.try_acquire("third"), Permit::GlobalBusy(_)));
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limits = RateLimits::new(&LimitsConfig {
            global_rps: 0,
            global_burst: 0,
            default_client_rps: 0,
            default_client_burst: 0,
            client: Vec::new(),
        });
        for _ in 0..10_000 {
            assert_eq!(limits.try_acquire("a"), Permit::Granted);
        }
    }
}
