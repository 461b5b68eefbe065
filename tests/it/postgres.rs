//! `fresh_database`: an empty PostgreSQL database for each test of the PostgreSQL backend.
//!
//! Where the server comes from, in order:
//! - `TOKEN_BROKER_TEST_POSTGRES_URL`, the URL of a server where its user may `CREATE DATABASE`
//!   (`.ci/run` starts one and sets it), e.g. `postgres://postgres@127.0.0.1:5432/postgres`;
//! - otherwise a private throwaway cluster, started once per test process with `initdb` and
//!   `pg_ctl` (found on the PATH or through `pg_config --bindir`; as root they run as the
//!   `postgres` user), on a free loopback port, in a temporary directory. A detached watchdog
//!   stops it and removes the directory once the test process has gone, however it ended.
//!
//! Without either, a test that asks for a database is skipped with a loud notice on stderr,
//! except under CI (`CI=true`), where that is a failure. Each test gets its own database
//! `tb_<random hex>` on the shared server; they are never dropped (the server is throwaway).
//! No sqlx connection outlives a call: every `#[tokio::test]` runs its own runtime.

use std::{
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::helpers::PATIENCE;

/// The URL of a server to create test databases on, given by whoever runs the tests.
pub const URL_VARIABLE: &str = "TOKEN_BROKER_TEST_POSTGRES_URL";

/// A fresh, empty database for one test (its URL, e.g.
/// `postgres://postgres@127.0.0.1:PORT/tb_xxx`), or `None` when no PostgreSQL is available:
/// then it prints a loud multi-line SKIP notice to stderr.
/// Under CI (env `CI=true`) a missing PostgreSQL is a failure: it panics with instructions.
///
/// A server named by `TOKEN_BROKER_TEST_POSTGRES_URL` that cannot be reached, or refuses to
/// create the database, is always a failure: whoever set the variable expects it to work.
pub async fn fresh_database() -> Option<String> {
    let server = match std::env::var(URL_VARIABLE) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => {
            // Blocking work (initdb, pg_ctl) for the first caller; the others wait for it.
            let cluster = tokio::task::spawn_blocking(private_cluster)
                .await
                .expect("the cluster start-up does not panic");
            match cluster {
                Ok(url) => url,
                Err(why) => return skip(&why),
            }
        }
    };
    let name = format!("tb_{}", hex::encode(rand::random::<[u8; 8]>()));
    tokio::time::timeout(PATIENCE, create_database(&server, &name))
        .await
        .unwrap_or_else(|_| panic!("CREATE DATABASE on {server} took longer than {PATIENCE:?}"))
        .unwrap_or_else(|error| panic!("cannot create a test database on {server}: {error}"));
    let mut url = url::Url::parse(&server).expect("the server URL parses");
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

/// Creates database `name` on the server at `server`, over a connection used only for that.
async fn create_database(server: &str, name: &str) -> Result<(), sqlx::Error> {
    let mut conn = PgConnection::connect(server).await?;
    // `name` is `tb_` and hex digits: nothing to quote or escape.
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await?;
    conn.close().await
}

/// Under CI a missing PostgreSQL fails the test; elsewhere the test is skipped, loudly.
fn skip(why: &str) -> Option<String> {
    let test = std::thread::current()
        .name()
        .unwrap_or("a PostgreSQL test")
        .to_string();
    let how = format!(
        "  To run it, either install PostgreSQL (initdb and pg_ctl on the PATH or in\n  \
         `pg_config --bindir`; as root they run as the `postgres` user), or set\n  \
         {URL_VARIABLE}=postgres://USER@HOST:PORT/postgres\n  \
         naming a server where USER may CREATE DATABASE."
    );
    let ci = std::env::var("CI").is_ok_and(|value| matches!(value.as_str(), "true" | "1"));
    if ci {
        panic!("\n{test}: no PostgreSQL, and CI=true forbids skipping.\n  Why: {why}\n{how}\n");
    }
    let rule = "=".repeat(78);
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n{rule}\nSKIPPED: {test}\n  This test checked NOTHING: no PostgreSQL is available.\n  \
         Why: {why}\n{how}\n{rule}\n"
    );
    None
}

