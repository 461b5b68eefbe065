//! The auditors' view of the store: paged job and event listings (keyset pagination, stable
//! under concurrent inserts), chain verification, and retention.

use super::{
    JobRow, Store, StoreError, audit,
    backend::{Columns, on_backend},
};
use crate::{
    audit::{
        AuditRecord, ChainVerifier, VerifyReport,
        checkpoint::{ChainSpan, Checkpoint, CheckpointCheck, Trust},
    },
    domain::job::{FailureReason, Job, JobState, UnixMillis},
};

/// Rows read per page when the store walks the whole log.
const SCAN_PAGE: i64 = 5_000;

/// Which jobs to list. Empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct JobQuery {
    pub client_id: Option<String>,
    pub tenant: Option<String>,
    pub state: Option<JobState>,
    pub code_fingerprint: Option<String>,
    pub failure_reason: Option<FailureReason>,
    pub created_after: Option<UnixMillis>,
    pub created_before: Option<UnixMillis>,
    /// Newest first (the console's listings) instead of creation order.
    pub newest_first: bool,
    /// Continue after this row (from the previous page's `next`): past it in the listing's
    /// order, so below it when `newest_first`.
    pub after: Option<i64>,
    pub limit: u32,
}

/// How many jobs of one state were created in one time bucket (the console's chart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutcomeCount {
    /// The bucket's start, a multiple of its width.
    pub bucket: UnixMillis,
    pub state: JobState,
    pub jobs: u64,
}

/// Which events to list. Empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub job_id: Option<String>,
    pub client_id: Option<String>,
    pub after: Option<UnixMillis>,
    pub before: Option<UnixMillis>,
    /// Only events with a greater seq (also how pages continue).
    pub after_seq: Option<i64>,
    pub limit: u32,
}

/// One page and where the next one starts (`None` when this page was the last).
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<i64>,
}

/// What a retention run removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    /// Rows deleted (earlier checkpoints included).
    pub events: u64,
    /// The checkpoint's seq (the last removed event's).
    pub checkpoint_seq: i64,
}

impl<T> Page<T> {
    fn empty() -> Self {
        Page {
            items: Vec::new(),
            next: None,
        }
    }

    /// A page of at most `limit` items; a full page continues after its last item's key.
    pub(super) fn of(items: Vec<T>, limit: i64, key: impl Fn(&T) -> i64) -> Self {
        let next = (items.len() as i64 == limit)
            .then(|| items.last().map(key))
            .flatten();
        Page { items, next }
    }
}

impl Store {
    /// The key range (row ids of `jobs`, through their creation-time index; else event seqs,
    /// by bisecting the chain, whose times never decrease) of a time range; every key when the
    /// range is unbounded, `None` when nothing falls in it.
    async fn key_bounds(
        &self,
        jobs: bool,
        from: i64,
        to: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        if from == i64::MIN && to == i64::MAX {
            return Ok(Some((i64::MIN, i64::MAX)));
        }
        let bounds = if jobs {
            on_backend!(&self.pool, "job_id_bounds", |query, pool| {
                let row = query.bind(from).bind(to).fetch_one(pool).await?;
                (row.opt_int("lo")?, row.opt_int("hi")?)
            })
        } else {
            on_backend!(&self.pool, "event_seq_bounds", |query, pool| {
                let row = query.bind(from).bind(to).fetch_one(pool).await?;
                (row.opt_int("lo")?, row.opt_int("hi")?)
            })
        };
        Ok(match bounds {
            (Some(lo), Some(hi)) => Some((lo, hi)),
            _ => None,
        })
    }

