//! An analysis as a FHIR R4 `collection` Bundle: a DiagnosticReport, one Observation per output of
//! its result, and Devices for the model and the service that ran it. Pure: the same analysis
//! gives the same Bundle, ids included (they are derived from the analysis id), so a client that
//! reads it twice can de-duplicate. `docs/FHIR.md` has the mapping and the reasons for each code.

mod codes;
mod conclusion;
mod devices;
mod observations;
#[cfg(test)]
mod tests;

use crate::domain::analysis::Status;
use crate::domain::result::{
    CLASSIFICATION_SCHEMA, ClassificationResult, SLIDE_SCHEMA, SURVIVAL_SCHEMA, SlideResult,
    SurvivalResult,
};
use crate::http::analyses::{AnalysisView, ResultDocument};
use chrono::{DateTime, SecondsFormat, Utc};
use codes::{LOINC, coding, local};
use conclusion::{conclusion, conclusion_code};
use devices::{model_device, service_device, urn};
use observations::Output;
use serde_json::{Map, Value, json};

/// The Bundle for `view`; `base_url` is where the API is served (identifiers and links are under
/// it) and `service_version` the running onkos's version (its Device).
pub fn bundle(view: &AnalysisView, base_url: &str, service_version: &str) -> Value {
    let base = base_url.trim_end_matches('/');
    let service = service_device(base, service_version);
    let model = model_device(view, base, &service.0);
    let (outputs, pathology, read_error) = outputs(view);
    let (subject, specimen) = subject(view.subject.as_deref());
    let ctx = Context {
        view,
        base,
        subject,
        specimen,
        model_ref: json!({"reference": model.0}),
        performer: json!([{"display": format!("onkos {service_version}")}]),
        pathology,
    };
    let observations: Vec<(String, Value)> = outputs
        .iter()
        .map(|o| {
            (
                urn(view, &format!("observation/{}", o.key)),
                ctx.observation(o),
            )
        })
        .collect();
    let report = ctx.report(&observations, read_error);
    let entries = std::iter::once((urn(view, "report"), report))
        .chain(observations)
        .chain([model, service])
        .map(|(full_url, mut resource)| {
            resource["id"] = json!(full_url.trim_start_matches("urn:uuid:"));
            json!({"fullUrl": full_url, "resource": resource})
        })
        .collect::<Vec<_>>();
    json!({
        "resourceType": "Bundle",
        "id": view.id.to_string(),
        "type": "collection",
        "timestamp": instant(view.finished_at.unwrap_or(view.created_at)),
        "entry": entries,
    })
}

struct Context<'a> {
    view: &'a AnalysisView,
    base: &'a str,
    subject: Option<Value>,
    specimen: Option<Value>,
    model_ref: Value,
    performer: Value,
    pathology: bool,
}

impl Context<'_> {
    fn observation(&self, o: &Output) -> Value {
        let view = self.view;
        let mut r = Map::new();
        r.insert("resourceType".into(), json!("Observation"));
        r.insert("status".into(), json!("final"));
        r.insert(
            "category".into(),
            codes::observation_categories(self.pathology),
        );
        r.insert("code".into(), o.code.clone());
        self.common(&mut r);
        r.insert("performer".into(), self.performer.clone());
        if let Some((key, value)) = &o.value {
            r.insert((*key).into(), value.clone());
        }
        if let Some(i) = &o.interpretation {
            r.insert("interpretation".into(), i.clone());
        }
        let m = &view.model;
        let mut notes = o.notes.clone();
        notes.push(format!(
            "Computed by the model {} {} (ONNX sha256 {}) from the input with sha256 {}.",
            m.name, m.version, m.sha256, view.input_sha256
        ));
        r.insert(
            "note".into(),
            notes
                .into_iter()
                .map(|text| json!({"text": text}))
                .collect(),
        );
        r.insert(
            "method".into(),
            json!({"text": format!("onkos model {} {}", m.name, m.version)}),
        );
        r.insert("device".into(), self.model_ref.clone());
        if !o.derived_from.is_empty() {
            let refs = o
                .derived_from
                .iter()
                .map(|key| json!({"reference": urn(view, &format!("observation/{key}"))}));
            r.insert("derivedFrom".into(), refs.collect());
        }
        if !o.components.is_empty() {
            r.insert("component".into(), json!(o.components));
        }
        Value::Object(r)
    }

    /// subject/specimen, effective and issued times: the same on the report and every Observation.
    fn common(&self, r: &mut Map<String, Value>) {
        if let Some(s) = &self.subject {
            r.insert("subject".into(), s.clone());
        }
        // The time of the input the analysis was asked about: its submission.
        r.insert(
            "effectiveDateTime".into(),
            json!(instant(self.view.created_at)),
        );
        if let Some(at) = self.view.finished_at {
            r.insert("issued".into(), json!(instant(at)));
        }
        if let Some(s) = &self.specimen {
            // One specimen on an Observation, a list of them on a report.
            let many = r
                .get("resourceType")
                .is_some_and(|t| t == "DiagnosticReport");
            r.insert("specimen".into(), if many { json!([s]) } else { s.clone() });
        }
    }

    fn report(&self, observations: &[(String, Value)], read_error: Option<String>) -> Value {
        let view = self.view;
        let mut r = Map::new();
        r.insert("resourceType".into(), json!("DiagnosticReport"));
        r.insert(
            "identifier".into(),
            json!([{"system": format!("{}/v1/analyses", self.base), "value": view.id.to_string()}]),
        );
        r.insert("status".into(), json!(report_status(view.status)));
        r.insert("category".into(), codes::report_categories(self.pathology));
        let mut code = vec![local("model-analysis")];
        if self.pathology {
            // A model's reading of a pathology image is a pathology study; survival estimates
            // from clinical covariates are not, and keep the local code alone.
            code.push(coding(LOINC, "11526-1", "Pathology study"));
        }
        r.insert(
            "code".into(),
            json!({"coding": code, "text": format!("onkos analysis by {} {}", view.model.name, view.model.version)}),
        );
        self.common(&mut r);
        r.insert("performer".into(), self.performer.clone());
        if !observations.is_empty() {
            let refs = observations.iter().map(|(u, _)| json!({"reference": u}));
            r.insert("result".into(), refs.collect());
        }
        r.insert("conclusion".into(), json!(conclusion(view, read_error)));
        if let Some(code) = conclusion_code(view) {
            r.insert("conclusionCode".into(), json!([code]));
        }
        Value::Object(r)
    }
}

