//! Client-side rate limits: one global limiter and one per client id, so traffic stays under
//! upstream's limit instead of discovering it through 429s; and when a 429 arrives anyway, an
//! AIMD adaptation of that client's rate.
//!
//! Checks never block: a refusal says how long until a permit, so the worker can serve another
//! client meanwhile instead of sitting on a busy one.
//!
//! Adaptation: a 429 pauses the client until `Retry-After` (or [`AdaptiveConfig::default_pause`])
//! and multiplies its effective rate by [`AdaptiveConfig::decrease_factor`]. After
//! [`AdaptiveConfig::quiet_period`] without a 429, the rate grows back by
//! [`AdaptiveConfig::recovery_step`] of the configured rate per second, up to the configured rate.
//! Every change is logged.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::{Mutex, RwLock};

use governor::{
    DefaultDirectRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::{
    config::LimitsConfig,
    domain::budget::{Adaptation, Rate},
};

/// The answer to "may an attempt for this client start now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permit {
    Granted,
    /// This client's limit is exhausted (or it is paused) for this long; others may proceed.
    ClientBusy(Duration),
    /// The global limit is exhausted for this long; no client may proceed.
    GlobalBusy(Duration),
}

/// How rates adapt to 429s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    pub enabled: bool,
    /// Multiplies the effective rate on each 429 (0 < factor < 1).
    pub decrease_factor: f64,
    /// The effective rate never drops below this fraction of the configured rate.
    pub floor_fraction: f64,
    /// How long without a 429 before the rate starts to recover.
    pub quiet_period: Duration,
    /// Fraction of the configured rate regained per second of recovery.
    pub recovery_step: f64,
    /// How long a client pauses after a 429 without `Retry-After`.
    pub default_pause: Duration,
}

impl From<&LimitsConfig> for AdaptiveConfig {
    fn from(config: &LimitsConfig) -> Self {
        Self {
            enabled: config.adaptive,
            decrease_factor: config.decrease_factor,
            floor_fraction: 0.05,
            quiet_period: Duration::from_secs(config.recovery_quiet_secs),
            recovery_step: config.recovery_step,
            default_pause: Duration::from_secs(1),
        }
    }
}

/// Effective rates, as the metrics show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateReport {
    /// Each configured client seen so far and its effective rate.
    pub configured: Vec<(String, f64)>,
    /// Other client ids whose rate 429s have lowered.
    pub others_lowered: usize,
    /// The lowest effective rate among them.
    pub others_lowest: Option<f64>,
}

/// One client's limiter and adaptation state.
#[derive(Debug)]
struct ClientLimiter {
    /// The configured rate and burst; `None` when the client is unlimited.
    configured: Option<(f64, u32)>,
    /// The rate in force now (equal to the configured rate unless adapted).
    effective: f64,
    /// Built for `effective`; rebuilt when it changes.
    limiter: Option<DefaultDirectRateLimiter>,
    /// No attempt for this client before this instant (after a 429).
    paused_until: Option<Instant>,
    /// The last 429, which starts the quiet period.
    last_throttled: Option<Instant>,
    /// The last recovery step.
    last_recovery: Option<Instant>,
    /// The last permit asked for, so that idle clients' state can be evicted.
    last_used: Instant,
}

/// A limiter admitting `rps` per second with bursts of `burst`; `None` when the rate cannot be
/// represented (not positive, not finite, or a period too long for a `Duration`).
fn limiter_for(rps: f64, burst: u32) -> Option<DefaultDirectRateLimiter> {
    let period = Duration::try_from_secs_f64(1.0 / rps).ok()?;
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period).map(|quota| RateLimiter::direct(quota.allow_burst(burst)))
}

/// A client's limiter state unused this long is dropped (a new one starts full, which it
/// would be by then anyway), so memory does not grow with every client id ever seen.
const IDLE_EVICTION: Duration = Duration::from_secs(60);

/// The longest pause a 429 can impose, whatever upstream's `Retry-After` says. The upstream
/// client already clamps `Retry-After` to `upstream.max_retry_after_secs` (at most a day); this
/// bound keeps the limiter's own arithmetic safe whatever it is handed.
const MAX_PAUSE: Duration = Duration::from_secs(86_400);

