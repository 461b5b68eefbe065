//! Signed checkpoints in the store: made by the writer inside its transaction (so the head it
//! signs is the head that commits, and on PostgreSQL the replicas chain their checkpoints in
//! turn), listed for external witnesses, and checked against the chain by `verify`.

use std::sync::Arc;

use super::{
    Page, Store, StoreError, audit,
    audit::ChainHead,
    backend::{Columns, Conn, on_backend},
    writer::Command,
};
use crate::{
    audit::{
        AuditRecord,
        checkpoint::{Checkpoint, SigningKey},
    },
    domain::job::UnixMillis,
};

/// The latest checkpoint after a signing request, and whether the request made it (the chain
/// had not moved since the last one otherwise).
#[derive(Debug, Clone)]
pub struct Signed {
    pub checkpoint: Checkpoint,
    pub created: bool,
}

pub(super) fn from_row(row: &impl Columns) -> sqlx::Result<Checkpoint> {
    Ok(Checkpoint {
        seq: row.int("seq")?,
        hash: row.text("hash")?,
        at: row.int("at")?,
        prev_signature: row.opt_text("prev_signature")?,
        key_id: row.text("key_id")?,
        signature: row.text("signature")?,
    })
}

async fn last(conn: &mut Conn) -> sqlx::Result<Option<Checkpoint>> {
    Ok(on_backend!(
        conn,
        "last_signed_checkpoint",
        |query, conn| {
            let row = query.fetch_optional(&mut *conn).await?;
            row.as_ref().map(from_row).transpose()?
        }
    ))
}

/// Inside the writer's transaction: signs `head` unless the last checkpoint already covers it.
/// `None` while the chain is empty.
pub(super) async fn sign(
    conn: &mut Conn,
    head: &ChainHead,
    key: &SigningKey,
    now: UnixMillis,
) -> Result<Option<Signed>, StoreError> {
    if head.seq() == 0 {
        return Ok(None);
    }
    let previous = last(conn).await?;
    if let Some(previous) = previous.as_ref() {
        if previous.seq == head.seq() && previous.hash == head.hash() {
            return Ok(Some(Signed {
                checkpoint: previous.clone(),
                created: false,
            }));
        }
        still_extends(conn, head, previous, now).await?;
    }
    // Signing times never go back, whatever the clocks of the replicas did.
    let at = previous.as_ref().map_or(now.0, |p| now.0.max(p.at));
    let checkpoint = key.sign(head.seq(), head.hash(), at, previous.as_ref());
    on_backend!(&mut *conn, "insert_signed_checkpoint", |query, conn| {
        query
            .bind(checkpoint.seq)
            .bind(&checkpoint.hash)
            .bind(checkpoint.at)
            .bind(checkpoint.prev_signature.as_deref())
            .bind(&checkpoint.key_id)
            .bind(&checkpoint.signature)
            .execute(&mut *conn)
            .await?;
    });
    Ok(Some(Signed {
        checkpoint,
        created: true,
    }))
}

/// How far ahead of this clock a previous checkpoint's time may be (replicas' clocks differ a
/// little; a checkpoint a day ahead was not signed by a sane clock).
const CLOCK_SKEW_MS: i64 = 86_400_000;

/// Refuses to sign a chain that no longer extends what was signed last: one that was cut below
/// it, or rewritten at or before it (the daemon would otherwise lend its signature to the edit),
/// or a previous checkpoint from the far future (every later one would inherit its time).
async fn still_extends(
    conn: &mut Conn,
    head: &ChainHead,
    previous: &Checkpoint,
    now: UnixMillis,
) -> Result<(), StoreError> {
    let refuse = |why: String| {
        Err(StoreError::Corrupt(format!(
            "refusing to sign the audit chain: {why}; run `token-broker audit verify \
             --public-key …`"
        )))
    };
    if head.seq() < previous.seq {
        return refuse(format!(
            "it ends at seq {}, below the last checkpoint's seq {}",
            head.seq(),
            previous.seq
        ));
    }
    if previous.at > now.0.saturating_add(CLOCK_SKEW_MS) {
        return refuse(format!(
            "the last checkpoint was signed at {}, in the future",
            crate::audit::checkpoint::signed_at(previous)
        ));
    }
    match audit::event_at(conn, previous.seq).await? {
        Some(event) if event.hash != previous.hash => refuse(format!(
            "event {} no longer carries the hash the last checkpoint signed",
            previous.seq
        )),
        // Gone: pruned by retention (below the first stored event), or removed.
        None if !pruned_below_first(conn, previous.seq).await? => refuse(format!(
            "event {}, which the last checkpoint covers, is missing",
            previous.seq
        )),
        _ => Ok(()),
    }
}

