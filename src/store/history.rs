//! The auditors' view of the store: paged job and event listings (keyset pagination, stable
//! under concurrent inserts), chain verification, and retention.

use sqlx::Row;

use super::{Store, StoreError, audit, job_from_row};
use crate::{
    audit::{AuditRecord, ChainVerifier, VerifyReport},
    domain::job::{Job, JobState, UnixMillis},
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
    pub created_after: Option<UnixMillis>,
    pub created_before: Option<UnixMillis>,
    /// Continue after this row (from the previous page's `next`).
    pub after: Option<i64>,
    pub limit: u32,
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
    fn of(items: Vec<T>, limit: i64, key: impl Fn(&T) -> i64) -> Self {
        let next = (items.len() as i64 == limit)
            .then(|| items.last().map(key))
            .flatten();
        Page { items, next }
    }
}

impl Store {
    /// The key range (row ids or seqs) of a time range, through `sql` (a `lo`/`hi` query over a
    /// time index); every key when the range is unbounded, `None` when nothing falls in it.
    async fn key_bounds(
        &self,
        sql: &'static str,
        from: i64,
        to: i64,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        if from == i64::MIN && to == i64::MAX {
            return Ok(Some((i64::MIN, i64::MAX)));
        }
        let bounds = sqlx::query(sql)
            .bind(from)
            .bind(to)
            .fetch_one(&self.reader)
            .await?;
        Ok(
            match (
                bounds.try_get::<Option<i64>, _>("lo")?,
                bounds.try_get::<Option<i64>, _>("hi")?,
            ) {
                (Some(lo), Some(hi)) => Some((lo, hi)),
                _ => None,
            },
        )
    }

    /// One page of jobs, in creation order.
    pub async fn list_jobs(&self, query: &JobQuery) -> Result<Page<(i64, Job)>, StoreError> {
        let (from, to) = (
            query.created_after.map_or(i64::MIN, |t| t.0),
            query.created_before.map_or(i64::MAX, |t| t.0),
        );
        let Some((lo, hi)) = self
            .key_bounds(include_str!("sql/job_id_bounds.sql"), from, to)
            .await?
        else {
            return Ok(Page::empty());
        };
        let after = query.after.unwrap_or(i64::MIN).max(lo.saturating_sub(1));
        let sql = if query.code_fingerprint.is_some() {
            include_str!("sql/list_jobs_by_fingerprint.sql")
        } else if query.client_id.is_some() {
            include_str!("sql/list_jobs_by_client.sql")
        } else {
            include_str!("sql/list_jobs.sql")
        };
        let limit = i64::from(query.limit.max(1));
        let rows = sqlx::query(sql)
            .bind(after)
            .bind(hi)
            .bind(from)
            .bind(to)
            .bind(query.client_id.as_deref())
            .bind(query.tenant.as_deref())
            .bind(query.state.map(JobState::as_str))
            .bind(query.code_fingerprint.as_deref())
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(|row| Ok((row.try_get::<i64, _>("id")?, job_from_row(row, None)?)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Page::of(items, limit, |(id, _)| *id))
    }

    /// One page of audit events, in seq order.
    pub async fn list_events(&self, query: &EventQuery) -> Result<Page<AuditRecord>, StoreError> {
        let (from, to) = (
            query.after.map_or(i64::MIN, |t| t.0),
            query.before.map_or(i64::MAX, |t| t.0),
        );
        let Some((lo, hi)) = self
            .key_bounds(include_str!("sql/event_seq_bounds.sql"), from, to)
            .await?
        else {
            return Ok(Page::empty());
        };
        let after = query
            .after_seq
            .unwrap_or(i64::MIN)
            .max(lo.saturating_sub(1));
        let sql = if query.job_id.is_some() {
            include_str!("sql/list_events_by_job.sql")
        } else if query.client_id.is_some() {
            include_str!("sql/list_events_by_client.sql")
        } else {
            include_str!("sql/list_events.sql")
        };
        let limit = i64::from(query.limit.max(1));
        let rows = sqlx::query(sql)
            .bind(after)
            .bind(hi)
            .bind(from)
            .bind(to)
            .bind(query.job_id.as_deref())
            .bind(query.client_id.as_deref())
            .bind(limit)
            .fetch_all(&self.reader)
            .await?;
        let items = rows
            .iter()
            .map(audit::record_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Page::of(items, limit, |event| event.seq))
    }

    /// Recomputes the whole chain, page by page, and checks that no event after the last one
    /// was removed.
    pub async fn verify_audit_log(&self) -> Result<VerifyReport, StoreError> {
        let mut verifier = ChainVerifier::new();
        let mut after = None;
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
        let assigned: Option<i64> = sqlx::query_scalar(include_str!("sql/audit_sequence.sql"))
            .fetch_optional(&self.reader)
            .await?;
        let last = verifier.last_seq().unwrap_or(0);
        if let Some(assigned) = assigned
            && assigned > last
        {
            verifier.fail_at(
                last + 1,
                format!(
                    "events up to seq {assigned} were written but the log ends at seq {last}: \
                     the latest events were removed"
                ),
            );
        }
        Ok(verifier.report())
    }
}