impl ClientLimiter {
    fn new(configured: Option<(f64, u32)>) -> Self {
        let (effective, limiter) = match configured {
            Some((rps, burst)) => (rps, limiter_for(rps, burst)),
            None => (f64::INFINITY, None),
        };
        Self {
            configured,
            effective,
            limiter,
            paused_until: None,
            last_throttled: None,
            last_recovery: None,
            last_used: Instant::now(),
        }
    }

    /// Whether this state can be dropped and rebuilt later without changing anything: not
    /// paused, not lowered by 429s, and unused for [`IDLE_EVICTION`].
    fn evictable(&self, now: Instant) -> bool {
        let paused = self.paused_until.is_some_and(|until| until > now);
        let lowered = self
            .configured
            .is_some_and(|(configured, _)| self.effective < configured);
        !paused && !lowered && now.saturating_duration_since(self.last_used) >= IDLE_EVICTION
    }

    /// Sets the effective rate, rebuilding the limiter. The burst shrinks with the rate, and the
    /// new limiter starts empty, so that neither a lowered client coming back from its pause nor
    /// a recovering one sends a burst on each change.
    fn set_effective(&mut self, rps: f64) {
        let Some((_, burst)) = self.configured else {
            return;
        };
        self.effective = rps;
        let burst = burst.min(rps.floor().max(1.0) as u32);
        self.limiter = limiter_for(rps, burst);
        // A new limiter starts with a full bucket; after a rate change that would send a whole
        // burst at once, each step. Start it empty: it then admits the new rate, evenly.
        if let (Some(limiter), Some(cells)) = (&self.limiter, NonZeroU32::new(burst)) {
            let _ = limiter.check_n(cells);
        }
    }
}

/// The configured limits, replaced as a whole on reload.
#[derive(Debug)]
struct Rules {
    /// Shared by all clients; `None` when the global limit is off.
    global: Option<DefaultDirectRateLimiter>,
    /// Its rate and burst.
    global_quota: Option<(f64, u32)>,
    /// Rate and burst for clients without their own entry; `None` means unlimited.
    default_quota: Option<(f64, u32)>,
    /// Configured per-client rates and bursts.
    overrides: HashMap<String, (f64, u32)>,
    adaptive: AdaptiveConfig,
}

impl Rules {
    fn new(config: &LimitsConfig) -> Self {
        Self {
            global: rate(config.global_rps, config.global_burst)
                .and_then(|(rps, burst)| limiter_for(rps, burst)),
            global_quota: rate(config.global_rps, config.global_burst),
            default_quota: rate(config.default_client_rps, config.default_client_burst),
            overrides: config
                .client
                .iter()
                .filter_map(|c| Some((c.client_id.clone(), rate(c.rps, c.burst)?)))
                .collect(),
            adaptive: AdaptiveConfig::from(config),
        }
    }

    fn configured(&self, client_id: &str) -> Option<(f64, u32)> {
        self.overrides
            .get(client_id)
            .copied()
            .or(self.default_quota)
    }
}

#[derive(Debug)]
pub struct RateLimits {
    rules: RwLock<Arc<Rules>>,
    /// One entry per client id seen so far, created on first use.
    clients: Mutex<HashMap<String, ClientLimiter>>,
    clock: DefaultClock,
}

fn shared_rate((per_second, burst): (f64, u32)) -> Rate {
    Rate { per_second, burst }
}

