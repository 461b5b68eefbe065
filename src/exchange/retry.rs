//! The retry decision, as pure functions: no I/O, no clock.
//!
//! [`classify`] says *whether* an attempt's outcome is a success, a retryable failure or a final
//! failure; [`backoff_delay`] says *when* the next attempt is due; [`decide`] combines both with
//! the job's history (attempts made, time to live, earlier lost answers) into what the worker
//! commits.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::{
    config::RetryConfig,
    domain::job::TokenGrant,
    domain::job::{FailureReason, UnixMillis},
    exchange::upstream::{AttemptOutcome, StatusClass},
};

/// The retry settings, converted once from configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl From<&RetryConfig> for RetryPolicy {
    fn from(config: &RetryConfig) -> Self {
        Self {
            max_attempts: config.max_attempts,
            initial_delay: Duration::from_millis(config.initial_delay_ms),
            max_delay: Duration::from_millis(config.max_delay_ms),
        }
    }
}

/// What one attempt's outcome means, before the job's history is considered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Success(TokenGrant),
    Retry {
        cause: RetryCause,
        /// Upstream's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    Fail {
        reason: FailureReason,
        detail: String,
    },
}

/// Why an attempt is worth repeating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryCause {
    /// 429: upstream asked us to slow down.
    RateLimited,
    /// 500, 502, 503 or 504.
    ServerError(u16),
    /// The request certainly never left (connect refused, DNS, TLS handshake).
    NotSent,
    /// The request may have reached upstream; its answer was never seen.
    AnswerLost,
}

impl RetryCause {
    pub fn describe(self) -> String {
        match self {
            RetryCause::RateLimited => "upstream answered 429 (rate limited)".to_string(),
            RetryCause::ServerError(status) => format!("upstream answered {status}"),
            RetryCause::NotSent => "could not connect to upstream".to_string(),
            RetryCause::AnswerLost => {
                "upstream's answer was lost (timeout or broken connection)".to_string()
            }
        }
    }
}

/// Classifies one attempt's outcome by HTTP status first, as the upstream contract requires.
pub fn classify(outcome: &AttemptOutcome) -> Verdict {
    let answer = match outcome {
        AttemptOutcome::NotSent => {
            return Verdict::Retry {
                cause: RetryCause::NotSent,
                retry_after: None,
            };
        }
        AttemptOutcome::AnswerLost => {
            return Verdict::Retry {
                cause: RetryCause::AnswerLost,
                retry_after: None,
            };
        }
        AttemptOutcome::Answered(answer) => answer,
    };
    let hint = |what: &str| match answer.hint {
        Some(hint) => format!("upstream answered {} ({hint})", answer.status),
        None => format!("upstream answered {} ({what})", answer.status),
    };
    match StatusClass::of(answer.status) {
        StatusClass::Success => match &answer.token {
            Some(grant) => Verdict::Success(grant.clone()),
            None => Verdict::Fail {
                reason: FailureReason::UpstreamProtocol,
                detail: format!("upstream answered {} without a usable token", answer.status),
            },
        },
        StatusClass::BadRequest => Verdict::Fail {
            reason: FailureReason::InvalidRequest,
            detail: hint("bad request"),
        },
        StatusClass::Forbidden => Verdict::Fail {
            reason: FailureReason::Forbidden,
            detail: hint("forbidden"),
        },
        StatusClass::RateLimited => Verdict::Retry {
            cause: RetryCause::RateLimited,
            retry_after: answer.retry_after,
        },
        StatusClass::ServerError => Verdict::Retry {
            cause: RetryCause::ServerError(answer.status),
            // Retry-After is defined for 503 (and 429); a 500 carrying one is honoured too.
            retry_after: answer.retry_after,
        },
        StatusClass::Undocumented => Verdict::Fail {
            reason: FailureReason::UpstreamProtocol,
            detail: format!("upstream answered undocumented status {}", answer.status),
        },
    }
}

/// The delay before retry number `retry` (1 for the first retry): exponential from the initial
/// delay, doubled each time, plus jitter of up to the same again, capped at the maximum delay.
/// `jitter_seed` makes the jitter reproducible; the worker passes a random one.
pub fn backoff_delay(policy: &RetryPolicy, retry: u32, jitter_seed: u64) -> Duration {
    let nth = usize::try_from(retry.max(1) - 1).unwrap_or(usize::MAX);
    ExponentialBuilder::new()
        .with_min_delay(policy.initial_delay)
        .with_max_delay(policy.max_delay)
        .with_factor(2.0)
        .with_jitter()
        .with_jitter_seed(jitter_seed)
        .without_max_times()
        .build()
        .nth(nth)
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay)
}

/// What the job has been through before this attempt's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobHistory {
    /// The number of the attempt that just ended (1 for the first).
    pub attempt: u32,
    /// Whether an earlier attempt's answer was lost.
    pub outcome_unknown: bool,
    pub expires_at: UnixMillis,
}