/// The private cluster of this test process: started by the first caller, shared by all. An
/// `Err` (why it could not start) is kept too, so the attempt is made once.
fn private_cluster() -> Result<String, String> {
    static CLUSTER: OnceLock<Result<String, String>> = OnceLock::new();
    CLUSTER.get_or_init(start_private_cluster).clone()
}

/// `initdb` and `pg_ctl start` in a new temporary directory, with the watchdog that cleans up
/// after this process. Returns the URL of the `postgres` database as user `postgres`.
fn start_private_cluster() -> Result<String, String> {
    let initdb = find_tool("initdb")?;
    let pg_ctl = find_tool("pg_ctl")?;
    // PostgreSQL refuses to run as root: then it runs as `postgres`, which owns its files.
    let runuser = if running_as_root() {
        Some(find_runuser()?)
    } else {
        None
    };
    let runuser = runuser.as_deref();
    let dir = tempfile::Builder::new()
        .prefix("token-broker-pg-")
        .tempdir()
        .map_err(|error| format!("cannot create a temporary directory: {error}"))?
        // Kept while this process lives; the watchdog removes it afterwards.
        .keep();
    let data = dir.join("data");
    watch_over(&dir, &data, &pg_ctl, runuser)?;
    if runuser.is_some() {
        run(Command::new("chown").arg("postgres:").arg(&dir))?;
    }

    // No locale from the environment (it may not exist here); no sync of the fresh files
    // (a throwaway cluster: the server itself still runs with fsync on).
    run(postgres_command(&initdb, runuser)
        .arg("--pgdata")
        .arg(&data)
        .args(["--auth=trust", "--username=postgres"])
        .args(["--encoding=UTF8", "--no-locale", "--no-sync"]))?;

    // Another process may take the free port before the server binds it: try a few.
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port()?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 \
             -c shared_buffers=64MB -c fsync=on",
            quoted(&dir)
        );
        let started = run(postgres_command(&pg_ctl, runuser)
            .arg("--pgdata")
            .arg(&data)
            .arg("--log")
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]));
        match started {
            Ok(()) => return Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres")),
            Err(why) => failures.push(why),
        }
    }
    let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    Err(format!(
        "the private cluster in {} did not start: {}\n  --- server log\n{log}",
        dir.display(),
        failures.join("; ")
    ))
}

/// A detached shell that waits for this process to end, then stops the server and removes
/// `dir`. It has its own process group, so a Ctrl-C to the test run does not end it first.
fn watch_over(
    dir: &Path,
    data: &Path,
    pg_ctl: &Path,
    runuser: Option<&Path>,
) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let as_postgres = runuser
        .map(|runuser| format!("{} -u postgres -- ", quoted(runuser)))
        .unwrap_or_default();
    let stop = format!(
        "{as_postgres}{} --pgdata {} -m immediate stop",
        quoted(pg_ctl),
        quoted(data),
    );
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop}; rm -rf {dir}",
        pid = std::process::id(),
        dir = quoted(dir),
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
        .map_err(|error| format!("cannot start the cluster's watchdog: {error}"))
}

/// `tool`, run as the `postgres` user through `runuser` when given (this process is root).
fn postgres_command(tool: &Path, runuser: Option<&Path>) -> Command {
    if let Some(runuser) = runuser {
        let mut command = Command::new(runuser);
        command.args(["-u", "postgres", "--"]).arg(tool);
        command
    } else {
        Command::new(tool)
    }
}

/// Runs `command` to completion; its output becomes the error if it fails.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run {command:?}: {error}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    ))
}