fn rate(rps: u32, burst: u32) -> Option<(f64, u32)> {
    (rps > 0).then(|| (f64::from(rps), if burst == 0 { rps } else { burst }))
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self {
            rules: RwLock::new(Arc::new(Rules::new(config))),
            clients: Mutex::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.rules.read())
    }

    /// The configured limit of `client_id`, for a budget shared with other replicas
    /// (`None`: unlimited).
    pub fn client_rate(&self, client_id: &str) -> Option<Rate> {
        self.rules().configured(client_id).map(shared_rate)
    }

    /// The configured global limit, for a budget shared with other replicas.
    pub fn global_rate(&self) -> Option<Rate> {
        self.rules().global_quota.map(shared_rate)
    }

    /// How a shared budget adapts to 429s: as this process's limiters do.
    pub fn adaptation(&self) -> Adaptation {
        let adaptive = self.rules().adaptive;
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Adaptation {
            enabled: adaptive.enabled,
            decrease_factor: adaptive.decrease_factor,
            floor_fraction: adaptive.floor_fraction,
            quiet_period_ms: millis(adaptive.quiet_period),
            recovery_step: adaptive.recovery_step,
            default_pause_ms: millis(adaptive.default_pause),
        }
    }

    /// Replaces the configured limits (SIGHUP). Every client starts again from its newly
    /// configured rate; adaptation to 429s starts over.
    pub fn reconfigure(&self, config: &LimitsConfig) {
        let rules = Arc::new(Rules::new(config));
        *self.rules.write() = rules;
        self.clients.lock().clear();
        tracing::info!(
            global_rps = config.global_rps,
            default_client_rps = config.default_client_rps,
            clients = config.client.len(),
            "rate limits reloaded"
        );
    }

    /// Takes a permit for one attempt of `client_id`, if its pause is over and both limits have
    /// one.
    ///
    /// The client's limiter is asked first: when it refuses, the global permit stays available
    /// for other clients. When the global limiter then refuses, the client's permit is spent
    /// without an attempt, which errs on the side of sending less.
    pub fn try_acquire(&self, client_id: &str, now: Instant) -> Permit {
        let rules = self.rules();
        {
            let mut clients = self.clients.lock();
            let client = clients
                .entry(client_id.to_string())
                .or_insert_with(|| ClientLimiter::new(rules.configured(client_id)));
            client.last_used = now;
            if let Some(until) = client.paused_until {
                if until > now {
                    return Permit::ClientBusy(until - now);
                }
                client.paused_until = None;
            }
            recover(&rules.adaptive, client_id, client, now);
            if let Some(limiter) = &client.limiter
                && let Err(not_until) = limiter.check()
            {
                return Permit::ClientBusy(not_until.wait_time_from(self.clock.now()));
            }
        }
        if let Some(global) = &rules.global
            && let Err(not_until) = global.check()
        {
            return Permit::GlobalBusy(not_until.wait_time_from(self.clock.now()));
        }
        Permit::Granted
    }

    /// Upstream answered 429 for `client_id`: pause the client and lower its rate.
    pub fn on_rate_limited(&self, client_id: &str, retry_after: Option<Duration>, now: Instant) {
        let rules = self.rules();
        let adaptive = &rules.adaptive;
        if !adaptive.enabled {
            return;
        }
        let mut clients = self.clients.lock();
        let client = clients
            .entry(client_id.to_string())
            .or_insert_with(|| ClientLimiter::new(rules.configured(client_id)));
        let pause = retry_after.unwrap_or(adaptive.default_pause).min(MAX_PAUSE);
        let until = crate::domain::job::instant_after(now, pause);
        // 429s that arrive while the client is paused answer requests sent before the pause:
        // they extend it but do not lower the rate again.
        let already_paused = client.paused_until.is_some_and(|p| p > now);
        client.paused_until = Some(client.paused_until.map_or(until, |p| p.max(until)));
        client.last_throttled = Some(now);
        if already_paused {
            return;
        }
        if let Some((configured, _)) = client.configured {
            let floor = (configured * adaptive.floor_fraction).max(0.1);
            let lowered = (client.effective * adaptive.decrease_factor).max(floor);
            if lowered < client.effective {
                tracing::warn!(
                    client_id,
                    from_rps = client.effective,
                    to_rps = lowered,
                    pause_ms = pause.as_millis() as u64,
                    "upstream rate-limited this client; effective rate lowered"
                );
                client.set_effective(lowered);
                return;
            }
        }
        tracing::warn!(
            client_id,
            pause_ms = pause.as_millis() as u64,
            "upstream rate-limited this client; paused"
        );
    }

    /// Drops the state of clients idle for a minute (neither paused nor lowered).
    pub fn evict_idle(&self, now: Instant) -> usize {
        let mut clients = self.clients.lock();
        let before = clients.len();
        clients.retain(|_, client| !client.evictable(now));
        before - clients.len()
    }

    /// The effective rates for the metrics: each configured client's (`[[limits.client]]`,
    /// infinite when unlimited), and, aggregated over every other client id, how many are
    /// lowered by 429s and the lowest rate among them, so the number of series is bounded by
    /// the configuration, not by the client ids callers send.
    pub fn rate_report(&self) -> RateReport {
        let rules = self.rules();
        let clients = self.clients.lock();
        let mut report = RateReport::default();
        for (id, client) in clients.iter() {
            if rules.overrides.contains_key(id) {
                report.configured.push((id.clone(), client.effective));
            } else if client
                .configured
                .is_some_and(|(configured, _)| client.effective < configured)
            {
                report.others_lowered += 1;
                report.others_lowest = Some(
                    report
                        .others_lowest
                        .map_or(client.effective, |lowest: f64| lowest.min(client.effective)),
                );
            }
        }
        report.configured.sort_by(|a, b| a.0.cmp(&b.0));
        report
    }

    /// The effective rate of every client seen so far (infinite when unlimited).
    #[cfg(test)]
    fn effective_rates(&self) -> Vec<(String, f64)> {
        let clients = self.clients.lock();
        let mut rates: Vec<_> = clients
            .iter()
            .map(|(id, client)| (id.clone(), client.effective))
            .collect();
        rates.sort_by(|a, b| a.0.cmp(&b.0));
        rates
    }
}

