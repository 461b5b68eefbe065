//! The auditors' command line: `jobs list|get` and `audit list|export|verify|fingerprint`.
//!
//! It reads the database read-only, so it works on a copy of the file, months later, without a
//! running daemon, and never changes what it inspects. Tokens are never printed.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::Serialize;

use crate::{
    audit::AuditRecord,
    audit::checkpoint::{self, Checkpoint, PublicKey, SigningKey, Trust, public_key_path},
    audit::fingerprint::Fingerprinter,
    cli::{AuditCommand, DatabaseArgs, EventFilterArgs, JobsCommand, OutputArgs},
    config::{Config, redact_url},
    domain::job::{Job, UnixMillis},
    domain::request::parse_job_id,
    store::{EventQuery, JobQuery, Store},
};

mod output;

pub use output::{Format, RowWriter, TableRow};

/// Rows read per page while listing.
const PAGE: u32 = 1_000;

/// A job as the auditors' tools show it: everything but the token.
#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub job_id: String,
    pub tenant: String,
    pub client_id: String,
    pub state: &'static str,
    pub attempts: u32,
    pub created_at: String,
    pub updated_at: String,
    pub failure_reason: Option<&'static str>,
    pub last_http_status: Option<u16>,
    pub failure_detail: Option<String>,
    pub outcome_unknown: bool,
    pub code_fingerprint: Option<String>,
    pub idempotency_key: String,
    pub state_param: String,
}

impl From<&Job> for JobRow {
    fn from(job: &Job) -> Self {
        Self {
            job_id: job.id.to_string(),
            tenant: job.tenant.clone(),
            client_id: job.client_id.clone(),
            state: job.state.as_str(),
            attempts: job.attempts,
            created_at: rfc3339(job.created_at),
            updated_at: rfc3339(job.updated_at),
            failure_reason: job.failure_reason.map(|r| r.as_str()),
            last_http_status: job.last_http_status,
            failure_detail: job.failure_detail.clone(),
            outcome_unknown: job.outcome_unknown,
            code_fingerprint: job.code_fingerprint.clone(),
            idempotency_key: job.idempotency_key.clone(),
            state_param: job.state_param.clone(),
        }
    }
}

impl TableRow for JobRow {
    const COLUMNS: &'static [(&'static str, usize)] = &[
        ("JOB_ID", 36),
        ("CLIENT_ID", 20),
        ("STATE", 10),
        ("ATTEMPTS", 8),
        ("CREATED_AT", 24),
        ("REASON", 17),
        ("HTTP", 4),
        ("FINGERPRINT", 16),
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.job_id.clone(),
            self.client_id.clone(),
            self.state.to_string(),
            self.attempts.to_string(),
            self.created_at.clone(),
            self.failure_reason.unwrap_or("-").to_string(),
            self.last_http_status
                .map_or("-".to_string(), |s| s.to_string()),
            short(self.code_fingerprint.as_deref()),
        ]
    }
}

/// An audit event as exported: every stored field (so an export can be verified and parsed
/// back), plus the time in RFC 3339.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    /// Milliseconds since the Unix epoch, as stored and hashed.
    pub at: i64,
    pub time: String,
    pub job_id: String,
    pub tenant: String,
    pub client_id: String,
    pub kind: String,
    pub attempt: Option<u32>,
    pub http_status: Option<u16>,
    pub detail: Option<String>,
    pub code_fingerprint: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl From<&AuditRecord> for EventRow {
    fn from(record: &AuditRecord) -> Self {
        Self {
            seq: record.seq,
            at: record.at,
            time: rfc3339(record.at()),
            job_id: record.job_id.clone(),
            tenant: record.tenant.clone(),
            client_id: record.client_id.clone(),
            kind: record.kind.to_string(),
            attempt: record.attempt,
            http_status: record.http_status,
            detail: record.detail.clone(),
            code_fingerprint: record.code_fingerprint.clone(),
            prev_hash: record.prev_hash.clone(),
            hash: record.hash.clone(),
        }
    }
}

impl From<EventRow> for AuditRecord {
    fn from(row: EventRow) -> Self {
        Self {
            seq: row.seq,
            at: row.at,
            job_id: row.job_id,
            tenant: row.tenant,
            client_id: row.client_id,
            kind: row.kind.into(),
            attempt: row.attempt,
            http_status: row.http_status,
            detail: row.detail,
            code_fingerprint: row.code_fingerprint,
            prev_hash: row.prev_hash,
            hash: row.hash,
        }
    }
}

