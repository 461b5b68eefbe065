//! The rate budget replicas share on PostgreSQL: one `rate_budget` row per limiter key
//! (`global`, `client:<id>`), holding the GCRA state and the 429 adaptation of
//! [`crate::domain::budget`].
//!
//! A dispatch pass reserves the permits it wants for all its clients in one transaction: the
//! rows are locked in key order (so two replicas never deadlock), each client's permits are
//! weighed against the global budget, the states are advanced by exactly what is granted, and
//! written back. One round trip of a few statements per pass, not one per request. Times come
//! from the database's clock, so replicas' clocks need not agree.

use std::collections::HashMap;

use sqlx::{Acquire, Row};

use super::{Store, StoreError, backend::Db};
use crate::domain::{
    budget::{Adaptation, BudgetState, Rate, Throttled},
    job::UnixMillis,
};

/// The key of the global limit's row.
const GLOBAL: &str = "global";

fn client_key(client_id: &str) -> String {
    format!("client:{client_id}")
}

/// Permits one client wants for this pass, and its configured limit (`None`: unlimited).
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetRequest {
    pub client_id: String,
    pub rate: Option<Rate>,
    pub want: u32,
}

/// What one client was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetGrant {
    pub client_id: String,
    pub granted: u32,
    /// When fewer were granted than wanted because of this client's own limit (or its pause):
    /// when its next permit comes.
    pub client_retry_at: Option<UnixMillis>,
}

/// What a reservation granted, per request and in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub grants: Vec<BudgetGrant>,
    /// When the global limit held some back: when its next permit comes.
    pub global_retry_at: Option<UnixMillis>,
}

/// Weighs the clients' budgets against the global one, in request order (the caller's
/// priority), and advances every state by exactly what is granted. Pure, so tested alone.
fn allocate(
    requests: &[BudgetRequest],
    clients: &mut HashMap<String, BudgetState>,
    global: Option<(&mut BudgetState, Rate)>,
    adaptation: &Adaptation,
    now: UnixMillis,
) -> Reservation {
    // What each client's own budget allows, tried on a copy.
    let allowed: Vec<(u32, Option<UnixMillis>)> = requests
        .iter()
        .map(
            |request| match (request.rate, clients.get(&request.client_id)) {
                (Some(rate), Some(state)) => {
                    let grant = state.clone().reserve(rate, adaptation, request.want, now);
                    (grant.granted, grant.retry_at)
                }
                _ => (request.want, None),
            },
        )
        .collect();
    let total: u32 = allowed
        .iter()
        .fold(0u32, |sum, (granted, _)| sum.saturating_add(*granted));
    let (mut left, global_retry_at) = match global {
        Some((state, rate)) => {
            let grant = state.reserve(rate, adaptation, total, now);
            (grant.granted, grant.retry_at)
        }
        None => (total, None),
    };
    let grants = requests
        .iter()
        .zip(allowed)
        .map(|(request, (allowed, client_retry_at))| {
            let granted = allowed.min(left);
            left -= granted;
            if let (Some(rate), Some(state)) = (request.rate, clients.get_mut(&request.client_id)) {
                // Fewer than (or as many as) the copy granted: the same state grants exactly
                // these.
                state.reserve(rate, adaptation, granted, now);
            }
            BudgetGrant {
                client_id: request.client_id.clone(),
                granted,
                client_retry_at,
            }
        })
        .collect();
    Reservation {
        grants,
        global_retry_at,
    }
}

/// The reservation's times, computed on the database's clock (`db_now`), moved to this
/// process's clock: the caller waits the same duration whatever the two clocks say.
fn on_local_clock(mut reservation: Reservation, db_now: UnixMillis) -> Reservation {
    let local_now = UnixMillis::now();
    let shift =
        |at: UnixMillis| UnixMillis(local_now.0.saturating_add(at.0.saturating_sub(db_now.0)));
    for grant in &mut reservation.grants {
        grant.client_retry_at = grant.client_retry_at.map(shift);
    }
    reservation.global_retry_at = reservation.global_retry_at.map(shift);
    reservation
}