/// A PostgreSQL server program: on the PATH, or in the directory `pg_config --bindir` names
/// (Debian keeps them in /usr/lib/postgresql/VERSION/bin).
fn find_tool(name: &str) -> Result<PathBuf, String> {
    if let Some(tool) = on_path(name) {
        return Ok(tool);
    }
    let bindir = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()));
    bindir
        .map(|dir| dir.join(name))
        .filter(|tool| tool.is_file())
        .ok_or_else(|| format!("{name} is neither on the PATH nor in `pg_config --bindir`"))
}

/// `runuser` (util-linux), which root's PATH has but another's may not.
fn find_runuser() -> Result<PathBuf, String> {
    on_path("runuser")
        .or_else(|| {
            ["/usr/sbin/runuser", "/sbin/runuser"]
                .map(PathBuf::from)
                .into_iter()
                .find(|candidate| candidate.is_file())
        })
        .ok_or_else(|| "running as root, but runuser is missing to run PostgreSQL".to_string())
}

/// The program `name` in a directory of the PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Whether this process's effective user is root, from /proc (or `id -u` without /proc).
fn running_as_root() -> bool {
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        // "Uid:\treal\teffective\tsaved\tfs"
        if let Some(uids) = status.lines().find_map(|line| line.strip_prefix("Uid:")) {
            return uids.split_whitespace().nth(1) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|error| format!("cannot find a free port: {error}"))
}

/// `path` quoted for `sh`.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The harness itself: distinct, empty, reachable databases on one server.
mod harness {
    use sqlx::{Connection, PgConnection};

    use super::fresh_database;

    async fn connect(url: &str) -> PgConnection {
        PgConnection::connect(url)
            .await
            .unwrap_or_else(|error| panic!("connect to {url}: {error}"))
    }

    /// User tables and views in the connection's database.
    async fn user_tables(conn: &mut PgConnection) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables \
             WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
        )
        .fetch_one(conn)
        .await
        .expect("count tables")
    }

    #[tokio::test]
    async fn two_calls_give_two_different_empty_databases() {
        let Some(first) = fresh_database().await else {
            return;
        };
        let second = fresh_database()
            .await
            .expect("a second database where the first was made");
        assert_ne!(first, second);

        for url in [&first, &second] {
            let mut conn = connect(url).await;
            let one: i32 = sqlx::query_scalar("SELECT 1")
                .fetch_one(&mut conn)
                .await
                .expect("SELECT 1");
            assert_eq!(one, 1);
            let name: String = sqlx::query_scalar("SELECT current_database()")
                .fetch_one(&mut conn)
                .await
                .expect("current_database()");
            assert!(
                url.ends_with(&format!("/{name}")) && name.starts_with("tb_"),
                "{url} is database {name}"
            );
            assert_eq!(user_tables(&mut conn).await, 0, "{url} is empty");
            conn.close().await.expect("close");
        }

        // Separate databases: what one test creates, another does not see.
        let mut conn = connect(&first).await;
        sqlx::query("CREATE TABLE marker (id INTEGER PRIMARY KEY)")
            .execute(&mut conn)
            .await
            .expect("create a table in the first database");
        assert_eq!(user_tables(&mut conn).await, 1);
        conn.close().await.expect("close");
        let mut conn = connect(&second).await;
        assert_eq!(user_tables(&mut conn).await, 0, "the second is still empty");
        conn.close().await.expect("close");
    }

    /// Concurrent callers (this test and the one above run in parallel too) share one server.
    #[tokio::test]
    async fn concurrent_calls_share_one_server() {
        let (a, b, c) = tokio::join!(fresh_database(), fresh_database(), fresh_database());
        let Some(a) = a else {
            return;
        };
        let urls = [a, b.expect("b"), c.expect("c")];
        let parsed: Vec<url::Url> = urls
            .iter()
            .map(|url| url::Url::parse(url).expect("URL"))
            .collect();
        for url in &parsed[1..] {
            assert_eq!(url.host_str(), parsed[0].host_str());
            assert_eq!(url.port(), parsed[0].port());
            assert_ne!(url.path(), parsed[0].path());
        }
        for url in &urls {
            connect(url).await.close().await.expect("close");
        }
    }
}