impl TableRow for EventRow {
    const COLUMNS: &'static [(&'static str, usize)] = &[
        ("SEQ", 8),
        ("TIME", 24),
        ("KIND", 19),
        ("JOB_ID", 36),
        ("CLIENT_ID", 20),
        ("ATTEMPT", 7),
        ("HTTP", 4),
        ("DETAIL", 0),
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.time.clone(),
            self.kind.clone(),
            self.job_id.clone(),
            self.client_id.clone(),
            self.attempt.map_or("-".to_string(), |a| a.to_string()),
            self.http_status.map_or("-".to_string(), |s| s.to_string()),
            self.detail.clone().unwrap_or_default(),
        ]
    }
}

fn short(value: Option<&str>) -> String {
    value.map_or("-".to_string(), |v| v.chars().take(16).collect())
}

/// A stored time as RFC 3339 with milliseconds, in UTC.
/// A stored time for people: RFC 3339, or the raw number when a damaged row holds one RFC 3339
/// cannot write.
pub fn rfc3339(at: UnixMillis) -> String {
    checkpoint::rfc3339_or_raw(at.0)
}

/// A signed checkpoint as listed: every signed field (so a listed line can be given back to
/// `audit verify --checkpoint`), plus the time in RFC 3339.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRow {
    pub seq: i64,
    pub hash: String,
    /// Milliseconds since the Unix epoch, as signed.
    pub at: i64,
    pub time: String,
    pub prev_signature: Option<String>,
    pub key_id: String,
    pub signature: String,
}

impl From<&Checkpoint> for CheckpointRow {
    fn from(checkpoint: &Checkpoint) -> Self {
        Self {
            seq: checkpoint.seq,
            hash: checkpoint.hash.clone(),
            at: checkpoint.at,
            time: rfc3339(UnixMillis(checkpoint.at)),
            prev_signature: checkpoint.prev_signature.clone(),
            key_id: checkpoint.key_id.clone(),
            signature: checkpoint.signature.clone(),
        }
    }
}

impl TableRow for CheckpointRow {
    const COLUMNS: &'static [(&'static str, usize)] = &[
        ("SEQ", 10),
        ("SIGNED_AT", 24),
        ("KEY_ID", 16),
        ("HASH", 16),
        ("SIGNATURE", 16),
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.time.clone(),
            self.key_id.clone(),
            short(Some(&self.hash)),
            short(Some(&self.signature)),
        ]
    }
}

/// What `audit verify` trusts beyond the database: the public key files, and the checkpoints
/// given inline or in files (lines that are not checkpoints are skipped; a file without any is
/// an error, as a wrong file would otherwise verify nothing).
fn trust(public_keys: &[PathBuf], inline: &[String], files: &[PathBuf]) -> anyhow::Result<Trust> {
    let keys = public_keys
        .iter()
        .map(|path| PublicKey::load(path))
        .collect::<Result<Vec<_>, _>>()?;
    let mut checkpoints = Vec::new();
    for (index, text) in inline.iter().enumerate() {
        let checkpoint = Checkpoint::from_line(text)
            .with_context(|| format!("--checkpoint #{} is not valid JSON", index + 1))?
            .with_context(|| format!("--checkpoint #{} is not a signed checkpoint", index + 1))?;
        checkpoints.push(checkpoint);
    }
    for path in files {
        let before = checkpoints.len();
        let skipped = read_checkpoints(path, &mut checkpoints)?;
        if skipped > 0 {
            eprintln!(
                "{}: skipped {skipped} damaged checkpoint line(s) (not JSON, or cut short)",
                path.display()
            );
        }
        if checkpoints.len() == before {
            anyhow::bail!(
                "{} holds no signed checkpoint (JSON lines with \"event\":\"{}\", or \
                 `audit checkpoints --format jsonl` output)",
                path.display(),
                checkpoint::LOG_EVENT
            );
        }
    }
    Ok(Trust { keys, checkpoints })
}

/// Longest line of a checkpoints file read whole; longer ones (no checkpoint is near it) are
/// skipped without being held in memory.
const MAX_LINE: usize = 64 * 1024;

