//! Provenance: what produced a result, as a record with a digest, chained per tenant so that
//! changing any stored result (or its record, or removing one) breaks every later link.
//!
//! Digests are sha256, in lowercase hex, over the record's canonical JSON: keys sorted, no
//! whitespace, numbers as serde_json writes them. The chain digest of a result is
//! `sha256(previous_chain_sha256 ++ record_sha256)` over the two hex strings; the first result of a
//! tenant chains to [`GENESIS`].
//!
//! A record is written in the transaction that stores its result, and linked into the chain
//! after commit by a sealer (`jobs::sealer`); until then it has no position and is checked alone
//! ([`check_record`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// The chain digest before a tenant's first result.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The version of the code that produced a result: `git describe` at build time.
pub const CODE_VERSION: &str = env!("BUILD_CODE_VERSION");

/// Everything that determined one result. The fields are declared in key order, so serde writes
/// a record as its canonical JSON directly ([`ProvenanceRecord::canonical_text`]; a test holds it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProvenanceRecord {
    pub analysis_id: Uuid,
    /// `git describe` of the onkos build that ran it.
    pub code_version: String,
    /// The ONNX Runtime execution provider that ran it.
    pub execution_provider: String,
    /// sha256 of the canonical input (as `input_sha256` on the analysis).
    pub input_sha256: String,
    /// sha256 of the model's manifest as registered.
    pub manifest_sha256: String,
    pub model_name: String,
    /// sha256 of the ONNX file that ran.
    pub model_sha256: String,
    pub model_version: String,
    /// sha256 of the stored result document's canonical JSON.
    pub result_sha256: String,
    pub tenant: String,
}

impl ProvenanceRecord {
    pub fn digest(&self) -> String {
        sha256_hex(self.canonical_text().get().as_bytes())
    }

    /// The record as its canonical JSON text: what is stored, and what its digest is taken over.
    /// Every field is a string, so no number needs rewriting.
    pub fn canonical_text(&self) -> Box<RawValue> {
        serde_json::value::to_raw_value(self).unwrap_or_else(|_| unreachable!("strings only"))
    }
}

/// The canonical JSON of a document: serde_json's `Value` keeps object keys sorted (the crate is
/// built without `preserve_order`), `to_vec` writes no whitespace, and numbers are written as a
/// document stored in Postgres reads back: -0.0 as 0.0 (Postgres numbers have no negative zero),
/// and whole floats from 1e16 that fit a 64-bit integer as that integer (serde_json writes them
/// `1e+16`, Postgres `10000000000000000`, which serde_json reads back as an integer).
pub fn canonical_json(value: &Value) -> Vec<u8> {
    if has_rewritten(value) {
        let mut value = value.clone();
        rewrite_numbers(&mut value);
        return serde_json::to_vec(&value).unwrap_or_default();
    }
    serde_json::to_vec(value).unwrap_or_default()
}

/// What a float becomes after a trip through Postgres, when that differs from how it is written.
fn rewritten(n: &serde_json::Number) -> Option<Value> {
    let f = n.as_f64().filter(|_| n.is_f64())?;
    if f == 0.0 && f.is_sign_negative() {
        return Some(Value::from(0.0));
    }
    // From 1e16 serde_json writes an exponent; every float that large is whole.
    if (1e16..18_446_744_073_709_551_616.0).contains(&f) {
        return Some(Value::from(f as u64));
    }
    if (-9_223_372_036_854_775_808.0..=-1e16).contains(&f) {
        return Some(Value::from(f as i64));
    }
    None
}

fn has_rewritten(value: &Value) -> bool {
    match value {
        Value::Number(n) => rewritten(n).is_some(),
        Value::Array(items) => items.iter().any(has_rewritten),
        Value::Object(map) => map.values().any(has_rewritten),
        _ => false,
    }
}

