//! A rate budget shared by several replicas through one database row per limiter key: the same
//! limits as [`crate::exchange::limits`] (GCRA with bursts, AIMD adaptation to 429s), but as
//! pure functions over a [`BudgetState`] the store locks, passes in and writes back.
//!
//! This module does no I/O and reads no clock: the store locks each key's row inside one
//! transaction (`SELECT … FOR UPDATE`), calls [`BudgetState::reserve`] or
//! [`BudgetState::throttle`] with the time it was handed, and writes the state back. Replicas
//! therefore take turns on one state, and the fleet is limited as one limiter would limit it.
//!
//! GCRA in a row: a token bucket needs a level and a refill time; GCRA needs one number, the
//! theoretical arrival time (TAT) of the next permit at the configured pace. A permit is
//! conformant at `now` when it does not run ahead of that pace by more than the tolerance
//! `tau = (burst - 1) × T`, with `T` the emission interval; granting advances the TAT by `T`.
//! Whatever order replicas come in, over any interval of length `t` no more than
//! `burst + rate × t` permits are granted.
//!
//! Why microseconds: at 1,000 requests per second the interval is one millisecond, and at 30
//! per second it is 33.3 ms; rounding to milliseconds would grant 1,000/s as 1,000/s or
//! unlimited, and 30/s as 30.3/s. The interval is rounded *up* to a whole microsecond, so the
//! rate granted is never above the configured one (30/s runs at 29.9997/s).
//!
//! Why reservations never save up: conformance is measured from `max(tat, now)`, so an idle key
//! holds at most `burst` permits however long it was idle, and a reservation only takes permits
//! that are conformant at `now`, never future ones. Permits a caller was granted but did not use
//! are simply lost.
//!
//! Adaptation (as in `limits.rs`): a 429 pauses the key until `Retry-After` and multiplies its
//! effective rate by [`Adaptation::decrease_factor`], down to a floor; a 429 that arrives while
//! the key is paused answers a request sent before the pause and only extends it. After
//! [`Adaptation::quiet_period_ms`] without a 429 the rate grows back by
//! [`Adaptation::recovery_step`] of the configured rate per second. The burst shrinks with the
//! rate, and a rate change starts the bucket empty, so that permits come evenly at the new rate
//! instead of as a burst: after a 429 the bucket is empty at the end of the pause (not at the
//! 429, which would let it refill while paused), after a recovery step at that step.
//!
//! Every rate in force is at most the configured one and every tolerance at most the configured
//! one, and the TAT only ever moves forward; so the `burst + rate × t` bound of the configured
//! rate holds across any sequence of 429s and recovery steps (the property test checks it).
//!
//! Clocks: `now` is compared between replicas, so skew between their clocks loosens the bound by
//! `rate × skew`, and a replica whose clock runs far ahead holds the key back until the others
//! catch up. The database's clock, read in the same transaction, avoids both.
//!
//! The time fields use 0 for "none", so times are expected to lie after the epoch. A row of
//! zeros behaves as a fresh one.

use crate::domain::job::UnixMillis;

/// The longest pause a 429 can impose (a day), whatever `Retry-After` or the configuration say.
pub const MAX_PAUSE_MS: i64 = 86_400_000;

/// No adapted rate goes below this many requests per second (the floor of `limits.rs`).
const MIN_RPS: f64 = 0.1;

/// A recovering rate takes one step per this many milliseconds.
const RECOVERY_INTERVAL_MS: i64 = 1_000;

const MICROS_PER_MILLI: i64 = 1_000;
const MICROS_PER_SECOND: f64 = 1_000_000.0;

/// A configured limit: requests per second and burst (>= 1).
///
/// A rate that is not a positive finite number (`0` in the configuration) limits nothing, as in
/// `limits.rs`; a burst of 0 counts as 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: u32,
}

impl Rate {
    /// The rate per second when it limits anything.
    fn limit(self) -> Option<f64> {
        (self.per_second.is_finite() && self.per_second > 0.0).then_some(self.per_second)
    }
}

/// How a 429 changes a shared limiter (mirror of `limits::AdaptiveConfig`, with millisecond
/// durations).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptation {
    /// When off, 429s change nothing and the configured rate always applies.
    pub enabled: bool,
    /// Multiplies the effective rate on each 429 (0 < factor < 1).
    pub decrease_factor: f64,
    /// The effective rate never drops below this fraction of the configured rate (nor below
    /// 0.1 per second).
    pub floor_fraction: f64,
    /// How long without a 429 before the rate starts to recover.
    pub quiet_period_ms: i64,
    /// Fraction of the configured rate regained per second of recovery.
    pub recovery_step: f64,
    /// How long a key pauses after a 429 without `Retry-After`.
    pub default_pause_ms: i64,
}

