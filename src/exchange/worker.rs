//! The worker: a dispatcher that claims due jobs within the rate limits, and one task per
//! attempt that calls upstream and records the outcome.
//!
//! The dispatcher never blocks on one client's limiter: a client whose limit is exhausted is
//! left out of the next claims until its limiter has a permit, while other clients' due jobs go
//! ahead. Waiting for a permit happens before the claim, so it is not an attempt and costs the
//! job nothing.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};
use tracing::Instrument;

use crate::{
    config::Config,
    domain::budget::Throttled,
    domain::job::{JobState, UnixMillis},
    exchange::breaker::{Admission, Breaker, BreakerConfig, BreakerState, Signal},
    exchange::limits::{Permit, RateLimits},
    exchange::retry::{self, Decision, JobHistory, RetryPolicy},
    exchange::schedule::ClientSchedule,
    exchange::upstream::{AttemptOutcome, UpstreamClient},
    ops::metrics::Metrics,
    store::{
        AttemptRecord, BudgetRequest, Candidate, Claim, Deliveries, OnCommit, StartLease, Store,
        StoreError, feed::JobFeed,
    },
};

/// How often expired jobs and dead leases are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long the dispatcher waits for more free slots after one frees up under load.
const CLAIM_GATHER: Duration = Duration::from_millis(2);
/// Clients a dispatch pass looks at, at most.
const CLIENTS_PER_PASS: usize = 64;
/// How long the dispatcher pauses after a database error.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Everything the dispatcher and its attempts share.
#[derive(Debug)]
pub struct Worker {
    store: Store,
    upstream: UpstreamClient,
    limits: RateLimits,
    /// Pauses attempts while upstream fails.
    breaker: Breaker,
    policy: RetryPolicy,
    /// Identifies this process's claims; unique per start, so a restarted daemon's old leases
    /// are recognisably someone else's.
    owner: Arc<str>,
    /// How long a claim stays ours without an outcome.
    lease: Duration,
    /// Attempts in flight at once.
    concurrency: usize,
    /// One permit per attempt in flight, `concurrency` in all.
    slots: Arc<Semaphore>,
    /// The attempts running, which shutdown waits for.
    attempts: TaskTracker,
    /// Cancelled at shutdown: no attempt starts after it.
    stop: CancellationToken,
    /// Free slots worth one claim when the worker is saturated.
    claim_batch: u32,
    /// Safety-net poll interval.
    poll_interval: Duration,
    /// Committed changes; its work signal says which clients have new waiting work (the
    /// writer announces them after each commit), so new work starts without polling.
    feed: Arc<JobFeed>,
    metrics: Arc<Metrics>,
    /// Tokens handed out, and how long they are kept afterwards.
    deliveries: Arc<Deliveries>,
    token_retention: Duration,
}

/// What one dispatch pass did, so the loop knows whether to go again at once.
#[derive(Debug, Default, PartialEq, Eq)]
struct Pass {
    /// The candidate query returned a full batch: more may be due.
    full_batch: bool,
    /// Nothing may start for this long: the global limit is exhausted or the breaker is open.
    blocked_for: Option<Duration>,
}

/// What starting a job's first attempt at its submission holds: a worker slot, a place among
/// the running attempts (so shutdown waits for it from before the commit), and the lease the
/// job is committed with. The limiter's permit is spent; dropping an unused reservation frees
/// the rest.
#[derive(Debug)]
pub struct StartReservation {
    slot: OwnedSemaphorePermit,
    running: TaskTrackerToken,
    lease: StartLease,
}

impl StartReservation {
    /// The lease the job is committed with.
    pub fn lease(&self) -> &StartLease {
        &self.lease
    }
}

