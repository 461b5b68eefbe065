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
    if let Some(previous) = previous.as_ref()
        && previous.seq == head.seq()
        && previous.hash == head.hash()
    {
        return Ok(Some(Signed {
            checkpoint: previous.clone(),
            created: false,
        }));
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
        let limit = i64::from(limit.max(1));
        let items = on_backend!(&self.pool, "list_signed_checkpoints", |query, pool| {
            let rows = query
                .bind(after.unwrap_or(0))
                .bind(since.map_or(i64::MIN, |t| t.0))
                .bind(limit)
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
