//! The two databases the store runs on, and what lets one piece of store code serve both.
//!
//! SQLite (embedded, one daemon per file) and PostgreSQL (shared by replicas) run the same
//! statements, each written in its own dialect under `sql/sqlite/` and `sql/postgres/` with the
//! same name and the same parameters. [`on_backend!`] picks the statement that matches the
//! connection in hand, so each operation is written once: its binds, its fetch, and the decoding
//! of its rows through [`Columns`], which both row types implement. Nothing outside the store
//! knows which database runs.

use sqlx::{PgConnection, PgPool, Row, SqlitePool, postgres::PgRow, sqlite::SqliteRow};

use super::direct::DirectConn;

/// One of the two databases: a pool, a connection.
#[derive(Debug, Clone)]
pub(super) enum Db<S, P> {
    Sqlite(S),
    Postgres(P),
}

/// Connections for reads (and, on PostgreSQL, for the rate budget).
pub(super) type Pool = Db<SqlitePool, PgPool>;

/// The writer's connection: on SQLite, held directly on the writer's thread
/// ([`super::direct`]).
pub(super) type Conn = Db<DirectConn, PgConnection>;

/// Makes a SQLite statement for the executor in hand: an sqlx query for the read pool, a
/// [`super::direct::Query`] for the writer's connection. Both offer the same binding and fetching
/// methods, so [`on_backend!`]'s bodies compile against either.
pub(super) trait SqliteStatements {
    type Query;
    fn statement(&self, sql: &'static str) -> Self::Query;
    fn generated(&self, sql: String) -> Self::Query;
}

impl SqliteStatements for SqlitePool {
    type Query = sqlx::query::Query<'static, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;
    fn statement(&self, sql: &'static str) -> Self::Query {
        sqlx::query(sql)
    }
    fn generated(&self, sql: String) -> Self::Query {
        sqlx::query(sqlx::AssertSqlSafe(sql))
    }
}

/// Runs `$body` against whichever database `$target` (a `&Pool` or a `&mut Conn`) is, with
/// `$query` the statement `sql/<dialect>/$name.sql` and `$executor` the pool or connection.
/// The body is compiled once per database, so its binds and row decoding must suit both.
macro_rules! on_backend {
    // A statement generated at run time (see `push_tuples`): the same text serves both.
    ($target:expr, generated $sql:expr, |$query:ident, $executor:ident| $body:expr) => {
        match $target {
            $crate::store::backend::Db::Sqlite($executor) => {
                let $query = $crate::store::backend::SqliteStatements::generated(&*$executor, $sql);
                $body
            }
            $crate::store::backend::Db::Postgres($executor) => {
                let $query = sqlx::query(sqlx::AssertSqlSafe($sql));
                $body
            }
        }
    };
    ($target:expr, $name:literal, |$query:ident, $executor:ident| $body:expr) => {
        match $target {
            $crate::store::backend::Db::Sqlite($executor) => {
                let $query = $crate::store::backend::SqliteStatements::statement(
                    &*$executor,
                    include_str!(concat!("sql/sqlite/", $name, ".sql")),
                );
                $body
            }
            $crate::store::backend::Db::Postgres($executor) => {
                let $query = sqlx::query(include_str!(concat!("sql/postgres/", $name, ".sql")));
                $body
            }
        }
    };
}
pub(super) use on_backend;

impl Conn {
    /// Runs a statement that takes no parameters and returns nothing (`BEGIN`, `COMMIT`).
    pub(super) async fn run(&mut self, sql: &'static str) -> sqlx::Result<()> {
        match self {
            Db::Sqlite(conn) => conn.run(sql),
            Db::Postgres(conn) => sqlx::raw_sql(sql).execute(&mut *conn).await.map(|_| ()),
        }
    }
}

impl<S, P> Db<S, P> {
    /// Whether a statement whose best plan depends on how many jobs there are may keep the
    /// plan it was first given (sqlx's `persistent`). On SQLite, yes: its planner reads the
    /// schema, not the table's size. On PostgreSQL, no: a plan cached while the jobs table was
    /// small (a fresh database) reads the whole table, or every dead entry of a partial index,
    /// once it has grown, until autovacuum's first `ANALYZE` replaces it (a minute or more
    /// later); measured on a fresh database under load, recording a batch's outcomes took
    /// 29 ms instead of 0.8 ms after 12,000 jobs. Such statements are planned at each
    /// execution there (a fraction of a millisecond).
    pub(super) fn may_keep_plans(&self) -> bool {
        matches!(self, Db::Sqlite(_))
    }