impl Worker {
    /// A worker whose attempts run on `attempts`, which stops starting them when `stop` is
    /// cancelled.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        store: Store,
        upstream: UpstreamClient,
        feed: Arc<JobFeed>,
        metrics: Arc<Metrics>,
        deliveries: Arc<Deliveries>,
        stop: CancellationToken,
        attempts: TaskTracker,
    ) -> Self {
        Self {
            store,
            upstream,
            limits: RateLimits::new(&config.limits),
            breaker: Breaker::new(BreakerConfig {
                failure_threshold: config.breaker.failure_threshold,
                cool_down: Duration::from_millis(config.breaker.cool_down_ms),
            }),
            policy: RetryPolicy::from(&config.retry),
            owner: format!("worker-{}", uuid::Uuid::now_v7()).into(),
            lease: config.lease_duration(),
            concurrency: config.worker.concurrency as usize,
            slots: Arc::new(Semaphore::new(config.worker.concurrency as usize)),
            attempts,
            stop,
            claim_batch: (config.worker.concurrency / 8).max(1),
            poll_interval: Duration::from_millis(config.worker.poll_interval_ms),
            feed,
            metrics,
            deliveries,
            token_retention: Duration::from_secs(config.security.token_retention_secs),
        }
    }

    /// Takes back the attempts a previous run of the daemon left unfinished. On a database
    /// only this daemon uses (the start-up lock ensures it), every lease found is dead. On a
    /// shared one a lease may be another replica's, alive: leases are only rescued once they
    /// expire, by the sweeps of whichever replica comes first.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        if !self.store.is_exclusive() {
            return Ok(0);
        }
        let now = UnixMillis::now();
        let mut recovered = 0;
        loop {
            let jobs = self
                .store
                .rescue_leases(UnixMillis(i64::MAX), self.policy.max_attempts, now)
                .await?;
            if jobs.is_empty() {
                break;
            }
            recovered += jobs.len();
        }
        if recovered > 0 {
            tracing::warn!(
                jobs = recovered,
                "recovered attempts interrupted by the previous run; their outcome is unknown"
            );
        }
        Ok(recovered)
    }

    /// Dispatches until the worker's stop token is cancelled. Attempts run on the worker's
    /// task tracker, which the caller waits for during shutdown.
    pub async fn run(self: Arc<Self>) {
        let stop = self.stop.clone();
        let slots = Arc::clone(&self.slots);
        // Clients with waiting work and when each is next worth a look: a pass looks at a few
        // of them (as many as there are free slots), so its cost does not grow with the number
        // of distinct client ids, and a deep backlog for one client costs nothing when claiming
        // for another.
        let mut schedule = ClientSchedule::default();
        let mut loaded = false;
        tracing::info!(owner = %self.owner, concurrency = self.concurrency, "worker started");
        while !stop.is_cancelled() {
            if loaded && schedule.is_empty() && self.feed.work().is_empty() {
                // Nothing waits: submissions start their own attempts (`reserve_start`) until
                // one has to wait and announces its client.
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.feed.work().notified() => {}
                    _ = tokio::time::sleep(self.poll_interval) => {}
                }
                continue;
            }
            if slots.available_permits() == 0 {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    permit = Arc::clone(&slots).acquire_owned() => drop(permit),
                }
                // Under load, slots free up one by one: give others a moment to join, so one
                // claim serves several jobs instead of one each.
                let _ =
                    tokio::time::timeout(CLAIM_GATHER, slots.acquire_many(self.claim_batch)).await;
                continue;
            }
            if !loaded {
                match self.store.waiting_clients().await {
                    Ok(clients) => {
                        for client in clients {
                            schedule.announce(&client);
                        }
                        loaded = true;
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot read the waiting clients; pausing");
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(ERROR_PAUSE) => {}
                        }
                        continue;
                    }
                }
            }
            let pass = self.dispatch(&slots, &mut schedule).await;
            // Clients the pass took and did not park or forget take their turn again later,
            // whatever happened to the pass.
            schedule.settle();
            let pass = match pass {
                Ok(pass) => pass,
                Err(error) => {
                    tracing::error!(%error, "dispatch failed; pausing");
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(ERROR_PAUSE) => {}
                    }
                    continue;
                }
            };
            if pass.blocked_for.is_none() && pass.full_batch {
                continue;
            }
            let pause = match pass.blocked_for {
                Some(wait) => wait,
                None => self.idle_pause(&schedule),
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = self.feed.work().notified() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        tracing::info!("worker stopped claiming");
    }

    /// Reserves what starting a new job's first attempt at its submission takes, so that it is
    /// committed already running, in the submission's transaction: one commit and no dispatch
    /// pass less on its way. Only when no job seems to wait (the writer checks again, exactly,
    /// when it inserts the job, and queues it if one does: it overtakes no one), the breaker
    /// is closed, a worker slot is free, and no rate limit applies to the client (neither its
    /// own nor the global one; a pause after a 429 still holds it back); otherwise `None`, and
    /// the job queues as usual. Rate-limited traffic stays with the dispatcher, which takes
    /// one pass's permits at a time: permits taken by concurrent submissions before their
    /// commits would reach upstream bunched whenever a commit is slow, and upstream would see
    /// more than the limit in some second. On a database shared with other replicas the same
    /// holds: the writers take turns, and the check in the turn sees every replica's queue;
    /// with no rate limit there is no shared budget to draw on.
    pub fn reserve_start(&self, client_id: &str) -> Option<StartReservation> {
        if !self.store.nothing_waiting()
            || self.stop.is_cancelled()
            || self.breaker.state() != BreakerState::Closed
            || self.limits.global_rate().is_some()
            || self.limits.client_rate(client_id).is_some()
        {
            return None;
        }
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        if self.limits.try_acquire(client_id, Instant::now()) != Permit::Granted {
            return None;
        }
        Some(StartReservation {
            slot,
            running: self.attempts.token(),
            lease: StartLease {
                owner: Arc::clone(&self.owner),
                duration: self.lease,
            },
        })
    }

    /// Runs the first attempt of a job that its submission committed running, on the slot
    /// reserved for it.
    pub fn start(self: &Arc<Self>, claim: Claim, reservation: StartReservation) {
        self.metrics.limiter_wait.observe(0.0);
        self.metrics.started_at_submission.inc();
        let StartReservation { slot, running, .. } = reservation;
        // Boxed: an attempt's future is several KB, and a task's future is copied whole each
        // time it moves (through the spawn, into the task, at completion); a box moves as a
        // pointer (issue 14: memcpy was a fifth of the instructions per exchange).
        self.attempts.spawn(Box::pin(
            Arc::clone(self).attempt_holding(claim, slot, running),
        ));
    }

    async fn attempt_holding(
        self: Arc<Self>,
        claim: Claim,
        slot: OwnedSemaphorePermit,
        _running: TaskTrackerToken,
    ) {
        self.attempt(claim, Some(slot)).await;
    }

    /// Sweeps every [`SWEEP_INTERVAL`] until `stop` is cancelled. A separate task from the
    /// dispatcher, so a slow sweep never delays claiming.
    pub async fn run_sweeps(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.sweep().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
            }
        }
    }

    /// Expires overdue jobs, rescues attempts whose lease ran out, and erases tokens that were
    /// delivered (after the retention) or expired.
    async fn sweep(&self) {
        let evicted = self.limits.evict_idle(Instant::now());
        if evicted > 0 {
            tracing::debug!(clients = evicted, "dropped idle clients' limiter state");
        }
        // Each step on its own: a failing one does not hold up the others.
        let now = UnixMillis::now();
        let delivered = self.deliveries.take();
        if let Err(error) = self.store.mark_delivered(delivered.clone(), now).await {
            tracing::error!(%error, "cannot note delivered tokens; will retry");
            self.deliveries.restore(delivered);
        }
        match self.store.erase_tokens(now, self.token_retention).await {
            Ok(0) => {}
            Ok(erased) => tracing::debug!(tokens = erased, "erased delivered or expired tokens"),
            Err(error) => tracing::error!(%error, "cannot erase tokens"),
        }
        match self.store.expire_overdue(now).await {
            Ok(jobs) => {
                for job in jobs {
                    tracing::warn!(job_id = %job.id, client_id = %job.client_id,
                        "job expired before it could succeed");
                }
            }
            Err(error) => tracing::error!(%error, "cannot expire overdue jobs"),
        }
        match self
            .store
            .rescue_leases(now, self.policy.max_attempts, now)
            .await
        {
            Ok(jobs) => {
                for job in jobs {
                    tracing::warn!(job_id = %job.id, client_id = %job.client_id,
                        attempt = job.attempts, "attempt lease expired; outcome unknown");
                }
            }
            Err(error) => tracing::error!(%error, "cannot rescue expired leases"),
        }
    }

    /// One pass: take the next ready clients from the schedule, choose their due jobs whose
    /// limiters have permits, claim them, start their attempts.
    async fn dispatch(
        self: &Arc<Self>,
        slots: &Arc<Semaphore>,
        schedule: &mut ClientSchedule,
    ) -> Result<Pass, StoreError> {
        let probe = match self.breaker.admit(Instant::now()) {
            Admission::Open => false,
            Admission::Probe => true,
            Admission::Wait(wait) => {
                return Ok(Pass {
                    blocked_for: Some(wait),
                    ..Pass::default()
                });
            }
        };
        // Hold the slots this pass may fill: submissions that start at once take slots too.
        let wanted = if probe { 1 } else { slots.available_permits() };
        let mut held: Vec<OwnedSemaphorePermit> = (0..wanted)
            .map_while(|_| Arc::clone(slots).try_acquire_owned().ok())
            .collect();
        let free = held.len();
        if free == 0 {
            if probe {
                self.breaker.probe_not_sent();
            }
            return Ok(Pass::default());
        }
        for client in self.feed.work().take() {
            schedule.announce(&client);
        }
        let now_ms = UnixMillis::now();
        // At most CLIENTS_PER_PASS clients a pass bounds the rows one pass reads (each client's
        // due jobs are read up to `free`); more ready clients make the loop go again at once.
        let taken = schedule.take(now_ms, free.min(CLIENTS_PER_PASS));
        let mut candidates = match self.store.due_for_clients(&taken, now_ms, free).await {
            Ok(candidates) => candidates,
            Err(error) => {
                // The probe the breaker let through will not be sent: release it, or the
                // breaker would wait for it forever.
                if probe {
                    self.breaker.probe_not_sent();
                }
                return Err(error);
            }
        };
        // Clients that may have nothing due any more: those with no due job now, and (below)
        // those whose every due job this pass claims. Their next due time is asked for after
        // the claim, in one statement.
        let mut due_per_client: HashMap<&str, usize> = HashMap::new();
        for candidate in &candidates {
            *due_per_client
                .entry(candidate.client_id.as_str())
                .or_default() += 1;
        }
        let mut exhausted: Vec<String> = taken
            .iter()
            .filter(|client| !due_per_client.contains_key(client.as_str()))
            .cloned()
            .collect();
        let due_per_client: HashMap<String, usize> = due_per_client
            .into_iter()
            .map(|(client, due)| (client.to_string(), due))
            .collect();
        // Across clients, the job closest to its TTL goes first.
        candidates.sort_by_key(|c| (c.expires_at, c.row_id));
        let mut pass = Pass {
            // More may be due: another client is ready, or these had more than fit.
            full_batch: schedule.has_ready() || candidates.len() >= free,
            ..Pass::default()
        };
        candidates.truncate(free);
        let mut chosen = Vec::with_capacity(candidates.len());
        let mut busy = HashSet::new();
        for candidate in candidates {
            if busy.contains(&candidate.client_id) {
                continue;
            }
            match self
                .limits
                .try_acquire(&candidate.client_id, Instant::now())
            {
                Permit::Granted => chosen.push(candidate),
                Permit::ClientBusy(wait) => {
                    // No permit for this client until its limiter refills.
                    schedule.park(&candidate.client_id, UnixMillis::now().saturating_add(wait));
                    busy.insert(candidate.client_id);
                }
                Permit::GlobalBusy(wait) => {
                    pass.blocked_for = Some(wait);
                    break;
                }
            }
        }
        if self.store.shares_rate_budget() && !chosen.is_empty() {
            // Other replicas draw on the same limits: take this pass's permits from the budget
            // they share.
            chosen = match self.share_budget(chosen, schedule, &mut pass).await {
                Ok(chosen) => chosen,
                Err(error) => {
                    if probe {
                        self.breaker.probe_not_sent();
                    }
                    return Err(error);
                }
            };
        }
        let now = UnixMillis::now();
        let claims = self
            .store
            .claim(&chosen, &self.owner, now.saturating_add(self.lease), now)
            .await;
        let claims = match claims {
            Ok(claims) => claims,
            Err(error) => {
                if probe {
                    self.breaker.probe_not_sent();
                }
                return Err(error);
            }
        };
        if probe && claims.is_empty() {
            self.breaker.probe_not_sent();
        }
        for candidate in &chosen {
            self.metrics
                .limiter_wait
                .observe(candidate.due_at.until(now).as_secs_f64());
        }
        for claim in claims {
            // Claims never outnumber the slots held above; should that ever change, the
            // attempt still runs (its permit is optional only in that impossible case) rather
            // than leaving a claimed job to its lease. Slots left over are released below.
            let permit = held.pop();
            if permit.is_none() {
                tracing::error!(job_id = %claim.job.id, "claimed more jobs than slots held");
            }
            // Boxed, as in `start`.
            self.attempts
                .spawn(Box::pin(Arc::clone(self).attempt(claim, permit)));
        }
        drop(held);
        // A client whose due jobs were all chosen (fewer than it could have had) has nothing
        // due left: park it until its next job, or forget it.
        let mut chosen_per_client: HashMap<&str, usize> = HashMap::new();
        for candidate in &chosen {
            *chosen_per_client
                .entry(candidate.client_id.as_str())
                .or_default() += 1;
        }
        for (client, count) in chosen_per_client {
            if count < free && due_per_client.get(client) == Some(&count) {
                exhausted.push(client.to_string());
            }
        }
        // The attempts are running; a failure here only leaves these clients ready.
        match self.store.next_waiting_for_clients(&exhausted, now).await {
            Ok(next) => {
                let soonest = now.saturating_add(Duration::from_millis(1));
                for (client, next) in next {
                    match next {
                        Some(at) => schedule.park(&client, at.max(soonest)),
                        None => schedule.forget(&client),
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "cannot read when clients' next jobs fall due"),
        }
        Ok(pass)
    }

    /// Keeps, of `chosen` (in priority order), the candidates the shared rate budget grants
    /// permits for, in one reservation for every client of the pass. A client held back by its
    /// own limit is parked until its next permit; when the global limit holds some back, the
    /// pass is blocked until its next permit.
    async fn share_budget(
        &self,
        chosen: Vec<Candidate>,
        schedule: &mut ClientSchedule,
        pass: &mut Pass,
    ) -> Result<Vec<Candidate>, StoreError> {
        let mut requests: Vec<BudgetRequest> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for candidate in &chosen {
            let at = *index.entry(candidate.client_id.clone()).or_insert_with(|| {
                requests.push(BudgetRequest {
                    client_id: candidate.client_id.clone(),
                    rate: self.limits.client_rate(&candidate.client_id),
                    want: 0,
                });
                requests.len() - 1
            });
            requests[at].want += 1;
        }
        let reservation = self
            .store
            .reserve_budget(
                &requests,
                self.limits.global_rate(),
                &self.limits.adaptation(),
            )
            .await?;
        let now = UnixMillis::now();
        let mut granted: HashMap<&str, u32> = HashMap::new();
        for (request, grant) in requests.iter().zip(&reservation.grants) {
            granted.insert(request.client_id.as_str(), grant.granted);
            if grant.granted < request.want
                && let Some(at) = grant.client_retry_at
            {
                schedule.park(&request.client_id, at.max(now));
            }
        }
        if let Some(at) = reservation.global_retry_at {
            pass.blocked_for = Some(now.until(at).max(Duration::from_millis(1)));
        }
        let mut kept = Vec::with_capacity(chosen.len());
        for candidate in chosen {
            if let Some(left) = granted.get_mut(candidate.client_id.as_str())
                && *left > 0
            {
                *left -= 1;
                kept.push(candidate);
            }
        }
        Ok(kept)
    }

    /// How long to wait when nothing more is due for a client with permits: until the first
    /// parked client wakes (its next job falls due or its limiter refills), or the poll
    /// interval passes. New work wakes the dispatcher sooner.
    fn idle_pause(&self, schedule: &ClientSchedule) -> Duration {
        let mut pause = self.poll_interval;
        if let Some(wake) = schedule.next_wake() {
            pause = pause.min(UnixMillis::now().until(wake));
        }
        pause.max(Duration::from_millis(1))
    }

    /// Runs one attempt: present the code, decide, record. Holds a worker slot until the
    /// outcome is recorded.
    async fn attempt(self: Arc<Self>, claim: Claim, slot: Option<OwnedSemaphorePermit>) {
        let span = tracing::info_span!(
            "attempt",
            job_id = %claim.job.id,
            tenant = %claim.job.tenant,
            client_id = %claim.job.client_id,
            attempt = claim.lease.attempt,
        );
        async move {
            let sent = Instant::now();
            let outcome = self
                .upstream
                .exchange(&claim.job.client_id, &claim.code, &claim.code_verifier)
                .await;
            let status = match &outcome {
                AttemptOutcome::Answered(answer) => Some(answer.status),
                AttemptOutcome::NotSent | AttemptOutcome::AnswerLost => None,
            };
            self.metrics
                .upstream_request(outcome.family(), status, sent.elapsed());
            self.observe(&claim.job.client_id, &outcome);
            if let AttemptOutcome::Answered(answer) = &outcome
                && answer.status == 429
            {
                self.throttle_shared(&claim.job.client_id, answer.retry_after)
                    .await;
            }
            let now = UnixMillis::now();
            let history = JobHistory {
                attempt: claim.lease.attempt,
                outcome_unknown: claim.job.outcome_unknown,
                expires_at: claim.job.expires_at,
            };
            let decision = retry::decide(&self.policy, &history, &outcome, now, rand::random());
            let record = attempt_record(decision, &outcome, claim.job.outcome_unknown);
            // The slot is free once the outcome commits, before its caller hears of it: a
            // caller answered at once and submitting again finds a free slot.
            let slot = Arc::new(parking_lot::Mutex::new(slot));
            let free_slot: OnCommit = {
                let slot = Arc::clone(&slot);
                OnCommit::new(move || drop(slot.lock().take()))
            };
            // The outcome may hold the only copy of a token: retry the write through brief
            // database trouble rather than leave the job to be rescued as "unknown".
            let written = (|| {
                self.store
                    .record_attempt(&claim.lease, &record, now, Some(free_slot.clone()))
            })
            .retry(
                ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(50))
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(6),
            )
            .notify(|error, delay| {
                tracing::warn!(%error, ?delay, "recording the attempt failed; retrying");
            })
            .await;
            // Committed, or left to the sweeps: either way the slot is free now.
            drop(slot.lock().take());
            match written {
                Ok(Some(job)) => match job.state {
                    JobState::Succeeded => tracing::info!("exchange succeeded"),
                    JobState::RetryWait => tracing::warn!(
                        detail = job.failure_detail.as_deref().unwrap_or_default(),
                        retry_in_ms = job.next_attempt_at.map(|at| at.0 - now.0),
                        "attempt failed; retry scheduled"
                    ),
                    _ => tracing::warn!(
                        reason = job.failure_reason.map(|r| r.as_str()),
                        detail = job.failure_detail.as_deref().unwrap_or_default(),
                        "exchange failed"
                    ),
                },
                Ok(None) => tracing::warn!(
                    "lease lost before the outcome was recorded; the newer attempt's outcome stands"
                ),
                Err(error) => tracing::error!(
                    %error,
                    "could not record the attempt; it will be rescued as outcome unknown"
                ),
            }
        }
        .instrument(span)
        .await
    }
}

