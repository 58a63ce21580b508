//! The OpenAPI 3.1 document, generated from the handlers; served at `/openapi.json` and committed
//! at `openapi/openapi.json` (a test keeps the two equal).

use crate::http::{analyses, audit, embeddings, health, models, slides, webhooks};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(
        title = "onkos",
        description = "AI-driven precision diagnostics for lung and breast cancer: submit an analysis, \
                       get a structured, traceable result. Research use only, not a medical device. \
                       Every error is an RFC 9457 problem document (application/problem+json).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        analyses::submit::create,
        analyses::read::list,
        analyses::read::get,
        analyses::cancel::cancel,
        analyses::pictures::heatmap,
        analyses::pictures::geojson,
        analyses::pictures::evidence,
        analyses::provenance::get,
        analyses::events::stream,
        analyses::fhir::get,
        audit::list,
        webhooks::create,
        webhooks::list,
        webhooks::delete,
        webhooks::deliveries,
        models::list,
        models::get,
        models::version,
        models::register,
        models::activate,
        models::retire,
        slides::upload,
        slides::get,
        slides::thumbnail,
        embeddings::upload,
        embeddings::get,
        health::healthz,
        health::readyz,
        crate::http::metrics::metrics
    ),
    components(schemas(crate::error::Problem, crate::domain::contract::FieldError, analyses::BatchAccepted)),
    modifiers(&BearerAuth, &RetryAfter),
    tags(
        (name = "analyses", description = "Submit analyses and read their results"),
        (name = "models", description = "The model catalogue: cards, input contracts, versions"),
        (name = "slides", description = "Whole-slide images: streamed upload, format and pyramid as read from the file"),
        (name = "embeddings", description = "Precomputed tile embeddings of a slide (safetensors), the input of a MIL model"),
        (name = "webhooks", description = "Signed callbacks on analysis state changes, delivered from a durable outbox"),
        (name = "audit", description = "The audit trail (admins)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut scheme = Http::new(HttpAuthScheme::Bearer);
        scheme.bearer_format = Some("JWT".into());
        scheme.description = Some(
            "A JWT signed with the configured asymmetric key (EdDSA, ES256 or RS256) carrying `tenant` \
             and `roles` (submitter, clinician, admin) claims."
                .into(),
        );
        components.add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// Retry-After where onkos sends it: every `/v1` operation may answer 429 when the client's rate
/// limit is spent, and the 503s that operations declare carry it too.
struct RetryAfter;

impl Modify for RetryAfter {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::{Content, ObjectBuilder, Ref, RefOr, ResponseBuilder, Type};
        let seconds = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(1));
        let retry_after = HeaderBuilder::new()
            .schema(Some(seconds))
            .description(Some("Seconds to wait before the next request"))
            .build();
        let response = ResponseBuilder::new()
            .description(
                "The client's rate limit is spent (ONKOS_RATE_LIMIT_PER_SECOND, per bearer token); \
                 retry after the seconds Retry-After gives",
            )
            .header("Retry-After", retry_after.clone())
            .content(
                crate::error::PROBLEM_JSON,
                Content::new(Some(Ref::from_schema_name("Problem"))),
            )
            .build();
        for (path, item) in &mut openapi.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                let responses = &mut operation.responses.responses;
                if let Some(RefOr::T(unavailable)) = responses.get_mut("503") {
                    unavailable
                        .headers
                        .insert("Retry-After".into(), RefOr::T(retry_after.clone()));
                }
                responses.insert("429".into(), RefOr::T(response.clone()));
            }
        }
    }
}

/// The document as served and committed: pretty JSON with a trailing newline.
pub fn document() -> String {
    let mut json = ApiDoc::openapi().to_pretty_json().unwrap_or_default();
    json.push('\n');
    json
}
