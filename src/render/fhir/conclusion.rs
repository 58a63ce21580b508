//! The report's conclusion: what the result found, in words, with the caveat and the model's
//! intended use; and the decision as a coded conclusion.

use super::codes;
use crate::domain::analysis::Status;
use crate::http::analyses::{AnalysisView, ResultDocument};
use serde_json::Value;

/// The caveat every report carries, whatever the model's card says besides.
const CAVEAT: &str = "Research use only, not a medical device.";

pub fn conclusion(view: &AnalysisView, read_error: Option<String>) -> String {
    let result = view.result.as_ref().map(ResultDocument::tree);
    let said = match (view.status, result.as_deref()) {
        (Status::Queued, _) => "The analysis is queued; there is no result yet.".to_owned(),
        (Status::Running, _) => "The analysis is running; there is no result yet.".to_owned(),
        (Status::Cancelled, _) => "The analysis was cancelled before it had a result.".to_owned(),
        (Status::Failed, _) => format!(
            "The analysis failed and has no result: {}",
            view.error.as_deref().unwrap_or("no reason was recorded.")
        ),
        (Status::Succeeded, Some(result)) => match read_error {
            Some(e) => format!("The analysis succeeded, but {e}."),
            None => summary(result) + &extrapolation(result),
        },
        (Status::Succeeded, None) => "The analysis succeeded without a stored result.".to_owned(),
    };
    // The error is a person's sentence that may lack its full stop.
    let said = if said.ends_with(['.', '!', '?']) {
        said
    } else {
        said + "."
    };
    let intended = view.intended_use.trim();
    if intended
        .to_ascii_lowercase()
        .contains("not a medical device")
    {
        format!("{said} {intended}")
    } else {
        format!("{said} {CAVEAT} {intended}").trim_end().to_owned()
    }
}

/// One or two sentences saying what the result found.
fn summary(result: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    if let Some(d) = result.get("decision") {
        let label = d["label"].as_str().unwrap_or("?");
        let positive = d["positive_label"].as_str().unwrap_or("?");
        let (p, t) = (f(&d["probability"]), f(&d["threshold"]));
        let side = if p >= t { "at or above" } else { "below" };
        return format!(
            "Decision: {label} (probability of {positive} {p:.3}, {side} the model's threshold {t})."
        );
    }
    if let Some(risk) = result.get("risk") {
        let horizons: Vec<String> = result["survival"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!("{:.2} at {} days", f(&s["probability"]), f(&s["days"])))
            .collect();
        return format!(
            "Hazard ratio {:.2} versus the training cohort's mean patient (percentile {:.0} of the \
             cohort); probability of no {}: {}.",
            f(&risk["hazard_ratio"]),
            f(&risk["cohort_percentile"]),
            result["event"].as_str().unwrap_or("event"),
            horizons.join(", ")
        );
    }
    let slide = &result["slide"];
    let measured: Vec<String> = result["measurements"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m["value"].as_f64() {
            Some(v) => format!(
                "{} {v:.4} {}",
                m["name"].as_str().unwrap_or("?"),
                m["unit"].as_str().unwrap_or("")
            ),
            None => format!(
                "{} not measured (no tissue in the analysed tiles)",
                m["name"].as_str().unwrap_or("?")
            ),
        })
        .collect();
    format!(
        "Tissue fraction {:.3} of the slide, {} tiles analysed{}{}.",
        f(&slide["tissue_fraction"]),
        slide["tiles_analysed"],
        if measured.is_empty() { "" } else { "; " },
        measured.join("; ")
    )
}

/// Says which inputs were outside the training range, when any was.
fn extrapolation(result: &Value) -> String {
    let names: Vec<&str> = result["out_of_training_range"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["feature"].as_str())
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(
            " Extrapolation: {} outside the model's training range.",
            names.join(", ")
        )
    }
}

/// The decision as a coded conclusion, when its label has a SNOMED CT concept.
pub fn conclusion_code(view: &AnalysisView) -> Option<Value> {
    let result = view.result.as_ref()?.tree();
    let label = result.get("decision")?.get("label")?.as_str()?;
    let concept = codes::class_concept(label);
    concept.get("coding").is_some().then_some(concept)
}
