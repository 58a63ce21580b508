//! A batch of cases as CSV (`POST /v1/analyses?model=…` with `Content-Type: text/csv`): a header
//! row of feature names, an optional `subject` column, one case per row, each checked against the
//! model's contract. No I/O: the bytes are already in memory.

use super::contract::{FieldError, Manifest, ValidFeatures};
use serde_json::{Map, Value, json};

/// The longest subject (a caller's case reference) accepted, in characters.
const MAX_SUBJECT: usize = 256;
/// A CSV with many broken rows lists this many errors, not thousands.
const MAX_REPORTED_ERRORS: usize = 100;
/// The column that carries each row's subject rather than a feature.
const SUBJECT_COLUMN: &str = "subject";

/// Why a batch was refused as a whole.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchError {
    /// Not readable as CSV at all (the header row): a bad request.
    Unreadable(String),
    /// Readable, but rows break the contract: every error, with its row and column.
    Invalid(Vec<FieldError>),
}

/// A subject as given, when it is short enough and has no control characters.
pub fn check_subject(s: &str) -> Result<&str, FieldError> {
    if s.chars().count() > MAX_SUBJECT {
        return Err(FieldError::new(
            "subject",
            "too_long",
            format!("subject is longer than {MAX_SUBJECT} characters"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(FieldError::new(
            "subject",
            "control_character",
            "subject must not contain control characters",
        ));
    }
    Ok(s)
}

/// The rows of a CSV batch (a header row of feature names, an optional `subject` column), each
/// checked against `manifest`: all of them, or every error with its row and column.
pub fn csv_rows(
    manifest: &Manifest,
    bytes: &[u8],
) -> Result<Vec<(ValidFeatures, Option<String>)>, BatchError> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| BatchError::Unreadable(format!("the CSV header row is unreadable: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut errors = Vec::new();
    let mut valid_rows = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let row = index + 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                errors.push(FieldError::new(
                    format!("rows[{row}]"),
                    "unreadable",
                    format!("row {row}: {e}"),
                ));
                continue;
            }
        };
        let mut features = Map::new();
        let mut subject = None;
        for (name, cell) in header.iter().zip(record.iter()) {
            if name == SUBJECT_COLUMN {
                subject = (!cell.is_empty()).then(|| cell.to_owned());
            } else if !cell.is_empty() {
                features.insert(
                    name.clone(),
                    cell_value(cell, manifest.is_categorical(name)),
                );
            }
        }
        let subject = match subject.as_deref().map(check_subject).transpose() {
            Ok(s) => s.map(str::to_owned),
            Err(e) => {
                errors.push(row_error(row, e));
                None
            }
        };
        match manifest.validate_features(&features) {
            Ok(valid) => valid_rows.push((valid, subject)),
            Err(row_errors) => errors.extend(row_errors.into_iter().map(|e| row_error(row, e))),
        }
    }
    if valid_rows.is_empty() && errors.is_empty() {
        errors.push(FieldError::new(
            "rows",
            "empty",
            "the CSV has a header but no data rows",
        ));
    }
    if !errors.is_empty() {
        errors.truncate(MAX_REPORTED_ERRORS);
        return Err(BatchError::Invalid(errors));
    }
    Ok(valid_rows)
}

/// A CSV cell as the JSON value a caller would have sent: a categorical level stays text; otherwise a
/// number when it reads as a finite one, else the text (which the contract then refuses, by name).
fn cell_value(cell: &str, categorical: bool) -> Value {
    match cell.parse::<f64>() {
        Ok(v) if v.is_finite() && !categorical => json!(v),
        _ => Value::String(cell.to_owned()),
    }
}

fn row_error(row: usize, e: FieldError) -> FieldError {
    let column = e
        .field
        .strip_prefix("features.")
        .unwrap_or(&e.field)
        .to_owned();
    FieldError::new(
        format!("rows[{row}].{column}"),
        e.rule,
        format!("row {row}, column {column}: {}", e.message),
    )
}