/// One limiter key's shared state, as stored in its row. A fresh row is
/// [`BudgetState::fresh`]; a row of zeros behaves the same.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetState {
    /// GCRA theoretical arrival time, in MICROseconds since the epoch (ms is too coarse at
    /// 1,000+/s). It only ever moves forward.
    pub tat_us: i64,
    /// The rate in force (the configured one unless 429s lowered it).
    pub effective_rps: f64,
    /// No permit before this time (a 429's pause); 0 when none.
    pub paused_until: i64,
    /// The last 429 (starts the quiet period), 0 when none; reset to 0 once the rate has
    /// recovered in full, so that a rate never lowered by a 429 follows the configured one.
    pub last_throttled: i64,
    /// The last recovery step, 0 when none.
    pub last_recovery: i64,
}

/// What a reservation granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Permits granted now, at most the number wanted.
    pub granted: u32,
    /// When the next permit would be available if fewer than wanted were granted (`None` when
    /// all were granted); always later than `now`, except when `now` is already the end of
    /// time.
    pub retry_at: Option<UnixMillis>,
}

/// What a 429 changed, for logging.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throttled {
    /// The key is paused and its rate lowered.
    Lowered { from: f64, to: f64 },
    /// The key is paused (or its pause extended); the rate is unchanged, because the key was
    /// already paused, is at its floor, or is not limited.
    Paused,
    /// Adaptation is disabled: nothing changed.
    Ignored,
}

/// The GCRA parameters of one rate, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    /// The emission interval `T`.
    interval_us: i64,
    /// The tolerance `tau = (burst - 1) × T`.
    tolerance_us: i64,
}

impl Gcra {
    /// The parameters for `effective` (positive, at most `configured`) under a configured rate
    /// and burst. At the configured rate the configured burst applies; below it the burst
    /// shrinks with the rate (as `set_effective` in `limits.rs` does). The tolerance never
    /// exceeds the configured one, so no rate change can loosen the configured bound.
    fn new(effective: f64, configured: f64, burst: u32) -> Self {
        let burst = burst.max(1);
        let configured_interval = interval_us(configured);
        let configured_tolerance = configured_interval.saturating_mul(i64::from(burst - 1));
        let interval_us = interval_us(effective).max(configured_interval);
        let burst = if effective >= configured {
            burst
        } else {
            // `as` saturates: a huge rate gives u32::MAX, a NaN 0 (then 1).
            burst.min((effective.floor() as u32).max(1))
        };
        let tolerance_us = interval_us
            .saturating_mul(i64::from(burst - 1))
            .min(configured_tolerance);
        Self {
            interval_us,
            tolerance_us,
        }
    }
}

/// The emission interval of `rps` in whole microseconds, rounded up so that the rate granted
/// is never above `rps`; at least 1 µs (so at most a million permits a second).
fn interval_us(rps: f64) -> i64 {
    // `as` saturates (an infinite interval becomes i64::MAX) and maps NaN to 0.
    ((MICROS_PER_SECOND / rps).ceil() as i64).max(1)
}

fn micros(millis: i64) -> i64 {
    millis.saturating_mul(MICROS_PER_MILLI)
}

/// The millisecond at or after `micros`.
fn millis_ceil(micros: i64) -> i64 {
    let floor = micros.div_euclid(MICROS_PER_MILLI);
    if micros.rem_euclid(MICROS_PER_MILLI) == 0 {
        floor
    } else {
        floor.saturating_add(1)
    }
}

impl BudgetState {
    /// A key never used: the configured rate and a full bucket.
    pub fn fresh(rate: Rate) -> Self {
        Self {
            tat_us: 0,
            effective_rps: rate.per_second,
            paused_until: 0,
            last_throttled: 0,
            last_recovery: 0,
        }
    }

    /// Whether a 429's pause holds at `now`.
    pub fn paused_at(&self, now: UnixMillis) -> bool {
        self.paused_until != 0 && self.paused_until > now.0
    }

    /// The rate in force under `configured`, for reporting as well as for the limiter; `None`
    /// when `configured` limits nothing.
    ///
    /// The configured rate, unless adaptation is on and a 429 lowered the stored rate: then the
    /// stored rate, at most the configured one (a reconfigured lower rate applies at once) and
    /// at least 0.1 per second (a stored rate that is not a positive number counts as that).
    pub fn rate_in_force(&self, configured: Rate, adaptation: &Adaptation) -> Option<f64> {
        let configured = configured.limit()?;
        if !adaptation.enabled || self.last_throttled == 0 {
            return Some(configured);
        }
        let lowest = MIN_RPS.min(configured);
        let stored = self.effective_rps;
        if stored.is_nan() || stored < lowest {
            return Some(lowest);
        }
        Some(stored.min(configured))
    }