/// What the worker commits for an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Succeed {
        grant: TokenGrant,
    },
    RetryAt {
        at: UnixMillis,
        detail: String,
        /// True once any attempt of the job may have reached upstream unseen.
        outcome_unknown: bool,
    },
    Fail {
        reason: FailureReason,
        detail: String,
        outcome_unknown: bool,
    },
}

/// Decides the job's next step after an attempt that ended at `now`.
pub fn decide(
    policy: &RetryPolicy,
    history: &JobHistory,
    outcome: &AttemptOutcome,
    now: UnixMillis,
    jitter_seed: u64,
) -> Decision {
    let outcome_unknown = history.outcome_unknown || matches!(outcome, AttemptOutcome::AnswerLost);
    match classify(outcome) {
        Verdict::Success(grant) => Decision::Succeed { grant },
        Verdict::Fail {
            reason: FailureReason::Forbidden,
            detail,
        } if history.outcome_unknown => Decision::Fail {
            // The code may have been redeemed by the attempt whose answer was lost: this 403 is
            // not evidence that the caller sent a bad code.
            reason: FailureReason::OutcomeUnknown,
            detail: format!("{detail}, after an earlier attempt's answer was lost"),
            outcome_unknown,
        },
        Verdict::Fail { reason, detail } => Decision::Fail {
            reason,
            detail,
            outcome_unknown,
        },
        Verdict::Retry { cause, retry_after } => {
            let detail = cause.describe();
            if history.attempt >= policy.max_attempts {
                return Decision::Fail {
                    reason: FailureReason::RetriesExhausted,
                    detail: format!("{detail}; {} attempts made", history.attempt),
                    outcome_unknown,
                };
            }
            let backoff = backoff_delay(policy, history.attempt, jitter_seed);
            let delay = retry_after.map_or(backoff, |after| after.max(backoff));
            let at = now.saturating_add(delay);
            if at >= history.expires_at {
                return Decision::Fail {
                    reason: FailureReason::Expired,
                    detail: format!("{detail}; the next attempt would be after the job expires"),
                    outcome_unknown,
                };
            }
            Decision::RetryAt {
                at,
                detail,
                outcome_unknown,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{domain::secret::SecretString, exchange::upstream::Answer};

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 4,
        initial_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
    };
    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn answered(status: u16) -> AttemptOutcome {
        AttemptOutcome::Answered(Answer {
            status,
            retry_after: None,
            token: None,
            hint: None,
        })
    }

    fn grant() -> TokenGrant {
        TokenGrant {
            access_token: SecretString::from("tok"),
            token_type: "Bearer".into(),
            expires_in: 3600,
        }
    }

    fn history(attempt: u32) -> JobHistory {
        JobHistory {
            attempt,
            outcome_unknown: false,
            expires_at: UnixMillis(NOW.0 + 60_000),
        }
    }

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        let ok = AttemptOutcome::Answered(Answer {
            status: 200,
            retry_after: None,
            token: Some(grant()),
            hint: None,
        });
        assert_eq!(classify(&ok), Verdict::Success(grant()));
        for (status, reason) in [
            (200, FailureReason::UpstreamProtocol),
            (400, FailureReason::InvalidRequest),
            (403, FailureReason::Forbidden),
            (401, FailureReason::UpstreamProtocol),
            (404, FailureReason::UpstreamProtocol),
            (302, FailureReason::UpstreamProtocol),
            (501, FailureReason::UpstreamProtocol),
        ] {
            assert!(
                matches!(classify(&answered(status)), Verdict::Fail { reason: r, .. } if r == reason),
                "status {status}"
            );
        }
        for status in [429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(&answered(status)), Verdict::Retry { .. }),
                "status {status}"
            );
        }
        assert!(matches!(
            classify(&AttemptOutcome::NotSent),
            Verdict::Retry {
                cause: RetryCause::NotSent,
                ..
            }
        ));
        assert!(matches!(
            classify(&AttemptOutcome::AnswerLost),
            Verdict::Retry {
                cause: RetryCause::AnswerLost,
                ..
            }
        ));
    }

    #[test]
    fn a_hint_refines_the_detail_but_never_the_reason() {
        let outcome = AttemptOutcome::Answered(Answer {
            status: 403,
            retry_after: None,
            token: None,
            hint: Some("invalid or expired code verifier"),
        });
        assert_eq!(
            classify(&outcome),
            Verdict::Fail {
                reason: FailureReason::Forbidden,
                detail: "upstream answered 403 (invalid or expired code verifier)".into()
            }
        );
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_is_capped() {
        for seed in 0..200 {
            for retry in 1..=10u32 {
                let base = (POLICY.initial_delay * 2u32.pow(retry - 1)).min(POLICY.max_delay);
                let delay = backoff_delay(&POLICY, retry, seed);
                assert!(
                    delay >= base,
                    "retry {retry} seed {seed}: {delay:?} < {base:?}"
                );
                assert!(delay <= (base * 2).min(POLICY.max_delay));
            }
        }
        assert_eq!(backoff_delay(&POLICY, 3, 7), backoff_delay(&POLICY, 3, 7));
        assert_eq!(backoff_delay(&POLICY, 30, 7), POLICY.max_delay);
    }

    #[test]
    fn retryable_failures_are_scheduled_after_the_backoff() {
        let decision = decide(&POLICY, &history(1), &answered(503), NOW, 1);
        let Decision::RetryAt {
            at,
            outcome_unknown,
            ..
        } = decision
        else {
            panic!("expected a retry, got {decision:?}");
        };
        assert!(!outcome_unknown);
        let delay = NOW.until(at);
        assert!(delay >= Duration::from_millis(100) && delay <= Duration::from_millis(200));
    }

    #[test]
    fn retry_after_is_honoured_when_longer_than_the_backoff() {
        let outcome = AttemptOutcome::Answered(Answer {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            token: None,
            hint: None,
        });
        let Decision::RetryAt { at, .. } = decide(&POLICY, &history(1), &outcome, NOW, 1) else {
            panic!("expected a retry");
        };
        assert_eq!(NOW.until(at), Duration::from_secs(7));
    }

    #[test]
    fn the_last_allowed_attempt_exhausts_retries() {
        let decision = decide(&POLICY, &history(4), &answered(500), NOW, 1);
        assert!(matches!(
            decision,
            Decision::Fail {
                reason: FailureReason::RetriesExhausted,
                ..
            }
        ));
    }

    #[test]
    fn a_retry_that_would_land_after_the_ttl_expires_the_job_now() {
        let mut history = history(1);
        history.expires_at = UnixMillis(NOW.0 + 50);
        let decision = decide(&POLICY, &history, &answered(500), NOW, 1);
        assert!(matches!(
            decision,
            Decision::Fail {
                reason: FailureReason::Expired,
                ..
            }
        ));
    }

    #[test]
    fn a_lost_answer_marks_the_outcome_unknown_and_a_later_403_says_so() {
        let decision = decide(&POLICY, &history(1), &AttemptOutcome::AnswerLost, NOW, 1);
        assert!(matches!(
            decision,
            Decision::RetryAt {
                outcome_unknown: true,
                ..
            }
        ));
        let decision = decide(&POLICY, &history(1), &AttemptOutcome::NotSent, NOW, 1);
        assert!(matches!(
            decision,
            Decision::RetryAt {
                outcome_unknown: false,
                ..
            }
        ));

        let mut after_loss = history(2);
        after_loss.outcome_unknown = true;
        let decision = decide(&POLICY, &after_loss, &answered(403), NOW, 1);
        assert!(matches!(
            decision,
            Decision::Fail {
                reason: FailureReason::OutcomeUnknown,
                outcome_unknown: true,
                ..
            }
        ));
        // Without a lost answer before it, a 403 is the caller's code being refused.
        let decision = decide(&POLICY, &history(2), &answered(403), NOW, 1);
        assert!(matches!(
            decision,
            Decision::Fail {
                reason: FailureReason::Forbidden,
                ..
            }
        ));
    }

    /// Drives a job through repeated 503s on tokio's paused clock, sleeping until each decided
    /// retry time as the worker does, and checks the schedule: each gap is the backoff for that
    /// retry, the last allowed attempt fails, and nothing waits longer than the cap.
    #[tokio::test(start_paused = true)]
    async fn a_retry_schedule_under_paused_time_follows_the_policy() {
        let start = tokio::time::Instant::now();
        let clock =
            |instant: tokio::time::Instant| NOW.saturating_add(instant.duration_since(start));
        let mut history = history(1);
        history.expires_at = UnixMillis(NOW.0 + 3_600_000);
        let mut gaps = Vec::new();
        loop {
            let now = clock(tokio::time::Instant::now());
            match decide(
                &POLICY,
                &history,
                &answered(503),
                now,
                u64::from(history.attempt),
            ) {
                Decision::RetryAt { at, .. } => {
                    let before = tokio::time::Instant::now();
                    tokio::time::sleep(now.until(at)).await;
                    gaps.push(before.elapsed());
                    history.attempt += 1;
                }
                Decision::Fail { reason, .. } => {
                    assert_eq!(reason, FailureReason::RetriesExhausted);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(gaps.len() as u32, POLICY.max_attempts - 1);
        for (i, gap) in gaps.iter().enumerate() {
            let retry = i as u32 + 1;
            // The policy, written out: the initial delay doubled per retry, plus jitter of up
            // to as much again, never above the cap (stored times have millisecond
            // resolution, so a gap may be a millisecond short).
            let base = (POLICY.initial_delay * 2u32.pow(retry - 1)).min(POLICY.max_delay);
            let ceiling = (base * 2).min(POLICY.max_delay);
            assert!(
                *gap + Duration::from_millis(1) >= base && *gap <= ceiling,
                "retry {retry}: a gap of {gap:?} is outside {base:?}..={ceiling:?}"
            );
        }
        assert_eq!(start.elapsed(), gaps.iter().sum::<Duration>());
    }
}
