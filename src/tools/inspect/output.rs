//! Output formats for the auditors' command line: an aligned table for people, JSON, JSON
//! Lines and CSV for tools. Rows are written as they come, so an export of any size runs in
//! constant memory.

use std::io::Write;

use serde::Serialize;

pub use crate::cli::Format;

/// A row that can also be shown as a table line.
pub trait TableRow {
    /// Column names and widths.
    const COLUMNS: &'static [(&'static str, usize)];
    fn cells(&self) -> Vec<String>;
}

/// Writes rows in one format.
pub struct RowWriter<W: Write> {
    format: Format,
    out: Option<W>,
    csv: Option<csv::Writer<W>>,
    rows: u64,
}

impl<W: Write> RowWriter<W> {
    pub fn new(format: Format, out: W) -> Self {
        match format {
            Format::Csv => Self {
                format,
                out: None,
                csv: Some(csv::Writer::from_writer(out)),
                rows: 0,
            },
            _ => Self {
                format,
                out: Some(out),
                csv: None,
                rows: 0,
            },
        }
    }

    pub fn write<T: Serialize + TableRow>(&mut self, row: &T) -> anyhow::Result<()> {
        if let Some(csv) = &mut self.csv {
            csv.serialize(row)?;
            self.rows += 1;
            return Ok(());
        }
        let out = self.out.as_mut().expect("a plain writer");
        match self.format {
            Format::Table => {
                if self.rows == 0 {
                    let header: Vec<String> = T::COLUMNS
                        .iter()
                        .map(|(name, width)| format!("{name:<width$}"))
                        .collect();
                    writeln!(out, "{}", header.join("  ").trim_end())?;
                }
                let cells: Vec<String> = row
                    .cells()
                    .into_iter()
                    .zip(T::COLUMNS)
                    .map(|(cell, (_, width))| format!("{cell:<width$}"))
                    .collect();
                writeln!(out, "{}", cells.join("  ").trim_end())?;
            }
            Format::Json => {
                out.write_all(if self.rows == 0 { b"[\n" } else { b",\n" })?;
                serde_json::to_writer(&mut *out, row)?;
            }
            Format::Jsonl => {
                serde_json::to_writer(&mut *out, row)?;
                out.write_all(b"\n")?;
            }
            Format::Csv => unreachable!("handled above"),
        }
        self.rows += 1;
        Ok(())
    }

    /// Pushes the rows written so far to the output (the console sends an export page by
    /// page).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        match (&mut self.csv, &mut self.out) {
            (Some(csv), _) => csv.flush()?,
            (None, Some(out)) => out.flush()?,
            (None, None) => {}
        }
        Ok(())
    }

    /// Closes the output (the JSON array, the CSV buffer) and returns the number of rows.
    pub fn finish(mut self) -> anyhow::Result<u64> {
        if let Some(mut csv) = self.csv.take() {
            csv.flush()?;
            return Ok(self.rows);
        }
        let out = self.out.as_mut().expect("a plain writer");
        if self.format == Format::Json {
            out.write_all(if self.rows == 0 { b"[]\n" } else { b"\n]\n" })?;
        }
        out.flush()?;
        Ok(self.rows)
    }
}