/// The Observations of a stored result, whether it comes from pathology material, and why a
/// result that is present could not be read (a schema this build does not know).
fn outputs(view: &AnalysisView) -> (Vec<Output>, bool, Option<String>) {
    // Only a succeeded analysis has outputs to report, whatever else is stored.
    let tree = view.result.as_ref().map(ResultDocument::tree);
    let Some(result) = tree.as_deref().filter(|_| view.status == Status::Succeeded) else {
        return (Vec::new(), false, None);
    };
    let schema = result.get("schema").and_then(Value::as_str).unwrap_or("");
    let read = match schema {
        CLASSIFICATION_SCHEMA => serde_json::from_value::<ClassificationResult>(result.clone())
            .map(|r| (observations::classification(&r), true)),
        SURVIVAL_SCHEMA => serde_json::from_value::<SurvivalResult>(result.clone())
            .map(|r| (observations::survival(&r), false)),
        SLIDE_SCHEMA => serde_json::from_value::<SlideResult>(result.clone())
            .map(|r| (observations::slide(&r), true)),
        other => {
            return (
                Vec::new(),
                false,
                Some(format!(
                    "a result of schema {other:?} has no FHIR rendering"
                )),
            );
        }
    };
    match read {
        Ok((outputs, pathology)) => (outputs, pathology, None),
        Err(e) => (
            Vec::new(),
            false,
            Some(format!("the stored result could not be read: {e}")),
        ),
    }
}

/// FHIR's report status for an analysis status. A failed or cancelled analysis was not completed
/// and has no result: `cancelled` ("not started or not completed"), not `entered-in-error`, which
/// is for a released report withdrawn as a mistake.
fn report_status(status: Status) -> &'static str {
    match status {
        Status::Queued | Status::Running => "registered",
        Status::Succeeded => "final",
        Status::Failed | Status::Cancelled => "cancelled",
    }
}

/// `Patient/…` and `Group/…` (relative or absolute) are literal references to the subject and
/// `Specimen/…` to the specimen; anything else is the caller's opaque identifier (an accession
/// number, a specimen label) in a logical reference.
fn subject(raw: Option<&str>) -> (Option<Value>, Option<Value>) {
    let Some(raw) = raw.map(str::trim).filter(|s| !s.is_empty()) else {
        return (None, None);
    };
    let absolute = raw.starts_with("https://") || raw.starts_with("http://");
    let mut parts = raw.rsplit('/');
    let (id, kind) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    // Relative: exactly `Type/id`; absolute: `…/Type/id`.
    if (absolute || parts.next().is_none()) && is_fhir_id(id) {
        match kind {
            "Patient" | "Group" => return (Some(json!({"reference": raw})), None),
            "Specimen" => return (None, Some(json!({"reference": raw}))),
            _ => {}
        }
    }
    (Some(json!({"identifier": {"value": raw}})), None)
}

fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// FHIR `instant`/`dateTime`: always with a zone, milliseconds at most.
fn instant(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}
