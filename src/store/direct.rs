//! The SQLite writer's connection, driven directly on the writer's own thread.
//!
//! sqlx runs every SQLite statement on a worker thread of its own: each statement is a
//! hand-off there and back, and each result row another (issue 14's profile: about a third of
//! the daemon's CPU per exchange went to those hand-offs and the copies around them, more than
//! SQLite's own work). The writer is one thread that only writes, so it holds its connection
//! itself ([`rusqlite`], on the same SQLite library sqlx links) and runs its statements in
//! place; the readers, the migrations and the WAL checkpoints stay with sqlx.
//!
//! [`Query`] offers the part of sqlx's query API the store's statements use (`bind`, `execute`,
//! the `fetch_*` forms, `persistent`), so one piece of store code, written once for sqlx
//! ([`super::backend::on_backend`]), also runs here; its futures are ready at once. Errors come
//! back as `sqlx::Error`, SQLite's result codes kept, so that the store tells the database's
//! condition from a bug ([`super::StoreError::is_transient`]) the same way on both paths.

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rusqlite::{
    OpenFlags,
    types::{ToSql, ToSqlOutput, Value},
};
use sqlx::error::{DatabaseError, ErrorKind};

use super::backend::{Columns, SqliteStatements};

/// Prepared statements kept, the least recently used dropped first, as sqlx kept them: the
/// store's fixed statements and the multi-row inserts of the batch sizes seen lately (one text
/// per row count; a 200-row insert holds about 200 KB prepared).
const STATEMENT_CACHE: usize = 100;

/// The settings the writer's connection opens with.
#[derive(Debug, Clone)]
pub(super) struct Settings {
    /// `PRAGMA synchronous`: `NORMAL`, `FULL` or `EXTRA`.
    pub(super) synchronous: &'static str,
    pub(super) busy_timeout: Duration,
    /// Further pragmas, in order (name, value).
    pub(super) pragmas: Vec<(&'static str, String)>,
}

/// The writer's SQLite connection, and what it was opened with (to open it again).
pub(super) struct DirectConn {
    conn: rusqlite::Connection,
    path: PathBuf,
    settings: Settings,
}

impl std::fmt::Debug for DirectConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectConn")
    }
}

impl DirectConn {
    /// Opens the database at `path` (which must exist, migrated) for writing, in WAL mode with
    /// foreign keys enforced, as sqlx's connections to it are.
    pub(super) fn open(path: &Path, settings: &Settings) -> sqlx::Result<DirectConn> {
        Ok(DirectConn {
            conn: Self::connect(path, settings)?,
            path: path.to_path_buf(),
            settings: settings.clone(),
        })
    }

    fn connect(path: &Path, settings: &Settings) -> sqlx::Result<rusqlite::Connection> {
        // `URI` as sqlx opens its connections, so that a `file:` path names the same file.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let conn = rusqlite::Connection::open_with_flags(path, flags).map_err(database)?;
        conn.busy_timeout(settings.busy_timeout).map_err(database)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(database)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(sqlx::Error::Configuration(
                format!("the database would not enter WAL mode (it is in {mode} mode)").into(),
            ));
        }
        let mut pragmas = vec![
            ("foreign_keys", "ON".to_string()),
            ("synchronous", settings.synchronous.to_string()),
        ];
        pragmas.extend(settings.pragmas.iter().cloned());
        for (name, value) in pragmas {
            // Some pragmas answer with their new value (`max_page_count`): read and drop it.
            let mut statement = conn
                .prepare(&format!("PRAGMA {name} = {value}"))
                .map_err(database)?;
            let mut rows = statement.raw_query();
            while rows.next().map_err(database)?.is_some() {}
        }
        Ok(conn)
    }

    /// Runs statements without parameters (`BEGIN IMMEDIATE`, `COMMIT`, `ROLLBACK`).
    pub(super) fn run(&mut self, sql: &str) -> sqlx::Result<()> {
        self.conn.execute_batch(sql).map_err(database)
    }

    /// Ends a failed transaction. SQLite may already have rolled it back on its own (a full
    /// disk), and then `ROLLBACK` fails with nothing to undo. A connection still inside a
    /// transaction after it (a `ROLLBACK` that failed, an I/O error) would make every later
    /// `BEGIN` fail: it is replaced by a fresh one, and closing it drops what the transaction
    /// wrote (a WAL holds only committed frames for other connections to read).
    pub(super) fn roll_back(&mut self) -> sqlx::Result<()> {
        let _ = self.run("ROLLBACK");
        if self.conn.is_autocommit() {
            return Ok(());
        }
        tracing::warn!("the writing connection could not roll back; opening it again");
        self.reopen()
    }

    /// Replaces the connection with a fresh one, opened as this one was.
    fn reopen(&mut self) -> sqlx::Result<()> {
        let fresh = Self::connect(&self.path, &self.settings)?;
        if let Err((_, error)) = std::mem::replace(&mut self.conn, fresh).close() {
            tracing::warn!(error = %database(error), "closing the connection that could not roll back failed");
        }
        Ok(())
    }

    /// Closes the connection, reporting a failure to (a statement left unfinished).
    pub(super) fn close(self) -> sqlx::Result<()> {
        self.conn.close().map_err(|(_, error)| database(error))
    }
}