/// Adds the checkpoints of a file of lines (a log of any size: read line by line, any bytes)
/// to `into`; returns how many lines that named a checkpoint could not be read as one.
fn read_checkpoints(path: &Path, into: &mut Vec<Checkpoint>) -> anyhow::Result<u64> {
    use std::io::{BufRead, Read};
    let file = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut line = Vec::new();
    let mut skipped = 0;
    loop {
        line.clear();
        let read = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 {
            return Ok(skipped);
        }
        if line.len() > MAX_LINE && !line.ends_with(b"\n") {
            // Skip the rest of an overlong line.
            let mut rest = Vec::new();
            loop {
                rest.clear();
                let more = (&mut reader)
                    .take(MAX_LINE as u64)
                    .read_until(b'\n', &mut rest)?;
                if more == 0 || rest.ends_with(b"\n") {
                    break;
                }
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        match Checkpoint::from_line(&text) {
            Ok(Some(checkpoint)) => into.push(checkpoint),
            Ok(None) => {}
            // A log holds other lines, some not JSON; one that names a checkpoint and does not
            // parse (a crash cut it short) is counted.
            Err(_) if text.contains(checkpoint::LOG_EVENT) => skipped += 1,
            Err(_) => {}
        }
    }
}

/// Where the command reads.
enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

/// The database the command reads: `--database` or `--database-url`, else the configuration's
/// `storage.url` or `storage.path`.
fn database(args: &DatabaseArgs) -> anyhow::Result<Database> {
    if let Some(url) = &args.database_url {
        return Ok(Database::Postgres(url.clone()));
    }
    if let Some(path) = &args.database {
        return Ok(Database::Sqlite(path.clone()));
    }
    let config = Config::load(args.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(match config.storage.url {
        Some(url) => Database::Postgres(url),
        None => Database::Sqlite(config.storage.path),
    })
}

/// Opens the database `args` name, read-only.
pub async fn open(args: &DatabaseArgs) -> anyhow::Result<Store> {
    match database(args)? {
        Database::Sqlite(path) => Store::open_read_only(&path)
            .await
            .with_context(|| format!("cannot open {} read-only", path.display())),
        Database::Postgres(url) => Store::open_read_only_url(&url)
            .await
            .with_context(|| format!("cannot open {} read-only", redact_url(&url))),
    }
}

fn writer(output: &OutputArgs) -> anyhow::Result<RowWriter<Box<dyn Write>>> {
    let out: Box<dyn Write> = match &output.output {
        Some(path) => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    Ok(RowWriter::new(output.format, out))
}

/// Runs `jobs list|get`.
pub async fn jobs(command: JobsCommand) -> anyhow::Result<()> {
    match command {
        JobsCommand::List {
            database,
            output,
            client_id,
            tenant,
            state,
            since,
            until,
            code_fingerprint,
            limit,
        } => {
            let store = open(&database).await?;
            let mut rows = writer(&output)?;
            let mut query = JobQuery {
                client_id,
                tenant,
                state: state.map(Into::into),
                code_fingerprint,
                created_after: since,
                created_before: until,
                after: None,
                limit: PAGE,
                ..JobQuery::default()
            };
            let mut written = 0u64;
            'pages: loop {
                let page = store.list_jobs(&query).await?;
                for (_, job) in &page.items {
                    if limit.is_some_and(|limit| written >= limit) {
                        break 'pages;
                    }
                    rows.write(&JobRow::from(job))?;
                    written += 1;
                }
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => break,
                }
            }
            rows.finish()?;
            Ok(())
        }
        JobsCommand::Get {
            database,
            output,
            job_id,
        } => {
            let id = parse_job_id(&job_id).map_err(|e| anyhow::anyhow!("{e}"))?;
            let store = open(&database).await?;
            let job = store
                .get(id)
                .await?
                .with_context(|| format!("no job {job_id}"))?;
            let mut rows = writer(&output)?;
            rows.write(&JobRow::from(&job))?;
            rows.finish()?;
            Ok(())
        }
    }
}

/// Runs `audit list|export|verify|fingerprint`. Returns whether the command's check passed
/// (verify fails when the chain is broken).
pub async fn audit(command: AuditCommand) -> anyhow::Result<bool> {
    match command {
        AuditCommand::List {
            database,
            output,
            filter,
            limit,
        } => export(database, output, filter, Some(limit)).await,
        AuditCommand::Export {
            database,
            output,
            filter,
            limit,
        } => export(database, output, filter, limit).await,
        AuditCommand::Verify {
            database,
            json,
            public_keys,
            checkpoints,
            checkpoint_files,
        } => {
            let trust = trust(&public_keys, &checkpoints, &checkpoint_files)?;
            let store = open(&database).await?;
            let report = store.verify_audit_log_with(&trust).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", report.detail);
                println!("events checked: {}", report.events_checked);
                println!("checkpoints checked: {}", report.checkpoints_checked);
            }
            Ok(report.ok)
        }
        AuditCommand::Checkpoints {
            database,
            output,
            since,
        } => {
            let store = open(&database).await?;
            let mut rows = writer(&output)?;
            let mut after = None;
            loop {
                let page = store.list_checkpoints(since, after, PAGE).await?;
                for (_, checkpoint) in &page.items {
                    rows.write(&CheckpointRow::from(checkpoint))?;
                }
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            rows.finish()?;
            Ok(true)
        }
        AuditCommand::Keygen { out } => {
            let key = SigningKey::generate(&out)?;
            println!("{}", key.public_key());
            eprintln!(
                "Wrote the signing key to {} (name it in audit.signing_key_file; keep it apart \
                 from the database) and its public key to {} (give it to the auditors).",
                out.display(),
                public_key_path(&out).display()
            );
            Ok(true)
        }
        AuditCommand::Fingerprint { database, key_file } => {
            let key_path = match key_file {
                Some(path) => path,
                None => {
                    let config = Config::load(database.config.as_deref())
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    // --database names the file whose neighbouring key to use.
                    let storage = database
                        .database
                        .clone()
                        .unwrap_or(config.storage.path.clone());
                    Config {
                        storage: crate::config::StorageConfig {
                            path: storage,
                            ..config.storage.clone()
                        },
                        ..config
                    }
                    .fingerprint_key_path()
                }
            };
            let fingerprinter = Fingerprinter::load(&key_path)?;
            let mut code = String::new();
            std::io::stdin()
                .read_line(&mut code)
                .context("cannot read the code from standard input")?;
            let code = code.trim();
            anyhow::ensure!(!code.is_empty(), "give the code on standard input");
            println!("{}", fingerprinter.fingerprint(code));
            Ok(true)
        }
    }
}

/// The fingerprint key: `key_file` when given, else the one beside `--database` or the
/// configuration's `audit.fingerprint_key_file`.
pub fn fingerprint_key_path(
    database: &DatabaseArgs,
    key_file: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if let Some(path) = key_file {
        return Ok(path);
    }
    let config = Config::load(database.config.as_deref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    // --database names the file whose neighbouring key to use.
    let storage = database
        .database
        .clone()
        .unwrap_or(config.storage.path.clone());
    Ok(Config {
        storage: crate::config::StorageConfig {
            path: storage,
            ..config.storage.clone()
        },
        ..config
    }
    .fingerprint_key_path())
}

async fn export(
    database: DatabaseArgs,
    output: OutputArgs,
    filter: EventFilterArgs,
    limit: Option<u64>,
) -> anyhow::Result<bool> {
    let store = open(&database).await?;
    let mut rows = writer(&output)?;
    let mut query = EventQuery {
        job_id: filter.job_id,
        client_id: filter.client_id,
        after: filter.since,
        before: filter.until,
        after_seq: filter.after_seq,
        limit: PAGE,
    };
    let mut written = 0u64;
    'pages: loop {
        let page = store.list_events(&query).await?;
        for record in &page.items {
            if limit.is_some_and(|limit| written >= limit) {
                break 'pages;
            }
            rows.write(&EventRow::from(record))?;
            written += 1;
        }
        match page.next {
            Some(next) => query.after_seq = Some(next),
            None => break,
        }
    }
    rows.finish()?;
    Ok(true)
}

/// For tests and tools: every event in an export, parsed back.
pub fn parse_export(format: Format, path: &Path) -> anyhow::Result<Vec<AuditRecord>> {
    let text = std::fs::read_to_string(path)?;
    let rows: Vec<EventRow> = match format {
        Format::Json => serde_json::from_str(&text)?,
        Format::Jsonl => text
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?,
        Format::Csv => csv::Reader::from_reader(text.as_bytes())
            .deserialize()
            .collect::<Result<_, _>>()?,
        Format::Table => anyhow::bail!("tables are for people, not for parsing"),
    };
    Ok(rows.into_iter().map(AuditRecord::from).collect())
}