    /// Reserve up to `want` permits at `now` under `configured`.
    ///
    /// While a 429's pause holds, grants nothing and answers `retry_at = paused_until`.
    /// Otherwise applies a due recovery step, then grants as many permits as are conformant at
    /// `now`, up to `want`: the k-th is conformant when `max(tat, now) + (k - 1) × T - now <=
    /// tau`. The TAT advances by `granted × T` from `max(tat, now)`. When `configured` limits
    /// nothing, every permit wanted is granted (the pause still holds).
    pub fn reserve(
        &mut self,
        configured: Rate,
        adaptation: &Adaptation,
        want: u32,
        now: UnixMillis,
    ) -> Grant {
        if self.paused_at(now) {
            return Grant {
                granted: 0,
                retry_at: (want > 0).then_some(UnixMillis(self.paused_until)),
            };
        }
        let (Some(configured_rps), Some(rate)) = (
            configured.limit(),
            self.rate_in_force(configured, adaptation),
        ) else {
            return Grant {
                granted: want,
                retry_at: None,
            };
        };
        self.effective_rps = rate;
        self.recover(configured_rps, configured.burst, adaptation, now);
        if want == 0 {
            return Grant {
                granted: 0,
                retry_at: None,
            };
        }

        let gcra = Gcra::new(self.effective_rps, configured_rps, configured.burst);
        let now_us = micros(now.0);
        let base = self.tat_us.max(now_us);
        let ahead = base.saturating_sub(now_us);
        let conformant = if ahead > gcra.tolerance_us {
            0
        } else {
            (gcra.tolerance_us - ahead) / gcra.interval_us + 1
        };
        let granted = conformant.min(i64::from(want));
        if granted > 0 {
            self.tat_us = base.saturating_add(granted.saturating_mul(gcra.interval_us));
        }
        let granted = u32::try_from(granted).unwrap_or(want);
        let retry_at = (granted < want).then(|| {
            // The next permit is conformant once `tat - t <= tau`.
            let next = millis_ceil(self.tat_us.saturating_sub(gcra.tolerance_us));
            UnixMillis(next.max(now.0.saturating_add(1)))
        });
        Grant { granted, retry_at }
    }

    /// Upstream answered 429: pause until `now + retry_after_ms` (or the default pause; at most
    /// [`MAX_PAUSE_MS`], never extending a pause already longer), and unless already paused at
    /// `now`, lower the rate (× `decrease_factor`, floor `max(configured × floor_fraction, 0.1)`).
    /// The bucket is empty when the pause ends: the next permits come evenly at the rate in
    /// force, not as a burst. With adaptation disabled nothing changes.
    pub fn throttle(
        &mut self,
        configured: Rate,
        adaptation: &Adaptation,
        retry_after_ms: Option<i64>,
        now: UnixMillis,
    ) -> Throttled {
        if !adaptation.enabled {
            return Throttled::Ignored;
        }
        // Read before `last_throttled` changes what it means.
        let from = self.rate_in_force(configured, adaptation);
        let pause = retry_after_ms
            .unwrap_or(adaptation.default_pause_ms)
            .clamp(0, MAX_PAUSE_MS);
        let until = now.0.saturating_add(pause);
        // 429s that arrive while the key is paused answer requests sent before the pause: they
        // extend it but do not lower the rate again.
        let already_paused = self.paused_at(now);
        self.paused_until = if self.paused_until == 0 {
            until
        } else {
            self.paused_until.max(until)
        };
        self.last_throttled = now.0;
        let (Some(configured_rps), Some(from)) = (configured.limit(), from) else {
            return Throttled::Paused;
        };

        let mut outcome = Throttled::Paused;
        let mut rate = from;
        if !already_paused {
            let floor = (configured_rps * adaptation.floor_fraction)
                .max(MIN_RPS)
                .min(configured_rps);
            let lowered = (from * adaptation.decrease_factor).max(floor);
            if lowered < from {
                rate = lowered;
                outcome = Throttled::Lowered { from, to: lowered };
            }
        }
        self.effective_rps = rate;
        let gcra = Gcra::new(rate, configured_rps, configured.burst);
        self.start_empty(gcra, self.paused_until.max(now.0));
        outcome
    }