impl SqliteStatements for DirectConn {
    type Query = Query;

    fn statement(&self, sql: &'static str) -> Query {
        Query::new(Cow::Borrowed(sql))
    }

    fn generated(&self, sql: String) -> Query {
        Query::new(Cow::Owned(sql))
    }
}

/// A statement and its bound values, run by one of the `fetch_*` forms or `execute`.
pub(super) struct Query {
    sql: Cow<'static, str>,
    values: Vec<Value>,
    /// The first value that could not be bound, reported when the statement runs (as sqlx
    /// does).
    unbindable: Option<rusqlite::Error>,
}

impl std::fmt::Debug for Query {
    // The values include sealed secrets and callers' keys: their count only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query")
            .field("sql", &self.sql)
            .field("values", &self.values.len())
            .finish_non_exhaustive()
    }
}

/// What `execute` reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct Done {
    rows_affected: u64,
}

impl Done {
    pub(super) fn rows_affected(&self) -> u64 {
        self.rows_affected
    }
}

impl Query {
    fn new(sql: Cow<'static, str>) -> Query {
        Query {
            sql,
            values: Vec::new(),
            unbindable: None,
        }
    }

    /// Binds the next parameter.
    pub(super) fn bind<T: ToSql>(mut self, value: T) -> Query {
        let owned = match value.to_sql() {
            Ok(ToSqlOutput::Borrowed(borrowed)) => Value::try_from(borrowed)
                .map_err(|error| rusqlite::Error::ToSqlConversionFailure(Box::new(error))),
            Ok(ToSqlOutput::Owned(owned)) => Ok(owned),
            Ok(_) => Err(rusqlite::Error::ToSqlConversionFailure(
                "a value SQLite cannot take as a parameter".into(),
            )),
            Err(error) => Err(error),
        };
        match owned {
            Ok(value) => self.values.push(value),
            Err(error) => {
                self.values.push(Value::Null);
                self.unbindable.get_or_insert(error);
            }
        }
        self
    }

    /// Accepted for sqlx's sake: SQLite's plans do not depend on the data, so every statement
    /// keeps its plan ([`super::backend::Db::may_keep_plans`]).
    pub(super) fn persistent(self, _keep: bool) -> Query {
        self
    }

    /// Runs the statement to its end; answers how many rows it changed.
    pub(super) fn execute(self, conn: &mut DirectConn) -> std::future::Ready<sqlx::Result<Done>> {
        std::future::ready(self.run(conn, drop).map(|()| Done {
            rows_affected: conn.conn.changes(),
        }))
    }

    /// Every row the statement returns.
    pub(super) fn fetch_all(
        self,
        conn: &mut DirectConn,
    ) -> std::future::Ready<sqlx::Result<Vec<Row>>> {
        let mut rows = Vec::new();
        let ran = self.run(conn, |row| rows.push(row));
        std::future::ready(ran.map(|()| rows))
    }

