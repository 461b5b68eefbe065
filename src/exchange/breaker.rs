//! The circuit breaker: a run of upstream 5xx answers or transport failures stops attempts for a
//! cool-down, then a single probe decides whether traffic resumes.
//!
//! Closed --(failure_threshold consecutive failures)--> Open --(cool_down)--> HalfOpen
//! HalfOpen --(probe answered)--> Closed; HalfOpen --(probe failed)--> Open.
//!
//! While the breaker is open, jobs wait in the queue (their TTL still running). Every
//! transition is logged. Time is an argument, so the state machine is tested without a clock.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::exchange::upstream::{AttemptOutcome, StatusClass};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 disables it.
    pub failure_threshold: u32,
    /// How long the breaker stays open before a probe.
    pub cool_down: Duration,
}

/// What an attempt's outcome says about upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Upstream answered with something other than a server error (4xx included: it is up).
    Healthy,
    /// A 500, 502, 503 or 504, or no answer at all.
    Unhealthy,
}

impl Signal {
    pub fn of(outcome: &AttemptOutcome) -> Signal {
        match outcome {
            AttemptOutcome::Answered(answer)
                if StatusClass::of(answer.status) == StatusClass::ServerError =>
            {
                Signal::Unhealthy
            }
            AttemptOutcome::Answered(_) => Signal::Healthy,
            AttemptOutcome::NotSent | AttemptOutcome::AnswerLost => Signal::Unhealthy,
        }
    }
}

/// What the dispatcher may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: attempts start as usual.
    Open,
    /// Half-open: start exactly one attempt, the probe. If none can start, call
    /// [`Breaker::probe_not_sent`].
    Probe,
    /// Open, or a probe is in flight: no attempt may start for this long.
    Wait(Duration),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_in_flight: bool },
}

#[derive(Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: Mutex<State>,
}

/// How long the dispatcher waits for a probe's result before asking again.
const PROBE_WAIT: Duration = Duration::from_millis(100);

impl Breaker {
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    pub fn state(&self) -> BreakerState {
        match *self.state.lock() {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// May attempts start at `now`?
    pub fn admit(&self, now: Instant) -> Admission {
        let mut state = self.state.lock();
        match *state {
            State::Closed { .. } => Admission::Open,
            State::Open { until } if now < until => Admission::Wait(until - now),
            State::Open { .. }
            | State::HalfOpen {
                probe_in_flight: false,
            } => {
                if matches!(*state, State::Open { .. }) {
                    tracing::info!("circuit breaker half-open: sending one probe");
                }
                *state = State::HalfOpen {
                    probe_in_flight: true,
                };
                Admission::Probe
            }
            State::HalfOpen {
                probe_in_flight: true,
            } => Admission::Wait(PROBE_WAIT),
        }
    }

    /// The admitted probe could not start (nothing was due): admit another later.
    pub fn probe_not_sent(&self) {
        let mut state = self.state.lock();
        if let State::HalfOpen { probe_in_flight } = &mut *state {
            *probe_in_flight = false;
        }
    }

    /// Records an attempt's outcome.
    pub fn record(&self, signal: Signal, now: Instant) {
        if self.config.failure_threshold == 0 {
            return;
        }
        let mut state = self.state.lock();
        match (&mut *state, signal) {
            (State::Closed { failures }, Signal::Healthy) => *failures = 0,
            (State::Closed { failures }, Signal::Unhealthy) => {
                *failures += 1;
                if *failures >= self.config.failure_threshold {
                    tracing::warn!(
                        failures = *failures,
                        cool_down_ms = self.config.cool_down.as_millis() as u64,
                        "circuit breaker opened: upstream is failing; attempts paused"
                    );
                    *state = State::Open {
                        until: crate::domain::job::instant_after(now, self.config.cool_down),
                    };
                }
            }
            // Late results of attempts started before the breaker opened change nothing.
            (State::Open { .. }, _) => {}
            (State::HalfOpen { .. }, Signal::Healthy) => {
                tracing::info!("circuit breaker closed: the probe succeeded");
                *state = State::Closed { failures: 0 };
            }
            (State::HalfOpen { .. }, Signal::Unhealthy) => {
                tracing::warn!(
                    cool_down_ms = self.config.cool_down.as_millis() as u64,
                    "circuit breaker re-opened: the probe failed"
                );
                *state = State::Open {
                    until: crate::domain::job::instant_after(now, self.config.cool_down),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: BreakerConfig = BreakerConfig {
        failure_threshold: 3,
        cool_down: Duration::from_secs(5),
    };

    #[test]
    fn a_run_of_failures_opens_it_and_a_success_resets_the_run() {
        let breaker = Breaker::new(CONFIG);
        let t0 = Instant::now();
        breaker.record(Signal::Unhealthy, t0);
        breaker.record(Signal::Unhealthy, t0);
        breaker.record(Signal::Healthy, t0);
        breaker.record(Signal::Unhealthy, t0);
        breaker.record(Signal::Unhealthy, t0);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.admit(t0), Admission::Open);
        breaker.record(Signal::Unhealthy, t0);
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(
            breaker.admit(t0 + Duration::from_secs(1)),
            Admission::Wait(Duration::from_secs(4))
        );
    }

    #[test]
    fn after_the_cool_down_one_probe_decides() {
        let breaker = Breaker::new(CONFIG);
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.record(Signal::Unhealthy, t0);
        }
        let later = t0 + Duration::from_secs(5);
        assert_eq!(breaker.admit(later), Admission::Probe);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert_eq!(
            breaker.admit(later),
            Admission::Wait(PROBE_WAIT),
            "one probe only"
        );

        breaker.record(Signal::Unhealthy, later);
        assert_eq!(
            breaker.state(),
            BreakerState::Open,
            "a failed probe re-opens it"
        );
        let again = later + Duration::from_secs(5);
        assert_eq!(breaker.admit(again), Admission::Probe);
        breaker.record(Signal::Healthy, again);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.admit(again), Admission::Open);
    }

    #[test]
    fn a_probe_that_could_not_start_is_admitted_again() {
        let breaker = Breaker::new(CONFIG);
        let t0 = Instant::now();
        for _ in 0..3 {
            breaker.record(Signal::Unhealthy, t0);
        }
        let later = t0 + Duration::from_secs(6);
        assert_eq!(breaker.admit(later), Admission::Probe);
        breaker.probe_not_sent();
        assert_eq!(breaker.admit(later), Admission::Probe);
    }

    #[test]
    fn a_zero_threshold_disables_it() {
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: 0,
            ..CONFIG
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            breaker.record(Signal::Unhealthy, t0);
        }
        assert_eq!(breaker.admit(t0), Admission::Open);
    }

    #[test]
    fn server_errors_and_lost_answers_are_unhealthy_refusals_are_not() {
        use crate::exchange::upstream::Answer;
        let answered = |status| {
            AttemptOutcome::Answered(Answer {
                status,
                retry_after: None,
                token: None,
                hint: None,
            })
        };
        for status in [500, 502, 503, 504] {
            assert_eq!(Signal::of(&answered(status)), Signal::Unhealthy);
        }
        for status in [200, 400, 403, 429] {
            assert_eq!(Signal::of(&answered(status)), Signal::Healthy);
        }
        assert_eq!(Signal::of(&AttemptOutcome::NotSent), Signal::Unhealthy);
        assert_eq!(Signal::of(&AttemptOutcome::AnswerLost), Signal::Unhealthy);
    }
}