/// Grows a lowered rate back after a quiet period, one step per second.
fn recover(adaptive: &AdaptiveConfig, client_id: &str, client: &mut ClientLimiter, now: Instant) {
    let Some((configured, _)) = client.configured else {
        return;
    };
    if client.effective >= configured {
        return;
    }
    let quiet = client
        .last_throttled
        .is_none_or(|at| now.saturating_duration_since(at) >= adaptive.quiet_period);
    let step_due = client
        .last_recovery
        .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1));
    if !(quiet && step_due) {
        return;
    }
    let raised = (client.effective + configured * adaptive.recovery_step).min(configured);
    tracing::info!(
        client_id,
        from_rps = client.effective,
        to_rps = raised,
        "effective rate recovering"
    );
    client.last_recovery = Some(now);
    client.set_effective(raised);
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
            client: vec![ClientLimit {
                client_id: "vip".into(),
                rps: 5,
                burst: 5,
            }],
            ..LimitsConfig::default()
        }
    }

    fn rate_of(limits: &RateLimits, client: &str) -> f64 {
        limits
            .effective_rates()
            .into_iter()
            .find(|(id, _)| id == client)
            .map(|(_, rate)| rate)
            .expect("client seen")
    }

    #[test]
    fn idle_clients_are_evicted_unless_paused_or_lowered() {
        let limits = RateLimits::new(&config(0, 40));
        let start = Instant::now();
        for client in ["idle", "paused", "vip"] {
            assert_eq!(limits.try_acquire(client, start), Permit::Granted);
        }
        limits.on_rate_limited("paused", Some(Duration::from_secs(600)), start);
        assert_eq!(limits.evict_idle(start + Duration::from_secs(30)), 0);
        assert_eq!(
            limits.evict_idle(start + IDLE_EVICTION),
            2,
            "idle and vip go"
        );
        let report = limits.rate_report();
        assert_eq!(report.configured, []);
        assert_eq!(
            (report.others_lowered, report.others_lowest),
            (1, Some(20.0))
        );
    }

    #[test]
    fn only_configured_clients_are_reported_by_name() {
        let limits = RateLimits::new(&config(0, 40));
        let now = Instant::now();
        for n in 0..1_000 {
            limits.try_acquire(&format!("client-{n}"), now);
        }
        limits.try_acquire("vip", now);
        let report = limits.rate_report();
        assert_eq!(report.configured, [("vip".to_string(), 5.0)]);
        assert_eq!(report.others_lowered, 0);
    }

    #[test]
    fn a_busy_client_does_not_block_another() {
        let limits = RateLimits::new(&config(100, 2));
        let now = Instant::now();
        assert_eq!(limits.try_acquire("a", now), Permit::Granted);
        assert_eq!(limits.try_acquire("a", now), Permit::Granted);
        let Permit::ClientBusy(wait) = limits.try_acquire("a", now) else {
            panic!("client a should be busy");
        };
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500));
        assert_eq!(limits.try_acquire("b", now), Permit::Granted);
    }

    #[test]
    fn overrides_and_the_global_limit_apply() {
        let limits = RateLimits::new(&config(6, 1));
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(limits.try_acquire("vip", now), Permit::Granted);
        }
        assert!(matches!(
            limits.try_acquire("vip", now),
            Permit::ClientBusy(_)
        ));
        assert_eq!(limits.try_acquire("other", now), Permit::Granted);
        assert!(matches!(
            limits.try_acquire("third", now),
            Permit::GlobalBusy(_)
        ));
    }

    #[test]
    fn zero_turns_a_limit_off() {
        let limits = RateLimits::new(&LimitsConfig {
            global_rps: 0,
            default_client_rps: 0,
            ..LimitsConfig::default()
        });
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(limits.try_acquire("a", now), Permit::Granted);
        }
    }

    #[test]
    fn a_429_pauses_the_client_for_retry_after_and_halves_its_rate() {
        let limits = RateLimits::new(&config(0, 40));
        let start = Instant::now();
        assert_eq!(limits.try_acquire("a", start), Permit::Granted);
        limits.on_rate_limited("a", Some(Duration::from_secs(2)), start);
        assert_eq!(rate_of(&limits, "a"), 20.0);
        // More 429s from the same burst only extend the pause.
        limits.on_rate_limited("a", Some(Duration::from_secs(2)), start);
        assert_eq!(rate_of(&limits, "a"), 20.0);
        assert_eq!(
            limits.try_acquire("a", start + Duration::from_millis(500)),
            Permit::ClientBusy(Duration::from_millis(1500))
        );
        assert_eq!(
            limits.try_acquire("b", start),
            Permit::Granted,
            "others go on"
        );
        // The pause ends with Retry-After; then the lowered rate applies, evenly (the new
        // limiter starts empty rather than with a burst).
        match limits.try_acquire("a", start + Duration::from_secs(2)) {
            Permit::Granted => {}
            Permit::ClientBusy(wait) => assert!(wait <= Duration::from_millis(50), "{wait:?}"),
            other => panic!("unexpected {other:?}"),
        }
        limits.on_rate_limited("a", None, start + Duration::from_secs(2));
        assert_eq!(rate_of(&limits, "a"), 10.0);
        // The floor: repeated 429s never stop the client altogether.
        for i in 0..20 {
            limits.on_rate_limited("a", None, start + Duration::from_secs(4 + 2 * i));
        }
        assert_eq!(rate_of(&limits, "a"), 2.0);
    }

    #[test]
    fn the_rate_recovers_additively_after_a_quiet_period() {
        let limits = RateLimits::new(&config(0, 40));
        let start = Instant::now();
        limits.on_rate_limited("a", Some(Duration::from_secs(1)), start);
        assert_eq!(rate_of(&limits, "a"), 20.0);
        // Within the quiet period (5 s by default) nothing changes.
        limits.try_acquire("a", start + Duration::from_secs(4));
        assert_eq!(rate_of(&limits, "a"), 20.0);
        // Then one step (5 % of 40 rps) per second.
        let mut expected = 20.0;
        for second in 5..=10 {
            limits.try_acquire("a", start + Duration::from_secs(second));
            expected = f64::min(expected + 2.0, 40.0);
            assert_eq!(rate_of(&limits, "a"), expected, "after {second} s");
        }
        // Capped at the configured rate.
        for second in 11..30 {
            limits.try_acquire("a", start + Duration::from_secs(second));
        }
        assert_eq!(rate_of(&limits, "a"), 40.0);
    }

    #[test]
    fn a_reload_replaces_the_limits() {
        let limits = RateLimits::new(&config(0, 1));
        let now = Instant::now();
        assert_eq!(limits.try_acquire("a", now), Permit::Granted);
        assert!(matches!(
            limits.try_acquire("a", now),
            Permit::ClientBusy(_)
        ));
        limits.reconfigure(&config(0, 10));
        for _ in 0..10 {
            assert_eq!(limits.try_acquire("a", now), Permit::Granted);
        }
        assert_eq!(rate_of(&limits, "a"), 10.0);
    }

    #[test]
    fn adaptation_can_be_turned_off() {
        let limits = RateLimits::new(&LimitsConfig {
            adaptive: false,
            ..config(0, 40)
        });
        let now = Instant::now();
        limits.try_acquire("a", now);
        limits.on_rate_limited("a", Some(Duration::from_secs(5)), now);
        assert_eq!(rate_of(&limits, "a"), 40.0);
        assert_eq!(limits.try_acquire("a", now), Permit::Granted);
    }
}