    /// The first row the statement returns, if any (it runs to its end either way).
    pub(super) fn fetch_optional(
        self,
        conn: &mut DirectConn,
    ) -> std::future::Ready<sqlx::Result<Option<Row>>> {
        std::future::ready(self.first(conn))
    }

    /// The first row the statement returns; `RowNotFound` when it returns none.
    pub(super) fn fetch_one(self, conn: &mut DirectConn) -> std::future::Ready<sqlx::Result<Row>> {
        std::future::ready(
            self.first(conn)
                .and_then(|first| first.ok_or(sqlx::Error::RowNotFound)),
        )
    }

    fn first(self, conn: &mut DirectConn) -> sqlx::Result<Option<Row>> {
        let mut first = None;
        self.run(conn, |row| {
            first.get_or_insert(row);
        })?;
        Ok(first)
    }

    /// Prepares (or takes from the cache), binds and steps the statement to its end, handing
    /// each row to `each`.
    fn run(self, conn: &mut DirectConn, mut each: impl FnMut(Row)) -> sqlx::Result<()> {
        if let Some(error) = self.unbindable {
            return Err(sqlx::Error::Encode(Box::new(error)));
        }
        let mut statement = conn.conn.prepare_cached(&self.sql).map_err(database)?;
        let expected = statement.parameter_count();
        if expected != self.values.len() {
            return Err(sqlx::Error::InvalidArgument(format!(
                "the statement takes {expected} parameters, {} were bound",
                self.values.len()
            )));
        }
        for (index, value) in self.values.iter().enumerate() {
            statement
                .raw_bind_parameter(index + 1, value)
                .map_err(database)?;
        }
        let names: Arc<[Box<str>]> = statement
            .column_names()
            .into_iter()
            .map(Box::from)
            .collect();
        let mut rows = statement.raw_query();
        while let Some(row) = rows.next().map_err(database)? {
            let values = (0..names.len())
                .map(|index| {
                    let value = row.get_ref(index).map_err(database)?;
                    Value::try_from(value).map_err(|error| sqlx::Error::ColumnDecode {
                        index: names[index].to_string(),
                        source: Box::new(error),
                    })
                })
                .collect::<sqlx::Result<Vec<_>>>()?;
            each(Row {
                names: Arc::clone(&names),
                values,
            });
        }
        Ok(())
    }
}

/// A row a statement returned, its values copied out of SQLite.
pub(super) struct Row {
    names: Arc<[Box<str>]>,
    values: Vec<Value>,
}

impl std::fmt::Debug for Row {
    // The values include sealed secrets: the column names only.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Row")
            .field("columns", &self.names)
            .finish_non_exhaustive()
    }
}

impl Row {
    fn value(&self, column: &str) -> sqlx::Result<&Value> {
        self.names
            .iter()
            .position(|name| &**name == column)
            .map(|index| &self.values[index])
            .ok_or_else(|| sqlx::Error::ColumnNotFound(column.to_string()))
    }

    fn mismatched(column: &str, expected: &str, found: &Value) -> sqlx::Error {
        sqlx::Error::ColumnDecode {
            index: column.to_string(),
            source: format!("expected {expected}, found {:?}", found.data_type()).into(),
        }
    }
}

impl Columns for Row {
    fn int(&self, column: &str) -> sqlx::Result<i64> {
        self.opt_int(column)?
            .ok_or_else(|| Row::mismatched(column, "an integer", &Value::Null))
    }

    fn opt_int(&self, column: &str) -> sqlx::Result<Option<i64>> {
        match self.value(column)? {
            Value::Integer(value) => Ok(Some(*value)),
            Value::Null => Ok(None),
            other => Err(Row::mismatched(column, "an integer", other)),
        }
    }

    fn text(&self, column: &str) -> sqlx::Result<String> {
        self.opt_text(column)?
            .ok_or_else(|| Row::mismatched(column, "text", &Value::Null))
    }

    fn opt_text(&self, column: &str) -> sqlx::Result<Option<String>> {
        match self.value(column)? {
            Value::Text(value) => Ok(Some(value.clone())),
            Value::Null => Ok(None),
            other => Err(Row::mismatched(column, "text", other)),
        }
    }