/// A locked row, read.
fn state_from_row(row: &sqlx::postgres::PgRow) -> sqlx::Result<(String, BudgetState)> {
    Ok((
        row.try_get("key")?,
        BudgetState {
            tat_us: row.try_get("tat_us")?,
            effective_rps: row.try_get("effective_rps")?,
            paused_until: row.try_get("paused_until")?,
            last_throttled: row.try_get("last_throttled")?,
            last_recovery: row.try_get("last_recovery")?,
        },
    ))
}

/// The rows of `keys`, created when missing and locked in key order, and the database's time.
async fn lock_rows(
    tx: &mut sqlx::PgConnection,
    keys: &[String],
) -> Result<(UnixMillis, HashMap<String, BudgetState>), StoreError> {
    let keys_json = serde_json::to_string(keys).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    sqlx::query(include_str!("sql/postgres/budget_create.sql"))
        .bind(&keys_json)
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(include_str!("sql/postgres/budget_lock.sql"))
        .bind(&keys_json)
        .fetch_all(&mut *tx)
        .await?;
    let mut now = None;
    let mut states = HashMap::with_capacity(rows.len());
    for row in &rows {
        now = Some(UnixMillis(row.try_get("now_ms")?));
        let (key, state) = state_from_row(row)?;
        states.insert(key, state);
    }
    let now = match now {
        Some(now) => now,
        None => UnixMillis(
            sqlx::query_scalar(include_str!("sql/postgres/budget_now.sql"))
                .fetch_one(&mut *tx)
                .await?,
        ),
    };
    Ok((now, states))
}