impl Worker {
    /// This process's lease owner id, as claims record it.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Applies reloaded rate limits.
    pub fn reload_limits(&self, config: &crate::config::LimitsConfig) {
        self.limits.reconfigure(config);
    }

    /// The limiter's current effective rates, for the metrics.
    pub fn rate_report(&self) -> crate::exchange::limits::RateReport {
        self.limits.rate_report()
    }

    /// The breaker's state, for the metrics.
    pub fn breaker_state(&self) -> crate::exchange::breaker::BreakerState {
        self.breaker.state()
    }

    /// A 429 lowers and pauses the client's budget shared with other replicas, for all of
    /// them (this process's own limiter was told in [`Worker::observe`]).
    async fn throttle_shared(&self, client_id: &str, retry_after: Option<Duration>) {
        let Some(rate) = self.limits.client_rate(client_id) else {
            return;
        };
        let retry_after_ms = retry_after.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        match self
            .store
            .throttle_budget(client_id, rate, &self.limits.adaptation(), retry_after_ms)
            .await
        {
            Ok(Some(Throttled::Lowered { from, to })) => tracing::warn!(
                client_id,
                from_rps = from,
                to_rps = to,
                "upstream rate-limited this client; its rate is lowered for every replica"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, client_id, "cannot lower the shared rate after a 429")
            }
        }
    }

    /// Feeds an attempt's outcome to the breaker and, for a 429, to the client's rate limit.
    fn observe(&self, client_id: &str, outcome: &AttemptOutcome) {
        let now = Instant::now();
        self.breaker.record(Signal::of(outcome), now);
        if let AttemptOutcome::Answered(answer) = outcome
            && answer.status == 429
        {
            self.limits
                .on_rate_limited(client_id, answer.retry_after, now);
        }
    }
}

/// Turns the decision into what the store records.
fn attempt_record(
    decision: Decision,
    outcome: &AttemptOutcome,
    earlier_unknown: bool,
) -> AttemptRecord {
    let http_status = match outcome {
        AttemptOutcome::Answered(answer) => Some(answer.status),
        AttemptOutcome::NotSent | AttemptOutcome::AnswerLost => None,
    };
    let answer_lost = matches!(outcome, AttemptOutcome::AnswerLost);
    match decision {
        Decision::Succeed { grant } => AttemptRecord::Succeeded {
            grant,
            http_status: http_status.unwrap_or(200),
            outcome_unknown: earlier_unknown,
        },
        Decision::RetryAt {
            at,
            detail,
            outcome_unknown,
        } => AttemptRecord::RetryAt {
            at,
            http_status,
            detail,
            answer_lost,
            outcome_unknown,
        },
        Decision::Fail {
            reason,
            detail,
            outcome_unknown,
        } => AttemptRecord::Failed {
            reason,
            http_status,
            detail,
            answer_lost,
            outcome_unknown,
        },
    }
}