/// Whether `seq` lies below the first stored event (retention removed it).
async fn pruned_below_first(conn: &mut Conn, seq: i64) -> Result<bool, StoreError> {
    let first = on_backend!(&mut *conn, "event_seq_span", |query, conn| {
        query.fetch_one(&mut *conn).await?.opt_int("lo")?
    });
    Ok(first.is_some_and(|first| seq < first))
}

impl Store {
    /// Signs the chain head with `key` (unless the last checkpoint covers it) and, once
    /// committed, writes a new checkpoint to the log. `None` while the chain is empty.
    pub async fn sign_checkpoint(
        &self,
        key: &Arc<SigningKey>,
    ) -> Result<Option<Signed>, StoreError> {
        let signed = self
            .write(|reply| Command::Sign {
                key: Arc::clone(key),
                now: UnixMillis::now(),
                reply,
            })
            .await?;
        if let Some(signed) = &signed
            && signed.created
        {
            signed.checkpoint.emit();
        }
        Ok(signed)
    }

    /// The most recent checkpoint.
    pub async fn last_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        Ok(on_backend!(
            &self.pool,
            "last_signed_checkpoint",
            |query, pool| {
                let row = query.fetch_optional(pool).await?;
                row.as_ref().map(from_row).transpose()?
            }
        ))
    }

    /// One page of checkpoints signed at or after `since`, in signing order; a page continues
    /// after `after` (the previous page's `next`).
    pub async fn list_checkpoints(
        &self,
        since: Option<UnixMillis>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<(i64, Checkpoint)>, StoreError> {
        self.list_checkpoints_through(since, after, i64::MAX, limit)
            .await
    }

    /// The last checkpoint's row id (0 when there is none): what a verification checks up to,
    /// so that checkpoints signed while it runs, covering events it did not see, are left out.
    pub(super) async fn last_checkpoint_id(&self) -> Result<i64, StoreError> {
        let id = on_backend!(&self.pool, "last_checkpoint_id", |query, pool| {
            let row = query.fetch_one(pool).await?;
            row.opt_int("id")?
        });
        Ok(id.unwrap_or(0))
    }

    /// [`Store::list_checkpoints`] up to row `through`.
    pub(super) async fn list_checkpoints_through(
        &self,
        since: Option<UnixMillis>,
        after: Option<i64>,
        through: i64,
        limit: u32,
    ) -> Result<Page<(i64, Checkpoint)>, StoreError> {
        let limit = i64::from(limit.max(1));
        let items = on_backend!(&self.pool, "list_signed_checkpoints", |query, pool| {
            let rows = query
                .bind(after.unwrap_or(0))
                .bind(since.map_or(i64::MIN, |t| t.0))
                .bind(limit)
                .bind(through)
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| Ok((row.int("id")?, from_row(row)?)))
                .collect::<sqlx::Result<Vec<_>>>()?
        });
        Ok(Page::of(items, limit, |(id, _)| *id))
    }

    /// The event at `seq`, if the table still holds it.
    pub(super) async fn event_at(&self, seq: i64) -> Result<Option<AuditRecord>, StoreError> {
        Ok(on_backend!(&self.pool, "get_event", |query, pool| {
            let row = query.bind(seq).fetch_optional(pool).await?;
            row.as_ref().map(audit::record_from_row).transpose()?
        }))
    }
}
