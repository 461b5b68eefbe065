//! Exports of a search as CSV or JSON Lines: the same rows as `jobs list --format csv|jsonl`
//! (the inspect tool's [`JobRow`] and [`RowWriter`]), paged through the whole result in
//! creation order and sent page by page, so an export of any size runs in constant memory.
//!
//! One difference: in the console's CSV, a cell that a spreadsheet would run as a formula
//! (it starts with `=`, `+`, `-`, `@`, a tab or a carriage return: client ids, idempotency
//! keys, OAuth states and failure details come from callers) is prefixed with `'`, so an
//! auditor who opens the file sees the text instead of running it.

use std::{
    io::{self, Write},
    sync::Arc,
};

use bytes::Bytes;
use hyper::body::Frame;
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::search::Search;
use crate::{
    domain::job::Job,
    store::{Page, Store, StoreError},
    tools::inspect::{Format, JobRow, RowWriter},
};

/// Jobs read per page.
const PAGE: u32 = 1_000;

/// A chunk of the body, or the error that cuts it short (the client sees an incomplete
/// download rather than a silently truncated file).
pub type Chunk = Result<Frame<Bytes>, io::Error>;

/// A buffer the row writer fills and the sender empties after every page.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A job's row in `format`: in CSV, with every text cell a caller could choose defused.
fn row_of(job: &Job, format: Format) -> JobRow {
    let mut row = JobRow::from(job);
    if matches!(format, Format::Csv) {
        for cell in [
            &mut row.tenant,
            &mut row.client_id,
            &mut row.idempotency_key,
            &mut row.state_param,
        ] {
            defuse(cell);
        }
        if let Some(detail) = &mut row.failure_detail {
            defuse(detail);
        }
    }
    row
}

/// Prefixes `cell` with `'` when a spreadsheet would read it as a formula (OWASP's advice
/// for CSV injection).
fn defuse(cell: &mut String) {
    if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        cell.insert(0, '\'');
    }
}

/// The first page of `search`, read before the response starts, so a database that does not
/// answer gets a 503 page instead of an empty download.
pub async fn first_page(store: &Store, search: &Search) -> Result<Page<(i64, Job)>, StoreError> {
    store.list_jobs(&search.job_query(None, PAGE, false)).await
}

/// Sends `first` and every later page of `search` to `chunks` in `format`, until the last
/// page or until the client goes away.
pub async fn send_rows(
    store: Store,
    search: Search,
    format: Format,
    first: Page<(i64, Job)>,
    chunks: mpsc::Sender<Chunk>,
) {
    let buffer = Shared::default();
    let mut rows = RowWriter::new(format, buffer.clone());
    let mut page = first;
    loop {
        let written = page
            .items
            .iter()
            .try_for_each(|(_, job)| rows.write(&row_of(job, format)))
            .and_then(|()| rows.flush());
        if let Err(error) = written {
            tracing::warn!(%error, "console: cannot write an export");
            let _ = chunks.send(Err(io::Error::other("export failed"))).await;
            return;
        }
        let bytes = std::mem::take(&mut *buffer.0.lock());
        if !bytes.is_empty()
            && chunks
                .send(Ok(Frame::data(Bytes::from(bytes))))
                .await
                .is_err()
        {
            // The client went away.
            return;
        }
        let Some(next) = page.next else {
            break;
        };
        page = match store
            .list_jobs(&search.job_query(Some(next), PAGE, false))
            .await
        {
            Ok(page) => page,
            Err(error) => {
                tracing::warn!(%error, "console: the database stopped answering during an export");
                let _ = chunks.send(Err(io::Error::other("export failed"))).await;
                return;
            }
        };
    }
    if let Err(error) = rows.finish() {
        tracing::warn!(%error, "console: cannot finish an export");
        return;
    }
    let bytes = std::mem::take(&mut *buffer.0.lock());
    if !bytes.is_empty() {
        let _ = chunks.send(Ok(Frame::data(Bytes::from(bytes)))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_a_spreadsheet_would_run_is_prefixed_and_others_are_kept() {
        for (given, written) in [
            (
                "=HYPERLINK(\"http://evil.example\")",
                "'=HYPERLINK(\"http://evil.example\")",
            ),
            ("+1+1", "'+1+1"),
            ("-2+3", "'-2+3"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\t=1", "'\t=1"),
            ("\r=1", "'\r=1"),
            ("state-1=2", "state-1=2"),
            ("shop-app", "shop-app"),
            ("", ""),
        ] {
            let mut cell = given.to_string();
            defuse(&mut cell);
            assert_eq!(cell, written, "{given:?}");
        }
    }
}