    fn flag(&self, column: &str) -> sqlx::Result<bool> {
        Ok(self.int(column)? != 0)
    }
}

/// An error SQLite returned, with its extended result code (as sqlx reports SQLite's).
#[derive(Debug)]
struct SqliteFailure {
    code: i32,
    message: String,
}

impl std::fmt::Display for SqliteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "(code: {}) {}", self.code, self.message)
    }
}

impl std::error::Error for SqliteFailure {}

impl DatabaseError for SqliteFailure {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        Some(Cow::Owned(self.code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> ErrorKind {
        use rusqlite::ffi;
        match self.code {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                ErrorKind::UniqueViolation
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => ErrorKind::ForeignKeyViolation,
            ffi::SQLITE_CONSTRAINT_NOTNULL => ErrorKind::NotNullViolation,
            ffi::SQLITE_CONSTRAINT_CHECK => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}

/// A rusqlite error as sqlx reports it: SQLite's own as a database error with its code; any
/// other (a value of the wrong type, a misuse) as the bug it is.
fn database(error: rusqlite::Error) -> sqlx::Error {
    match error {
        rusqlite::Error::SqliteFailure(failure, message) => {
            sqlx::Error::Database(Box::new(SqliteFailure {
                code: failure.extended_code,
                message: message.unwrap_or_else(|| failure.to_string()),
            }))
        }
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open() -> (tempfile::TempDir, DirectConn) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("direct.db");
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(
                "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, note TEXT);",
            )
            .unwrap();
        let settings = Settings {
            synchronous: "FULL",
            busy_timeout: Duration::from_secs(1),
            pragmas: vec![("cache_size", "-2048".to_string())],
        };
        let conn = DirectConn::open(&path, &settings).unwrap();
        (dir, conn)
    }

    async fn insert(conn: &mut DirectConn, name: &str) -> sqlx::Result<Done> {
        conn.statement("INSERT INTO t (name) VALUES (?)")
            .bind(name)
            .execute(conn)
            .await
    }

    #[tokio::test]
    async fn binds_runs_and_reads_rows_by_column_name() {
        let (_dir, mut conn) = open();
        let done = conn
            .generated("INSERT INTO t (name, note) VALUES (?, ?), (?, ?)".to_string())
            .bind("a")
            .bind(None::<String>)
            .bind(String::from("b"))
            .bind(Some("second"))
            .execute(&mut conn)
            .await
            .unwrap();
        assert_eq!(done.rows_affected(), 2);
        let rows = conn
            .statement("SELECT id, name, note FROM t ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].text("name").unwrap(), "a");
        assert_eq!(rows[0].opt_text("note").unwrap(), None);
        assert_eq!(rows[1].opt_text("note").unwrap().as_deref(), Some("second"));
        assert!(rows[1].int("id").unwrap() > rows[0].int("id").unwrap());
        assert!(matches!(
            rows[0].int("name"),
            Err(sqlx::Error::ColumnDecode { .. })
        ));
        assert!(matches!(
            rows[0].int("absent"),
            Err(sqlx::Error::ColumnNotFound(_))
        ));
        let none = conn
            .statement("SELECT id FROM t WHERE name = ?")
            .bind("zzz")
            .fetch_optional(&mut conn)
            .await
            .unwrap();
        assert!(none.is_none());
        assert!(matches!(
            conn.statement("SELECT id FROM t WHERE name = ?")
                .bind("zzz")
                .fetch_one(&mut conn)
                .await,
            Err(sqlx::Error::RowNotFound)
        ));
    }

    #[tokio::test]
    async fn sqlite_errors_keep_their_codes_and_a_wrong_bind_count_is_refused() {
        let (_dir, mut conn) = open();
        insert(&mut conn, "x").await.unwrap();
        let Err(sqlx::Error::Database(error)) = insert(&mut conn, "x").await else {
            panic!("a duplicate name must fail as a database error");
        };
        assert!(error.is_unique_violation());
        assert_eq!(error.code().as_deref(), Some("2067"));
        assert!(matches!(
            conn.statement("INSERT INTO t (name) VALUES (?)")
                .execute(&mut conn)
                .await,
            Err(sqlx::Error::InvalidArgument(_))
        ));
        // A failed statement leaves the connection usable, its cache included.
        insert(&mut conn, "y").await.unwrap();
    }

    #[test]
    fn opens_with_the_settings_asked_for() {
        let (_dir, conn) = open();
        let pragma = |name: &str| -> String {
            conn.conn
                .query_row(&format!("PRAGMA {name}"), [], |row| {
                    row.get::<_, rusqlite::types::Value>(0)
                })
                .map(|value| match value {
                    Value::Integer(n) => n.to_string(),
                    Value::Text(text) => text,
                    other => format!("{other:?}"),
                })
                .unwrap()
        };
        assert_eq!(pragma("journal_mode"), "wal");
        assert_eq!(pragma("synchronous"), "2", "FULL");
        assert_eq!(pragma("foreign_keys"), "1");
        assert_eq!(pragma("cache_size"), "-2048");
        assert_eq!(pragma("busy_timeout"), "1000");
    }

    #[tokio::test]
    async fn a_busy_database_is_transient_and_a_broken_constraint_is_not() {
        let (dir, mut conn) = open();
        let other = rusqlite::Connection::open(dir.path().join("direct.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        conn.conn.busy_timeout(Duration::from_millis(1)).unwrap();
        let busy = super::super::StoreError::from(conn.run("BEGIN IMMEDIATE").unwrap_err());
        assert!(busy.is_transient(), "{busy}");
        other.execute_batch("ROLLBACK").unwrap();
        insert(&mut conn, "x").await.unwrap();
        let duplicate = insert(&mut conn, "x").await.unwrap_err();
        assert!(!super::super::StoreError::from(duplicate).is_transient());
    }

    #[tokio::test]
    async fn transactions_commit_and_roll_back() {
        let (_dir, mut conn) = open();
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "gone").await.unwrap();
        conn.run("ROLLBACK").unwrap();
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "kept").await.unwrap();
        conn.run("COMMIT").unwrap();
        let names: Vec<String> = conn
            .statement("SELECT name FROM t")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| row.text("name").unwrap())
            .collect();
        assert_eq!(names, ["kept"]);
        conn.close().unwrap();
    }

    async fn names(conn: &mut DirectConn) -> Vec<String> {
        conn.statement("SELECT name FROM t ORDER BY id")
            .fetch_all(conn)
            .await
            .unwrap()
            .iter()
            .map(|row| row.text("name").unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_failed_transaction_ends_whether_or_not_sqlite_ended_it_already() {
        let (_dir, mut conn) = open();
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "gone").await.unwrap();
        conn.roll_back().unwrap();
        assert!(conn.conn.is_autocommit());
        // Nothing open (as after SQLite rolled back by itself): nothing to undo.
        conn.roll_back().unwrap();
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "kept").await.unwrap();
        conn.run("COMMIT").unwrap();
        assert_eq!(names(&mut conn).await, ["kept"]);
    }

    #[tokio::test]
    async fn a_connection_opened_again_drops_the_open_transaction_and_keeps_its_settings() {
        let (_dir, mut conn) = open();
        insert(&mut conn, "committed").await.unwrap();
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "uncommitted").await.unwrap();
        // What `roll_back` does when `ROLLBACK` leaves the transaction open.
        conn.reopen().unwrap();
        assert!(conn.conn.is_autocommit());
        assert_eq!(names(&mut conn).await, ["committed"]);
        let cache: i64 = conn
            .conn
            .query_row("PRAGMA cache_size", [], |row| row.get(0))
            .unwrap();
        assert_eq!(cache, -2048);
        // The write lock went with the old connection: writing works at once.
        conn.run("BEGIN IMMEDIATE").unwrap();
        insert(&mut conn, "after").await.unwrap();
        conn.run("COMMIT").unwrap();
        assert_eq!(names(&mut conn).await, ["committed", "after"]);
    }
}