    /// The placeholder of the `n`th parameter (1-based) in this database's dialect, for the
    /// statements generated with a row count only known at run time (multi-row inserts).
    ///
    /// On SQLite it is a bare `?` (parameters are numbered in order): sqlx asks SQLite for each
    /// parameter's name while binding, and SQLite finds a numbered one (`?N`) by a linear scan
    /// of the statement's names, so a 2,400-parameter insert cost millions of steps; a bare `?`
    /// has no name to scan for (issue 14's profile: 12% of the daemon's CPU).
    pub(super) fn placeholder(&self, n: usize) -> String {
        match self {
            Db::Sqlite(_) => "?".to_string(),
            Db::Postgres(_) => format!("${n}"),
        }
    }

    /// Appends `rows` tuples of `columns` placeholders each to `sql` (`(?, ?), (?, ?)`, or
    /// `($1, $2), ($3, $4)`), numbered after the `bound_before` parameters the statement binds
    /// ahead of them. Only placeholders are generated; every value is bound.
    pub(super) fn push_tuples(
        &self,
        sql: &mut String,
        bound_before: usize,
        rows: usize,
        columns: usize,
    ) {
        let mut n = bound_before;
        for row in 0..rows {
            sql.push_str(if row == 0 { " (" } else { ", (" });
            for column in 0..columns {
                if column > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                sql.push_str(&self.placeholder(n));
            }
            sql.push(')');
        }
    }
}

/// Reading a column the same way from either database's rows. Integers are `BIGINT` on
/// PostgreSQL and `INTEGER` on SQLite: both read as `i64`; flags are `BOOLEAN` and `0/1`.
pub(super) trait Columns {
    fn int(&self, column: &str) -> sqlx::Result<i64>;
    fn opt_int(&self, column: &str) -> sqlx::Result<Option<i64>>;
    fn text(&self, column: &str) -> sqlx::Result<String>;
    fn opt_text(&self, column: &str) -> sqlx::Result<Option<String>>;
    fn flag(&self, column: &str) -> sqlx::Result<bool>;
}

macro_rules! columns_for {
    ($row:ty) => {
        impl Columns for $row {
            fn int(&self, column: &str) -> sqlx::Result<i64> {
                self.try_get(column)
            }
            fn opt_int(&self, column: &str) -> sqlx::Result<Option<i64>> {
                self.try_get(column)
            }
            fn text(&self, column: &str) -> sqlx::Result<String> {
                self.try_get(column)
            }
            fn opt_text(&self, column: &str) -> sqlx::Result<Option<String>> {
                self.try_get(column)
            }
            fn flag(&self, column: &str) -> sqlx::Result<bool> {
                self.try_get(column)
            }
        }
    };
}
columns_for!(SqliteRow);
columns_for!(PgRow);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_number_their_placeholders_in_each_dialect() {
        let sqlite: Db<(), ()> = Db::Sqlite(());
        let mut sql = String::from("VALUES");
        sqlite.push_tuples(&mut sql, 1, 2, 2);
        assert_eq!(sql, "VALUES (?, ?), (?, ?)");
        let postgres: Db<(), ()> = Db::Postgres(());
        let mut sql = String::from("VALUES");
        postgres.push_tuples(&mut sql, 0, 2, 3);
        assert_eq!(sql, "VALUES ($1, $2, $3), ($4, $5, $6)");
        let mut sql = String::from("VALUES");
        postgres.push_tuples(&mut sql, 2, 2, 1);
        assert_eq!(sql, "VALUES ($3), ($4)");
    }
}