/// Writes the states back.
async fn save_rows(
    tx: &mut sqlx::PgConnection,
    states: &HashMap<String, BudgetState>,
) -> Result<(), StoreError> {
    let rows: Vec<serde_json::Value> = states
        .iter()
        .map(|(key, state)| {
            serde_json::json!({
                "key": key,
                "tat_us": state.tat_us,
                "effective_rps": state.effective_rps,
                "paused_until": state.paused_until,
                "last_throttled": state.last_throttled,
                "last_recovery": state.last_recovery,
            })
        })
        .collect();
    sqlx::query(include_str!("sql/postgres/budget_save.sql"))
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

impl Store {
    /// Reserves permits for a dispatch pass from the budget every replica shares: each
    /// request's client limit and the `global` one. Only on a shared database
    /// ([`Store::shares_rate_budget`]); elsewhere the limits live in the process.
    pub async fn reserve_budget(
        &self,
        requests: &[BudgetRequest],
        global: Option<Rate>,
        adaptation: &Adaptation,
    ) -> Result<Reservation, StoreError> {
        let Db::Postgres(pool) = &self.pool else {
            return Err(StoreError::Unavailable(
                "the rate budget is shared only on PostgreSQL".into(),
            ));
        };
        if global.is_none() && requests.iter().all(|request| request.rate.is_none()) {
            // Nothing here is limited: no row to touch.
            return Ok(Reservation {
                grants: requests
                    .iter()
                    .map(|request| BudgetGrant {
                        client_id: request.client_id.clone(),
                        granted: request.want,
                        client_retry_at: None,
                    })
                    .collect(),
                global_retry_at: None,
            });
        }
        let mut keys: Vec<String> = requests
            .iter()
            .filter(|request| request.rate.is_some())
            .map(|request| client_key(&request.client_id))
            .collect();
        if global.is_some() {
            keys.push(GLOBAL.to_string());
        }
        keys.sort();
        keys.dedup();
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let (now, mut states) = lock_rows(&mut tx, &keys).await?;
        let mut global_state = states.remove(GLOBAL);
        let mut clients: HashMap<String, BudgetState> = requests
            .iter()
            .filter_map(|request| {
                let state = states.remove(&client_key(&request.client_id))?;
                Some((request.client_id.clone(), state))
            })
            .collect();
        let reservation = on_local_clock(
            allocate(
                requests,
                &mut clients,
                global_state.as_mut().zip(global),
                adaptation,
                now,
            ),
            now,
        );
        let mut changed: HashMap<String, BudgetState> = clients
            .into_iter()
            .map(|(client_id, state)| (client_key(&client_id), state))
            .collect();
        if let Some(state) = global_state {
            changed.insert(GLOBAL.to_string(), state);
        }
        save_rows(&mut tx, &changed).await?;
        tx.commit().await?;
        Ok(reservation)
    }

    /// Upstream answered 429 for `client_id`: its shared budget pauses and lowers, for every
    /// replica. Returns what changed, for the log; `None` on a database that does not share the
    /// budget.
    pub async fn throttle_budget(
        &self,
        client_id: &str,
        rate: Rate,
        adaptation: &Adaptation,
        retry_after_ms: Option<i64>,
    ) -> Result<Option<Throttled>, StoreError> {
        let Db::Postgres(pool) = &self.pool else {
            return Ok(None);
        };
        let key = client_key(client_id);
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let (now, mut states) = lock_rows(&mut tx, std::slice::from_ref(&key)).await?;
        let state = states
            .entry(key)
            .or_insert_with(|| BudgetState::fresh(rate));
        let throttled = state.throttle(rate, adaptation, retry_after_ms, now);
        save_rows(&mut tx, &states).await?;
        tx.commit().await?;
        Ok(Some(throttled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adaptation() -> Adaptation {
        Adaptation {
            enabled: true,
            decrease_factor: 0.5,
            floor_fraction: 0.05,
            quiet_period_ms: 10_000,
            recovery_step: 0.1,
            default_pause_ms: 1_000,
        }
    }

    fn request(client_id: &str, per_second: f64, want: u32) -> BudgetRequest {
        BudgetRequest {
            client_id: client_id.to_string(),
            rate: Some(Rate {
                per_second,
                burst: 5,
            }),
            want,
        }
    }

    #[test]
    fn the_global_budget_goes_to_the_first_requests_and_nothing_is_wasted() {
        let now = UnixMillis(1_000_000);
        let rate = |per_second| Rate {
            per_second,
            burst: 5,
        };
        let requests = [request("a", 100.0, 4), request("b", 100.0, 4)];
        let mut clients: HashMap<String, BudgetState> = [
            ("a".to_string(), BudgetState::fresh(rate(100.0))),
            ("b".to_string(), BudgetState::fresh(rate(100.0))),
        ]
        .into();
        let mut global = BudgetState::fresh(rate(100.0));
        let reservation = allocate(
            &requests,
            &mut clients,
            Some((&mut global, rate(100.0))),
            &adaptation(),
            now,
        );
        let granted: Vec<u32> = reservation.grants.iter().map(|g| g.granted).collect();
        assert_eq!(
            granted,
            [4, 1],
            "the global burst of 5 goes in request order"
        );
        assert!(reservation.global_retry_at.is_some_and(|at| at > now));
        // b's own budget lost only the one permit it was granted: 4 more at once.
        let mut b = clients["b"].clone();
        assert_eq!(b.reserve(rate(100.0), &adaptation(), 10, now).granted, 4);
    }

    #[test]
    fn a_clients_own_limit_says_when_it_may_go_again() {
        let now = UnixMillis(1_000_000);
        let rate = Rate {
            per_second: 1.0,
            burst: 1,
        };
        let requests = [BudgetRequest {
            client_id: "slow".into(),
            rate: Some(rate),
            want: 3,
        }];
        let mut clients: HashMap<String, BudgetState> =
            [("slow".to_string(), BudgetState::fresh(rate))].into();
        let reservation = allocate(&requests, &mut clients, None, &adaptation(), now);
        assert_eq!(reservation.grants[0].granted, 1);
        assert_eq!(reservation.global_retry_at, None);
        let retry = reservation.grants[0].client_retry_at.expect("held back");
        assert!(retry > now && retry <= UnixMillis(now.0 + 1_000));
    }

    #[test]
    fn unlimited_clients_take_only_from_the_global_budget() {
        let now = UnixMillis(1_000_000);
        let global_rate = Rate {
            per_second: 10.0,
            burst: 3,
        };
        let requests = [BudgetRequest {
            client_id: "free".into(),
            rate: None,
            want: 10,
        }];
        let mut global = BudgetState::fresh(global_rate);
        let reservation = allocate(
            &requests,
            &mut HashMap::new(),
            Some((&mut global, global_rate)),
            &adaptation(),
            now,
        );
        assert_eq!(reservation.grants[0].granted, 3);
        assert_eq!(reservation.grants[0].client_retry_at, None);
    }
}