    /// Grows a lowered rate back after a quiet period, one step per second (`recover` in
    /// `limits.rs`). A step starts the bucket empty; the step that reaches the configured rate
    /// also forgets the 429.
    fn recover(&mut self, configured: f64, burst: u32, adaptation: &Adaptation, now: UnixMillis) {
        if self.effective_rps >= configured {
            return;
        }
        let quiet = self.last_throttled == 0
            || now.0.saturating_sub(self.last_throttled) >= adaptation.quiet_period_ms;
        let step_due = self.last_recovery == 0
            || now.0.saturating_sub(self.last_recovery) >= RECOVERY_INTERVAL_MS;
        if !(quiet && step_due) {
            return;
        }
        // Never NaN: `min` returns the configured rate when the sum is NaN.
        let raised = (self.effective_rps + configured * adaptation.recovery_step).min(configured);
        if raised <= self.effective_rps {
            return;
        }
        self.effective_rps = raised;
        self.last_recovery = now.0;
        self.start_empty(Gcra::new(raised, configured, burst), now.0);
        if raised >= configured {
            self.last_throttled = 0;
            self.last_recovery = 0;
        }
    }

    /// Empties the bucket at `at` (milliseconds): one permit then, the next ones evenly. Never
    /// moves the TAT back, which would forgive permits already granted.
    fn start_empty(&mut self, gcra: Gcra, at: i64) {
        let empty = micros(at).saturating_add(gcra.tolerance_us);
        self.tat_us = self.tat_us.max(empty);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Some time in 2023, so that no time here is the 0 that means "none".
    const T0: i64 = 1_700_000_000_000;

    fn at(offset_ms: i64) -> UnixMillis {
        UnixMillis(T0 + offset_ms)
    }

    fn rate(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    fn adaptive() -> Adaptation {
        Adaptation {
            enabled: true,
            decrease_factor: 0.5,
            floor_fraction: 0.05,
            quiet_period_ms: 5_000,
            recovery_step: 0.05,
            default_pause_ms: 1_000,
        }
    }

    #[test]
    fn burst_one_grants_one_then_one_per_interval() {
        let configured = rate(30.0, 1);
        let mut state = BudgetState::fresh(configured);
        let first = state.reserve(configured, &adaptive(), 1, at(0));
        assert_eq!(
            first,
            Grant {
                granted: 1,
                retry_at: None
            }
        );
        // 1/30 s is 33,333.3 µs, rounded up to 33,334 µs: nothing until 34 ms.
        for ms in 0..=33 {
            assert_eq!(
                state.reserve(configured, &adaptive(), 1, at(ms)),
                Grant {
                    granted: 0,
                    retry_at: Some(at(34))
                },
                "at {ms} ms"
            );
        }
        assert_eq!(state.reserve(configured, &adaptive(), 1, at(34)).granted, 1);
        assert_eq!(state.reserve(configured, &adaptive(), 1, at(34)).granted, 0);
    }

    #[test]
    fn a_burst_is_granted_at_once() {
        let configured = rate(30.0, 5);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.reserve(configured, &adaptive(), 10, at(0)),
            Grant {
                granted: 5,
                retry_at: Some(at(34))
            }
        );
        assert_eq!(state.reserve(configured, &adaptive(), 10, at(0)).granted, 0);
        assert_eq!(
            state.reserve(configured, &adaptive(), 10, at(34)).granted,
            1
        );
        // Fewer wanted than available: only those are taken.
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.reserve(configured, &adaptive(), 3, at(0)),
            Grant {
                granted: 3,
                retry_at: None
            }
        );
        assert_eq!(state.reserve(configured, &adaptive(), 3, at(0)).granted, 2);
    }