fn rewrite_numbers(value: &mut Value) {
    match value {
        Value::Number(n) => {
            if let Some(v) = rewritten(n) {
                *value = v;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(rewrite_numbers),
        Value::Object(map) => map.values_mut().for_each(rewrite_numbers),
        _ => {}
    }
}

/// A document as its canonical JSON text: the form a result is stored, digested and answered in,
/// written once.
pub fn canonical_text(value: &Value) -> Box<RawValue> {
    // Writing a `Value` cannot fail (its keys are strings): the default is never taken. The text is
    // taken as serde_json wrote it, not parsed again (`RawValue::from_string` would).
    let written = if has_rewritten(value) {
        let mut value = value.clone();
        rewrite_numbers(&mut value);
        serde_json::value::to_raw_value(&value)
    } else {
        serde_json::value::to_raw_value(value)
    };
    written.unwrap_or_default()
}

/// The digest of a result document already written as its canonical text ([`canonical_text`]):
/// the same as [`result_digest`] of its tree, without writing it again.
pub fn text_digest(text: &RawValue) -> String {
    sha256_hex(text.get().as_bytes())
}

/// The digest of a result document.
pub fn result_digest(result: &Value) -> String {
    sha256_hex(&canonical_json(result))
}

/// The chain digest of a record that follows `previous`.
pub fn chain(previous: &str, record_sha256: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(previous.as_bytes());
    hasher.update(record_sha256.as_bytes());
    hex::encode(hasher.finalize())
}

/// One stored link, with what is stored now for its analysis.
#[derive(Debug)]
pub struct StoredLink<'a> {
    /// Position, previous and chain digests: `None` until the sealer links the record.
    pub seq: Option<i64>,
    pub record: &'a Value,
    pub record_sha256: &'a str,
    pub previous_sha256: Option<&'a str>,
    pub chain_sha256: Option<&'a str>,
    /// The analysis's input digest now; `None` when the analysis is gone.
    pub input_sha256: Option<&'a str>,
    /// The stored result now; `None` when it is gone.
    pub result: Option<&'a Value>,
}

/// Checks one link against the link before it: the record still describes what is stored, its
/// digests are what they claim, and it follows `previous` at position `seq`. The reason names the
/// first thing that does not hold.
pub fn check(previous: &str, seq: i64, link: &StoredLink) -> Result<(), String> {
    let Some(found) = link.seq else {
        return Err(format!(
            "a record not yet sealed found where link {seq} was expected"
        ));
    };
    if found != seq {
        return Err(format!(
            "link {found} found where link {seq} was expected: a link is missing"
        ));
    }
    if link.previous_sha256 != Some(previous) {
        return Err("does not follow the link before it (previous digest differs)".into());
    }
    if link.chain_sha256 != Some(chain(previous, link.record_sha256).as_str()) {
        return Err("the chain digest was changed".into());
    }
    check_record(link)
}

/// Checks a record on its own, sealed into the chain or not yet: it still describes what is
/// stored, and its digest is what it claims.
pub fn check_record(link: &StoredLink) -> Result<(), String> {
    let record: ProvenanceRecord = serde_json::from_value(link.record.clone())
        .map_err(|e| format!("the stored record is not a provenance record: {e}"))?;
    if record.digest() != link.record_sha256 {
        return Err("the stored record was changed (its digest differs)".into());
    }
    match link.input_sha256 {
        None => return Err("the analysis was deleted".into()),
        Some(input) if input != record.input_sha256 => {
            return Err("the analysis's input digest was changed".into());
        }
        Some(_) => {}
    }
    match link.result {
        None => Err("the result was deleted".into()),
        Some(result) if result_digest(result) != record.result_sha256 => {
            Err("the stored result was changed after it was recorded".into())
        }
        Some(_) => Ok(()),
    }
}

/// sha256 in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record() -> ProvenanceRecord {
        ProvenanceRecord {
            analysis_id: Uuid::nil(),
            tenant: "t".into(),
            input_sha256: "a".repeat(64),
            model_name: "m".into(),
            model_version: "1".into(),
            model_sha256: "b".repeat(64),
            manifest_sha256: "c".repeat(64),
            code_version: "v".into(),
            execution_provider: "CPUExecutionProvider".into(),
            result_sha256: result_digest(&json!({"b": 1, "a": [0.5, "x"]})),
        }
    }

    #[test]
    fn a_record_is_written_as_its_canonical_json() {
        let record = record();
        let canonical = canonical_json(&serde_json::to_value(&record).expect("a record"));
        assert_eq!(
            record.canonical_text().get().as_bytes(),
            canonical.as_slice()
        );
        assert_eq!(record.digest(), sha256_hex(&canonical));
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let value = json!({"z": {"b": 1, "a": 2}, "a": [ {"d": 1, "c": 2} ]});
        assert_eq!(
            String::from_utf8(canonical_json(&value)).unwrap_or_default(),
            r#"{"a":[{"c":2,"d":1}],"z":{"a":2,"b":1}}"#
        );
    }

    #[test]
    fn a_result_read_back_from_text_has_the_same_digest() {
        let result = json!({"probability": 0.30000000000000004, "tiny": 1e-7, "big": 1e20, "n": 3});
        let reread: Value = serde_json::from_str(
            r#"{"n": 3, "big": 100000000000000000000, "tiny": 0.0000001, "probability": 0.30000000000000004}"#,
        )
        .unwrap_or_default();
        assert_eq!(result_digest(&result), result_digest(&reread));
    }

    #[test]
    fn large_floats_digest_like_the_numbers_postgres_reads_back() {
        let written =
            json!({"n": -0.0, "q": 1e15, "v": 1e16, "w": -2e18, "x": 1.5e17, "y": 1e20, "z": 12.5});
        assert!(
            serde_json::to_string(&written)
                .expect("text")
                .contains("1e+16")
        );
        // What Postgres 15 answers for that document stored as jsonb (`select $1::jsonb::text`).
        let reread: Value = serde_json::from_str(
            r#"{"n": 0.0, "q": 1000000000000000.0, "v": 10000000000000000, "w": -2000000000000000000, "x": 150000000000000000, "y": 100000000000000000000, "z": 12.5}"#,
        )
        .expect("Postgres's text");
        assert_eq!(canonical_json(&written), canonical_json(&reread));
        assert_eq!(result_digest(&written), result_digest(&reread));
    }

    #[test]
    fn negative_zero_digests_like_the_zero_postgres_reads_back() {
        let written = json!({"contribution": -0.0, "rows": [{"v": -0.0}], "x": 1.5});
        let reread = json!({"contribution": 0.0, "rows": [{"v": 0.0}], "x": 1.5});
        assert_eq!(result_digest(&written), result_digest(&reread));
        assert_ne!(
            result_digest(&written),
            result_digest(&json!({"contribution": 0.0}))
        );
    }

    #[test]
    fn the_text_a_result_is_stored_as_is_its_canonical_json() {
        let written = json!({"z": -0.0, "a": {"y": [1.5, "é\n"], "b": null}});
        let text = canonical_text(&written);
        assert_eq!(text.get(), r#"{"a":{"b":null,"y":[1.5,"é\n"]},"z":0.0}"#);
        assert_eq!(text.get().as_bytes(), canonical_json(&written));
        assert_eq!(sha256_hex(text.get().as_bytes()), result_digest(&written));
    }

    #[test]
    fn every_field_changes_the_record_digest() {
        let base = record();
        let mut changed = base.clone();
        changed.execution_provider = "CUDAExecutionProvider".into();
        assert_ne!(base.digest(), changed.digest());
        let mut changed = base.clone();
        changed.result_sha256 = result_digest(&json!({"b": 2, "a": [0.5, "x"]}));
        assert_ne!(base.digest(), changed.digest());
    }

    #[test]
    fn check_accepts_an_intact_link_and_names_a_changed_result() {
        let record = record();
        let stored = serde_json::to_value(&record).unwrap_or_default();
        let digest = record.digest();
        let result = json!({"b": 1, "a": [0.5, "x"]});
        let chained = chain(GENESIS, &digest);
        let mut link = StoredLink {
            seq: Some(1),
            record: &stored,
            record_sha256: &digest,
            previous_sha256: Some(GENESIS),
            chain_sha256: Some(&chained),
            input_sha256: Some(&record.input_sha256),
            result: Some(&result),
        };
        assert_eq!(check(GENESIS, 1, &link), Ok(()));
        assert!(check(GENESIS, 2, &link).is_err_and(|e| e.contains("missing")));
        let tampered = json!({"b": 1, "a": [0.6, "x"]});
        link.result = Some(&tampered);
        assert!(check(GENESIS, 1, &link).is_err_and(|e| e.contains("result was changed")));
        assert!(check_record(&link).is_err_and(|e| e.contains("result was changed")));
        // Not yet sealed: the record is checked alone, and it is no link of the chain.
        link.result = Some(&result);
        link.seq = None;
        link.previous_sha256 = None;
        link.chain_sha256 = None;
        assert_eq!(check_record(&link), Ok(()));
        assert!(check(GENESIS, 1, &link).is_err_and(|e| e.contains("not yet sealed")));
    }

    #[test]
    fn chain_depends_on_order() {
        let (a, b) = ("1".repeat(64), "2".repeat(64));
        let ab = chain(&chain(GENESIS, &a), &b);
        let ba = chain(&chain(GENESIS, &b), &a);
        assert_ne!(ab, ba);
        assert_eq!(ab.len(), 64);
    }
}
