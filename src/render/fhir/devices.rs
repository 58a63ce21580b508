//! The Devices (the model that ran, the service that ran it) and the derived UUIDs every entry of
//! a Bundle is named by.

use super::codes::{ONNX_SHA256, local_concept};
use crate::http::analyses::AnalysisView;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The onkos service, parent of the model Devices; one per base URL and version.
pub fn service_device(base: &str, version: &str) -> (String, Value) {
    let url = format!("urn:uuid:{}", derived(&["service", base, version]));
    let device = json!({
        "resourceType": "Device",
        "deviceName": [{"name": "onkos", "type": "user-friendly-name"}],
        "type": local_concept("inference-service", "onkos inference service"),
        "version": [{"value": version}],
        "url": base,
    });
    (url, device)
}

/// The model that ran, identified by the sha256 of its ONNX file; one per model file, so Bundles
/// of different analyses by the same model share it.
pub fn model_device(view: &AnalysisView, base: &str, service: &str) -> (String, Value) {
    let m = &view.model;
    let url = format!(
        "urn:uuid:{}",
        derived(&["model", base, &m.name, &m.version, &m.sha256])
    );
    let device = json!({
        "resourceType": "Device",
        "identifier": [{"system": ONNX_SHA256, "value": m.sha256}],
        "deviceName": [{"name": m.name, "type": "model-name"}],
        "type": local_concept("ai-model", "AI model (ONNX)"),
        "version": [{"value": m.version}],
        "url": format!("{base}/v1/models/{}/versions/{}", m.name, m.version),
        "note": [{"text": view.intended_use}],
        "parent": {"reference": service},
    });
    (url, device)
}

/// A `urn:uuid:` for one resource of this analysis's Bundle.
pub fn urn(view: &AnalysisView, what: &str) -> String {
    format!(
        "urn:uuid:{}",
        derived(&["analysis", &view.id.to_string(), what])
    )
}

/// A UUID (version 8, RFC 9562's vendor-specific layout) from the SHA-256 of `parts`: stable,
/// and unlike v5 needs no SHA-1.
fn derived(parts: &[&str]) -> uuid::Uuid {
    let mut hash = Sha256::new();
    hash.update(b"onkos.fhir");
    for part in parts {
        hash.update([0u8]);
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}