    #[test]
    fn wanting_nothing_takes_nothing() {
        let configured = rate(30.0, 1);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.reserve(configured, &adaptive(), 0, at(0)),
            Grant {
                granted: 0,
                retry_at: None
            }
        );
        assert_eq!(state.reserve(configured, &adaptive(), 1, at(0)).granted, 1);
    }

    #[test]
    fn a_burst_above_the_rate_is_honoured_at_the_configured_rate() {
        let configured = rate(2.0, 10);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.reserve(configured, &adaptive(), 20, at(0)).granted,
            10
        );
    }

    #[test]
    fn a_row_of_zeros_is_a_fresh_row() {
        let configured = rate(30.0, 5);
        let mut state = BudgetState {
            tat_us: 0,
            effective_rps: 0.0,
            paused_until: 0,
            last_throttled: 0,
            last_recovery: 0,
        };
        assert_eq!(state.reserve(configured, &adaptive(), 10, at(0)).granted, 5);
        assert_eq!(state.effective_rps, 30.0);
    }

    #[test]
    fn idle_time_never_saves_up_more_than_the_burst() {
        let configured = rate(30.0, 5);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(state.reserve(configured, &adaptive(), 5, at(0)).granted, 5);
        // An hour idle: still only the burst.
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 1000, at(3_600_000))
                .granted,
            5
        );
        // And a reservation made now takes only what is conformant now, never future permits.
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 1000, at(3_600_000))
                .granted,
            0
        );
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 1000, at(3_600_034))
                .granted,
            1
        );
    }

    #[test]
    fn microseconds_keep_high_rates_exact() {
        // 1,500/s asked once a millisecond: in whole milliseconds the interval would be 0 (no
        // limit) or 1 ms (1,000/s). In microseconds it is 667 µs: 1.5 permits a millisecond.
        let configured = rate(1500.0, 10);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.reserve(configured, &adaptive(), 10, at(0)).granted,
            10
        );
        let mut granted = 0;
        for ms in 1..=1000 {
            granted += state.reserve(configured, &adaptive(), 10, at(ms)).granted;
        }
        // 1 s / 667 µs = 1,499.25.
        assert!((1_499..=1_500).contains(&granted), "{granted}");
    }

    #[test]
    fn replicas_taking_turns_share_one_limit() {
        let configured = rate(30.0, 1);
        let mut row = BudgetState::fresh(configured);
        let mut granted = [0u32; 3];
        for ms in 0..=1000 {
            // Each replica in turn asks for 10, every millisecond; the first replica to come
            // rotates, as lock order would.
            for turn in 0..3 {
                let replica = (ms as usize + turn) % 3;
                granted[replica] += row.reserve(configured, &adaptive(), 10, at(ms)).granted;
            }
        }
        let total: u32 = granted.iter().sum();
        assert!(total <= 31, "{total} permits in one second at 30/s");
        // The fleet gets its whole budget: permits at 0, 33.3, …, 966.7 ms.
        assert_eq!(total, 30);
        // And it is shared rather than taken by whoever comes first each time.
        assert!(granted.iter().all(|&n| n > 0), "{granted:?}");
    }

    #[test]
    fn a_429_pauses_and_lowers_the_rate_and_the_pause_ends_without_a_burst() {
        let configured = rate(30.0, 30);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(state.reserve(configured, &adaptive(), 5, at(0)).granted, 5);
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(2_000), at(10)),
            Throttled::Lowered {
                from: 30.0,
                to: 15.0
            }
        );
        assert_eq!(state.paused_until, T0 + 2_010);
        for ms in [10, 500, 2_009] {
            assert_eq!(
                state.reserve(configured, &adaptive(), 10, at(ms)),
                Grant {
                    granted: 0,
                    retry_at: Some(at(2_010))
                },
                "at {ms} ms"
            );
        }
        // Two seconds of pause would refill 15 permits at the new rate; the bucket is empty
        // at the end of the pause instead: one permit then, the next 1/15 s later.
        assert_eq!(
            state.reserve(configured, &adaptive(), 10, at(2_010)),
            Grant {
                granted: 1,
                retry_at: Some(at(2_077))
            }
        );
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 10, at(2_077))
                .granted,
            1
        );
    }

    #[test]
    fn a_429_without_retry_after_pauses_for_the_default() {
        let configured = rate(30.0, 30);
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), None, at(0));
        assert_eq!(state.paused_until, T0 + 1_000);
        // Negative and huge pauses are clamped.
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), Some(-5), at(0));
        assert_eq!(state.paused_until, T0);
        assert!(!state.paused_at(at(0)));
        state.throttle(configured, &adaptive(), Some(i64::MAX), at(0));
        assert_eq!(state.paused_until, T0 + MAX_PAUSE_MS);
    }

    #[test]
    fn a_429_while_paused_extends_the_pause_without_lowering_again() {
        let configured = rate(30.0, 30);
        let mut state = BudgetState::fresh(configured);
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(1_000), at(0)),
            Throttled::Lowered {
                from: 30.0,
                to: 15.0
            }
        );
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(3_000), at(500)),
            Throttled::Paused
        );
        assert_eq!(state.effective_rps, 15.0);
        assert_eq!(state.paused_until, T0 + 3_500);
        // A shorter pause does not shorten it.
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(10), at(600)),
            Throttled::Paused
        );
        assert_eq!(state.paused_until, T0 + 3_500);
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 1, at(3_000))
                .retry_at,
            Some(at(3_500))
        );
        // The extended pause also ends with an empty bucket.
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 10, at(3_500))
                .granted,
            1
        );
        // Once the pause is over, a 429 lowers again.
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(1_000), at(4_000)),
            Throttled::Lowered {
                from: 15.0,
                to: 7.5
            }
        );
    }

    #[test]
    fn the_rate_never_drops_below_its_floor() {
        let configured = rate(30.0, 30);
        let mut state = BudgetState::fresh(configured);
        for i in 0..20 {
            state.throttle(configured, &adaptive(), Some(1_000), at(2_000 * i));
        }
        // 5 % of 30/s.
        assert_eq!(state.effective_rps, 1.5);
        assert_eq!(
            state.throttle(configured, &adaptive(), Some(1_000), at(50_000)),
            Throttled::Paused
        );
        // And never below 0.1/s, whatever the fraction.
        let configured = rate(1.0, 1);
        let mut state = BudgetState::fresh(configured);
        for i in 0..20 {
            state.throttle(configured, &adaptive(), Some(1_000), at(2_000 * i));
        }
        assert_eq!(state.effective_rps, 0.1);
    }

    #[test]
    fn the_burst_shrinks_with_the_rate() {
        let configured = rate(30.0, 30);
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), Some(1_000), at(0));
        state.throttle(configured, &adaptive(), Some(1_000), at(2_000));
        assert_eq!(state.effective_rps, 7.5);
        // Long idle after the pause: a burst of floor(7.5) = 7, not 30.
        assert_eq!(
            state
                .reserve(configured, &adaptive(), 100, at(4_000))
                .granted,
            7
        );
    }

    #[test]
    fn the_rate_recovers_additively_after_a_quiet_period() {
        let configured = rate(40.0, 40);
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), Some(1_000), at(0));
        assert_eq!(state.effective_rps, 20.0);
        // Within the quiet period (5 s) nothing changes.
        state.reserve(configured, &adaptive(), 1, at(4_999));
        assert_eq!(state.effective_rps, 20.0);
        // Then one step (5 % of 40/s) per second, however often reservations come.
        let mut expected = 20.0;
        for second in 5..=10 {
            for ms in [0, 100, 999] {
                state.reserve(configured, &adaptive(), 1, at(second * 1_000 + ms));
            }
            expected = f64::min(expected + 2.0, 40.0);
            assert_eq!(state.effective_rps, expected, "after {second} s");
        }
        assert_ne!(state.last_throttled, 0);
        // Capped at the configured rate, and then the 429 is forgotten.
        for second in 11..30 {
            state.reserve(configured, &adaptive(), 1, at(second * 1_000));
        }
        assert_eq!(state.effective_rps, 40.0);
        assert_eq!(state.last_throttled, 0);
        assert_eq!(state.last_recovery, 0);
    }

    #[test]
    fn a_recovery_step_starts_the_bucket_empty() {
        let configured = rate(40.0, 40);
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), Some(1_000), at(0));
        // Idle long enough to refill at 20/s, but the step to 22/s empties the bucket.
        assert_eq!(
            state.reserve(configured, &adaptive(), 100, at(6_000)),
            Grant {
                granted: 1,
                retry_at: Some(at(6_046))
            }
        );
        assert_eq!(state.effective_rps, 22.0);
    }

    #[test]
    fn a_reconfigured_lower_rate_applies_at_once() {
        let mut state = BudgetState::fresh(rate(30.0, 30));
        assert_eq!(
            state.reserve(rate(30.0, 30), &adaptive(), 1, at(0)).granted,
            1
        );
        let lower = rate(10.0, 1);
        assert_eq!(
            state.reserve(lower, &adaptive(), 10, at(100)),
            Grant {
                granted: 1,
                retry_at: Some(at(200))
            }
        );
        assert_eq!(state.effective_rps, 10.0);
        // Lowered by a 429 and then reconfigured below that: the configured rate caps it.
        let mut state = BudgetState::fresh(rate(30.0, 30));
        state.throttle(rate(30.0, 30), &adaptive(), Some(1_000), at(0));
        assert_eq!(state.effective_rps, 15.0);
        state.reserve(lower, &adaptive(), 1, at(2_000));
        assert_eq!(state.effective_rps, 10.0);
        assert_eq!(
            state.throttle(lower, &adaptive(), Some(1_000), at(2_000)),
            Throttled::Lowered {
                from: 10.0,
                to: 5.0
            }
        );
    }

    #[test]
    fn a_reconfigured_higher_rate_applies_at_once_unless_a_429_lowered_it() {
        let mut state = BudgetState::fresh(rate(10.0, 10));
        state.reserve(rate(20.0, 20), &adaptive(), 1, at(0));
        assert_eq!(state.effective_rps, 20.0);
        // Lowered by a 429: it recovers step by step, towards the new rate.
        state.throttle(rate(20.0, 20), &adaptive(), Some(1_000), at(0));
        assert_eq!(state.effective_rps, 10.0);
        state.reserve(rate(40.0, 40), &adaptive(), 1, at(1_000));
        assert_eq!(state.effective_rps, 10.0);
        state.reserve(rate(40.0, 40), &adaptive(), 1, at(5_000));
        assert_eq!(state.effective_rps, 12.0);
    }

    #[test]
    fn adaptation_can_be_turned_off() {
        let configured = rate(40.0, 40);
        let off = Adaptation {
            enabled: false,
            ..adaptive()
        };
        let mut state = BudgetState::fresh(configured);
        let before = state.clone();
        assert_eq!(
            state.throttle(configured, &off, Some(5_000), at(0)),
            Throttled::Ignored
        );
        assert_eq!(state, before);
        assert_eq!(state.reserve(configured, &off, 100, at(0)).granted, 40);
        // A rate lowered before adaptation was turned off is back to the configured one.
        let mut state = BudgetState::fresh(configured);
        state.throttle(configured, &adaptive(), Some(0), at(0));
        assert_eq!(state.effective_rps, 20.0);
        state.reserve(configured, &off, 1, at(1));
        assert_eq!(state.effective_rps, 40.0);
    }

    #[test]
    fn an_unlimited_rate_grants_everything_but_still_pauses() {
        for per_second in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let configured = rate(per_second, 1);
            let mut state = BudgetState::fresh(configured);
            assert_eq!(
                state.reserve(configured, &adaptive(), 1_000, at(0)),
                Grant {
                    granted: 1_000,
                    retry_at: None
                }
            );
            assert_eq!(
                state.throttle(configured, &adaptive(), Some(1_000), at(0)),
                Throttled::Paused
            );
            assert_eq!(
                state.reserve(configured, &adaptive(), 1, at(500)),
                Grant {
                    granted: 0,
                    retry_at: Some(at(1_000))
                }
            );
            assert_eq!(
                state.reserve(configured, &adaptive(), 7, at(1_000)).granted,
                7
            );
        }
    }

    #[test]
    fn absurd_inputs_never_panic() {
        let rates = [
            f64::NAN,
            0.0,
            -1.0,
            f64::INFINITY,
            f64::MIN_POSITIVE,
            1e-300,
            0.05,
            0.1,
            1e300,
            f64::MAX,
        ];
        let bursts = [0, 1, 2, u32::MAX];
        let nows = [i64::MIN, -1_000, -1, 0, 1, T0, i64::MAX - 1, i64::MAX];
        let retry_afters = [None, Some(i64::MIN), Some(-1), Some(0), Some(i64::MAX)];
        let adaptations = [
            adaptive(),
            Adaptation {
                enabled: true,
                decrease_factor: f64::NAN,
                floor_fraction: f64::NAN,
                quiet_period_ms: i64::MIN,
                recovery_step: f64::NAN,
                default_pause_ms: i64::MAX,
            },
            Adaptation {
                enabled: true,
                decrease_factor: -1.0,
                floor_fraction: f64::INFINITY,
                quiet_period_ms: i64::MAX,
                recovery_step: -1.0,
                default_pause_ms: i64::MIN,
            },
            Adaptation {
                enabled: true,
                decrease_factor: f64::INFINITY,
                floor_fraction: -1.0,
                quiet_period_ms: -1,
                recovery_step: f64::INFINITY,
                default_pause_ms: -1,
            },
        ];
        let rows = [
            BudgetState::fresh(rate(30.0, 5)),
            BudgetState {
                tat_us: i64::MAX,
                effective_rps: f64::NAN,
                paused_until: i64::MAX,
                last_throttled: i64::MIN,
                last_recovery: i64::MAX,
            },
            BudgetState {
                tat_us: i64::MIN,
                effective_rps: -1.0,
                paused_until: i64::MIN,
                last_throttled: i64::MAX,
                last_recovery: i64::MIN,
            },
            BudgetState {
                tat_us: 0,
                effective_rps: f64::INFINITY,
                paused_until: 0,
                last_throttled: 1,
                last_recovery: 0,
            },
        ];
        for per_second in rates {
            for burst in bursts {
                let configured = rate(per_second, burst);
                for adaptation in &adaptations {
                    for row in &rows {
                        let mut state = row.clone();
                        for &now in &nows {
                            for retry_after in retry_afters {
                                for want in [0, 1, 7, u32::MAX] {
                                    let grant = state.reserve(
                                        configured,
                                        adaptation,
                                        want,
                                        UnixMillis(now),
                                    );
                                    assert!(grant.granted <= want);
                                    assert_eq!(grant.retry_at.is_some(), grant.granted < want);
                                    if let Some(retry_at) = grant.retry_at
                                        && !state.paused_at(UnixMillis(now))
                                    {
                                        assert!(
                                            retry_at.0 > now || now == i64::MAX,
                                            "{retry_at:?} at {now}"
                                        );
                                    }
                                }
                                state.throttle(
                                    configured,
                                    adaptation,
                                    retry_after,
                                    UnixMillis(now),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// One step of the simulation: a replica (with its clock's skew) reserves or reports a 429.
    #[derive(Debug, Clone)]
    enum Step {
        Reserve {
            advance_ms: i64,
            replica: usize,
            want: u32,
        },
        Throttle {
            advance_ms: i64,
            replica: usize,
            retry_after_ms: Option<i64>,
        },
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            8 => (0i64..200, 0usize..3, 0u32..20).prop_map(|(advance_ms, replica, want)| {
                Step::Reserve { advance_ms, replica, want }
            }),
            1 => (0i64..200, 0usize..3, proptest::option::of(0i64..3_000)).prop_map(
                |(advance_ms, replica, retry_after_ms)| Step::Throttle {
                    advance_ms,
                    replica,
                    retry_after_ms,
                }
            ),
        ]
    }

    proptest::proptest! {
        /// Whatever the order in which replicas reserve, whatever 429s and recovery steps
        /// happen in between and however their clocks are skewed, the permits granted with
        /// `now` in any interval of length t are at most burst + rate × t of the configured
        /// rate; and the TAT never moves back.
        #[test]
        fn the_fleet_never_exceeds_burst_plus_rate_times_t(
            per_second in 1u32..2_000,
            burst in 0u32..100,
            skews in proptest::array::uniform3(-20i64..20),
            quiet_period_ms in 0i64..5_000,
            steps in proptest::collection::vec(step(), 1..200),
        ) {
            let configured = rate(f64::from(per_second), burst);
            let adaptation = Adaptation { quiet_period_ms, ..adaptive() };
            let mut state = BudgetState::fresh(configured);
            let mut clock = T0;
            let mut grants: Vec<(i64, u32)> = Vec::new();
            for step in steps {
                let tat_before = state.tat_us;
                match step {
                    Step::Reserve { advance_ms, replica, want } => {
                        clock += advance_ms;
                        let now = UnixMillis(clock + skews[replica]);
                        let grant = state.reserve(configured, &adaptation, want, now);
                        proptest::prop_assert!(grant.granted <= want);
                        if grant.granted > 0 {
                            grants.push((now.0, grant.granted));
                        }
                    }
                    Step::Throttle { advance_ms, replica, retry_after_ms } => {
                        clock += advance_ms;
                        let now = UnixMillis(clock + skews[replica]);
                        state.throttle(configured, &adaptation, retry_after_ms, now);
                    }
                }
                proptest::prop_assert!(state.tat_us >= tat_before);
                proptest::prop_assert!(state.effective_rps <= f64::from(per_second));
            }
            grants.sort_unstable();
            let burst = f64::from(burst.max(1));
            for (i, &(start, _)) in grants.iter().enumerate() {
                let mut count = 0u64;
                for &(end, n) in &grants[i..] {
                    count += u64::from(n);
                    let seconds = (end - start) as f64 / 1_000.0;
                    let allowed = burst + f64::from(per_second) * seconds;
                    proptest::prop_assert!(
                        count as f64 <= allowed + 1e-9,
                        "{count} permits in {seconds} s at {per_second}/s burst {burst}"
                    );
                }
            }
        }

        /// Any row and any input: no panic, never more than wanted, a retry time exactly when
        /// fewer were granted.
        #[test]
        fn any_input_is_answered(
            per_second in proptest::num::f64::ANY,
            burst in proptest::num::u32::ANY,
            tat_us in proptest::num::i64::ANY,
            effective_rps in proptest::num::f64::ANY,
            paused_until in proptest::num::i64::ANY,
            last_throttled in proptest::num::i64::ANY,
            last_recovery in proptest::num::i64::ANY,
            now in proptest::num::i64::ANY,
            want in proptest::num::u32::ANY,
            retry_after in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let configured = rate(per_second, burst);
            let mut state = BudgetState {
                tat_us,
                effective_rps,
                paused_until,
                last_throttled,
                last_recovery,
            };
            let grant = state.reserve(configured, &adaptive(), want, UnixMillis(now));
            proptest::prop_assert!(grant.granted <= want);
            proptest::prop_assert_eq!(grant.retry_at.is_some(), grant.granted < want);
            state.throttle(configured, &adaptive(), retry_after, UnixMillis(now));
            let grant = state.reserve(configured, &adaptive(), want, UnixMillis(now));
            proptest::prop_assert!(grant.granted <= want);
        }
    }
}
