//! `GET /v1/analyses/{id}/events`: an analysis's state changes and progress as Server-Sent Events.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::ids::AnalysisId;
use crate::error::{ApiError, ApiResult, Problem};
use crate::repo;
use crate::repo::analyses::Standing;
use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// How often a stream re-reads a running analysis for progress between notifications.
const POLL: Duration = Duration::from_millis(500);
/// The longest one stream stays open; a client still waiting reconnects.
const MAX_STREAM: Duration = Duration::from_secs(3600);

/// Stream an analysis's state changes and progress (Server-Sent Events).
///
/// Each event is `event: status` (a new state) or `event: progress` (tiles analysed so far), with
/// a JSON `data` line: `{"id", "status", "attempt"?, "tiles_done"?, "tiles_total"?, "error"?}`.
/// The first event is the current state; the stream ends after the final state (`succeeded`,
/// `failed` or `cancelled`), after an hour, or when the server shuts down; reconnecting starts
/// again from the current state. A process serves at most 256 streams at once (503 beyond).
#[utoipa::path(get, path = "/v1/analyses/{id}/events", tag = "analyses",
    params(("id" = Uuid, Path, description = "The analysis id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token has no onkos role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such analysis in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable, or too many streams are open", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn stream(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    principal.require(&[Role::Submitter, Role::Clinician, Role::Admin])?;
    let id = Uuid::parse_str(&id)
        .map(AnalysisId)
        .map_err(|_| ApiError::NotFound)?;
    let permit = Arc::clone(&state.event_streams)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::Unavailable(
                "too many event streams are open; poll with ?wait= instead".into(),
            )
        })?;
    // Subscribed before the first read, so that a completion in between is not missed.
    let done = state.completions.subscribe();
    let first = repo::analyses::standing(&state.pool, &principal.tenant, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let watch = Watch {
        state,
        principal,
        id,
        done,
        last: None,
        pending: Some(first),
        until: tokio::time::Instant::now() + MAX_STREAM,
        _permit: permit,
    };
    let events = futures_util::stream::unfold(watch, |mut w| async move {
        let next = w.next().await?;
        Some((Ok(next), w))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

struct Watch {
    state: AppState,
    principal: Principal,
    id: AnalysisId,
    done: tokio::sync::broadcast::Receiver<std::sync::Arc<Vec<Uuid>>>,
    last: Option<Standing>,
    /// A read not yet compared with `last`.
    pending: Option<Standing>,
    until: tokio::time::Instant,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Watch {
    /// The next event, or `None` once the final state was sent (or the analysis is gone).
    async fn next(&mut self) -> Option<Event> {
        loop {
            if self.last.as_ref().is_some_and(is_final) {
                return None;
            }
            let now = match self.pending.take() {
                Some(now) => now,
                None => {
                    if !self.wait().await {
                        return None;
                    }
                    repo::analyses::standing(&self.state.pool, &self.principal.tenant, self.id)
                        .await
                        .ok()??
                }
            };
            if self.last.as_ref() == Some(&now) {
                continue;
            }
            let kind = match &self.last {
                Some(last) if last.status == now.status && last.attempt == now.attempt => {
                    "progress"
                }
                _ => "status",
            };
            let mut data = serde_json::to_value(&now).unwrap_or_default();
            if let Some(object) = data.as_object_mut() {
                object.retain(|_, v| !v.is_null());
                object.insert("id".into(), self.id.to_string().into());
            }
            self.last = Some(now);
            return Some(Event::default().event(kind).data(data.to_string()));
        }
    }

    /// Until this analysis is reported final, or the poll interval passes: true. False when the
    /// stream should end (the server is shutting down, or the stream is an hour old).
    async fn wait(&mut self) -> bool {
        if tokio::time::Instant::now() >= self.until {
            return false;
        }
        let sleep = tokio::time::sleep(POLL);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = self.state.stopping.cancelled() => return false,
                () = &mut sleep => return true,
                message = self.done.recv() => match message {
                    Ok(ids) if ids.contains(&self.id.0) => return true,
                    Ok(_) => {}
                    // Missed notifications: read now.
                    Err(_) => return true,
                }
            }
        }
    }
}

fn is_final(s: &Standing) -> bool {
    matches!(s.status.as_str(), "succeeded" | "failed" | "cancelled")
}