    /// One page of jobs matching `query`, in creation order. Never carries tokens.
    pub async fn list_jobs(&self, query: &JobQuery) -> Result<Page<(i64, Job)>, StoreError> {
        let (from, to) = (
            query.created_after.map_or(i64::MIN, |t| t.0),
            query.created_before.map_or(i64::MAX, |t| t.0),
        );
        let Some((lo, hi)) = self.key_bounds(true, from, to).await? else {
            return Ok(Page::empty());
        };
        // Every form takes the ids in (lower, upper]; a page continues past its last id in
        // the listing's order.
        let (lower, upper) = if query.newest_first {
            let below = query
                .after
                .map_or(i64::MAX, |after| after.saturating_sub(1));
            (lo.saturating_sub(1), hi.min(below))
        } else {
            (
                query.after.unwrap_or(i64::MIN).max(lo.saturating_sub(1)),
                hi,
            )
        };
        let limit = i64::from(query.limit.max(1));
        // The same parameters for each form; each form walks its own index.
        macro_rules! page {
            ($name:literal) => {
                on_backend!(&self.pool, $name, |statement, pool| {
                    let rows = statement
                        .bind(lower)
                        .bind(upper)
                        .bind(from)
                        .bind(to)
                        .bind(query.client_id.as_deref())
                        .bind(query.tenant.as_deref())
                        .bind(query.state.map(JobState::as_str))
                        .bind(query.code_fingerprint.as_deref())
                        .bind(limit)
                        .bind(query.failure_reason.map(FailureReason::as_str))
                        .fetch_all(pool)
                        .await?;
                    rows.iter()
                        .map(JobRow::decode)
                        .collect::<sqlx::Result<Vec<_>>>()?
                })
            };
        }
        let rows = match (
            query.code_fingerprint.is_some(),
            query.client_id.is_some(),
            query.newest_first,
        ) {
            (true, _, false) => page!("list_jobs_by_fingerprint"),
            (true, _, true) => page!("list_jobs_by_fingerprint_newest"),
            (false, true, false) => page!("list_jobs_by_client"),
            (false, true, true) => page!("list_jobs_by_client_newest"),
            (false, false, false) => page!("list_jobs"),
            (false, false, true) => page!("list_jobs_newest"),
        };
        let items = rows
            .into_iter()
            .map(|row| Ok((row.id, row.into_job(None)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Page::of(items, limit, |(id, _)| *id))
    }

    /// One page of audit events matching `query`, in seq order.
    pub async fn list_events(&self, query: &EventQuery) -> Result<Page<AuditRecord>, StoreError> {
        let (from, to) = (
            query.after.map_or(i64::MIN, |t| t.0),
            query.before.map_or(i64::MAX, |t| t.0),
        );
        let Some((lo, hi)) = self.key_bounds(false, from, to).await? else {
            return Ok(Page::empty());
        };
        let after = query
            .after_seq
            .unwrap_or(i64::MIN)
            .max(lo.saturating_sub(1));
        let limit = i64::from(query.limit.max(1));
        macro_rules! page {
            ($name:literal) => {
                on_backend!(&self.pool, $name, |statement, pool| {
                    let rows = statement
                        .bind(after)
                        .bind(hi)
                        .bind(from)
                        .bind(to)
                        .bind(query.job_id.as_deref())
                        .bind(query.client_id.as_deref())
                        .bind(limit)
                        .fetch_all(pool)
                        .await?;
                    rows.iter()
                        .map(audit::record_from_row)
                        .collect::<sqlx::Result<Vec<_>>>()?
                })
            };
        }
        let items = if query.job_id.is_some() {
            page!("list_events_by_job")
        } else if query.client_id.is_some() {
            page!("list_events_by_client")
        } else {
            page!("list_events")
        };
        Ok(Page::of(items, limit, |event| event.seq))
    }

    /// How many jobs matching `query` (its filters; not its page) were created per bucket of
    /// `bucket_ms` and state, in bucket order. One aggregate statement.
    pub async fn outcome_counts(
        &self,
        query: &JobQuery,
        bucket_ms: i64,
    ) -> Result<Vec<OutcomeCount>, StoreError> {
        let (from, to) = (
            query.created_after.map_or(i64::MIN, |t| t.0),
            query.created_before.map_or(i64::MAX, |t| t.0),
        );
        let Some((lo, hi)) = self.key_bounds(true, from, to).await? else {
            return Ok(Vec::new());
        };
        let rows = on_backend!(&self.pool, "job_outcomes", |statement, pool| {
            let rows = statement
                .bind(lo.saturating_sub(1))
                .bind(hi)
                .bind(from)
                .bind(to)
                .bind(query.client_id.as_deref())
                .bind(query.tenant.as_deref())
                .bind(query.state.map(JobState::as_str))
                .bind(query.code_fingerprint.as_deref())
                .bind(query.failure_reason.map(FailureReason::as_str))
                .bind(bucket_ms.max(1))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| Ok((row.int("bucket")?, row.text("state")?, row.int("jobs")?)))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        rows.into_iter()
            .map(|(bucket, state, jobs)| {
                Ok(OutcomeCount {
                    bucket: UnixMillis(bucket),
                    state: state
                        .parse()
                        .map_err(|e: crate::domain::job::UnknownValue| {
                            StoreError::Corrupt(e.to_string())
                        })?,
                    jobs: u64::try_from(jobs).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Recomputes the chain and compares the stored checkpoints with it (their signatures
    /// unchecked: see [`Store::verify_audit_log_with`]).
    pub async fn verify_audit_log(&self) -> Result<VerifyReport, StoreError> {
        self.verify_audit_log_with(&Trust::default()).await
    }

    /// Recomputes the chain; checks every stored checkpoint (its signature under one of
    /// `trust.keys` when keys are given, its link to the one before, its seq and hash against
    /// the chain); and checks that each of `trust.checkpoints`, kept outside the database, is
    /// signed, still stored and still matches the chain. The report names the lowest seq that
    /// does not match.
    pub async fn verify_audit_log_with(&self, trust: &Trust) -> Result<VerifyReport, StoreError> {
        let chain = self.verify_chain().await?;
        // The checkpoints to check are those already signed; the span is read after, so each
        // of them covers events the span includes, however the daemon goes on meanwhile.
        let through = self.last_checkpoint_id().await?;
        let span = on_backend!(&self.pool, "event_seq_span", |query, pool| {
            let row = query.fetch_one(pool).await?;
            (row.opt_int("lo")?, row.opt_int("hi")?)
        });
        let span = match span {
            (Some(first), Some(last)) => ChainSpan { first, last },
            _ => ChainSpan { first: 1, last: 0 },
        };
        let mut check = CheckpointCheck::new(span, &trust.keys);
        let mut after = None;
        loop {
            let page = self
                .list_checkpoints_through(None, after, through, SCAN_PAGE as u32)
                .await?;
            for (_, checkpoint) in &page.items {
                let event = self.event_at(checkpoint.seq).await?;
                check.stored(checkpoint, event.as_ref());
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let mut given: Vec<&Checkpoint> = trust.checkpoints.iter().collect();
        given.sort_by_key(|checkpoint| checkpoint.seq);
        for checkpoint in given {
            let event = self.event_at(checkpoint.seq).await?;
            check.given(checkpoint, event.as_ref());
        }
        Ok(check.report(chain))
    }

    /// Recomputes the hash chain over every stored event.
    async fn verify_chain(&self) -> Result<VerifyReport, StoreError> {
        let mut verifier = ChainVerifier::new();
        self.continue_verification(&mut verifier).await
    }

    /// Verifies the events after the last one `verifier` checked (all of them for a new
    /// verifier) and reports on the whole chain so far. A caller that keeps its verifier (the
    /// console) checks each event once, however often it asks. The table's sequence counter is
    /// read before the events, so events committed meanwhile never look removed.
    pub async fn continue_verification(
        &self,
        verifier: &mut ChainVerifier,
    ) -> Result<VerifyReport, StoreError> {
        let assigned = on_backend!(&self.pool, "audit_sequence", |query, pool| {
            let row = query.fetch_optional(pool).await?;
            row.as_ref().map(|row| row.int("seq")).transpose()?
        });
        let mut after = verifier.last_seq();
        'pages: loop {
            let page = self
                .list_events(&EventQuery {
                    after_seq: after,
                    limit: SCAN_PAGE as u32,
                    ..EventQuery::default()
                })
                .await?;
            for record in &page.items {
                if !verifier.check(record) {
                    break 'pages;
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let last = verifier.last_seq().unwrap_or(0);
        // The tail check is on a copy: later events may still come and continue the chain.
        let mut verifier = verifier.clone();
        if let Some(assigned) = assigned
            && assigned > last
        {
            verifier.fail_at(
                last.saturating_add(1),
                format!(
                    "events up to seq {assigned} were written but the log ends at seq {last}: \
                     the latest events were removed"
                ),
            );
        }
        Ok(verifier.report())
    }
}
