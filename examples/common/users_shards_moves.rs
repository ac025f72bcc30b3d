//! Moving slots from the operator's view (`users_shards.rs`, behind
//! `--admin-token` like `GET /admin/shards`):
//!
//! - `POST /admin/shards/move` with `{"from": A, "to": B, "shard": "NAME"}`
//!   starts an online move of slots `A..=B` (inclusive) and their users to
//!   shard `NAME` (`ShardedCluster::move_slots`) and answers 202
//!   `{"move": ID}`; 400 with `{"error": ...}` for a bad body, range or
//!   shard (or a range the shard owns already, or one spanning several
//!   owners); 409 while another move of overlapping slots runs.
//! - `GET /admin/shards/moves/{id}` answers its progress: `{"phase": ...,
//!   "rows_copied": N, "bytes_behind": N, "done": bool, "error": string |
//!   null}` (`phase`: `copying`, `catching_up`, `cutting_over`,
//!   `cleaning_up`, `done` or `failed`; `done` is true once the move
//!   finished and cleaned up); 404 for an id this instance did not start.
//!
//! Resume and roll back are library calls (`resume_move`, `rollback_move`).

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::Json;
use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use tower_scale::shard::reshard::{MovePhase, MoveProgress};
use tower_scale::shard::{ShardError, SlotRange};

use super::users_app;
use super::users_shards::{AppState, REQUEST_DEADLINE};
use super::users_shards_views::admin_denied;

/// The moves this instance started, newest last (at most [`KEPT`]).
#[derive(Default)]
pub(crate) struct Moves(Mutex<VecDeque<(String, watch::Receiver<MoveProgress>)>>);

/// How many moves `GET /admin/shards/moves/{id}` remembers.
const KEPT: usize = 100;

impl Moves {
    fn add(&self, id: String, progress: watch::Receiver<MoveProgress>) {
        let mut moves = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if moves.len() >= KEPT {
            // The oldest finished one goes; a running one only if none is.
            let finished = moves
                .iter()
                .position(|(_, p)| matches!(p.borrow().phase, MovePhase::Done | MovePhase::Failed));
            moves.remove(finished.unwrap_or(0));
        }
        moves.push_back((id, progress));
    }

    fn progress(&self, id: &str) -> Option<MoveProgress> {
        let moves = self.0.lock().unwrap_or_else(|e| e.into_inner());
        moves
            .iter()
            .find(|(m, _)| m == id)
            .map(|(_, p)| p.borrow().clone())
    }
}

fn bad(message: impl Into<String>) -> Response {
    users_app::error(StatusCode::BAD_REQUEST, message)
}

/// `A..=B` and the target from the body, or the 400 message.
fn parse(body: &serde_json::Value, slots: u16) -> Result<(SlotRange, String), String> {
    let slot = |field: &str| -> Result<u16, String> {
        body.get(field)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n < slots)
            .ok_or_else(|| format!("{field} must be a slot from 0 to {}", slots - 1))
    };
    let (from, to) = (slot("from")?, slot("to")?);
    if from > to {
        return Err("from must not be above to (the range is inclusive)".into());
    }
    let shard = body
        .get("shard")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("shard must be a shard's name")?;
    Ok((SlotRange::new(from, to), shard.to_string()))
}

/// `POST /admin/shards/move`.
pub(crate) async fn start(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
        return denied;
    }
    let Ok(Json(body)) = body else {
        return bad("the body must be JSON: {\"from\": A, \"to\": B, \"shard\": \"NAME\"}");
    };
    let (range, shard) = match parse(&body, app.cluster.map().slot_count()) {
        Ok(p) => p,
        Err(message) => return bad(message),
    };
    let started =
        tokio::time::timeout(REQUEST_DEADLINE, app.cluster.move_slots(range, &shard)).await;
    match started {
        Ok(Ok(handle)) => {
            let id = handle.id().to_string();
            app.moves.add(id.clone(), handle.subscribe());
            // The move goes on without its handle; its end is logged.
            tokio::spawn(async move {
                match handle.wait().await {
                    Ok(report) => eprintln!(
                        "axum_users: move {} done: {} rows copied, writes held {:?}",
                        report.id, report.rows_copied, report.pause
                    ),
                    Err(e) => eprintln!("axum_users: move failed: {e}"),
                }
            });
            (
                StatusCode::ACCEPTED,
                Json(serde_json::json!({ "move": id })),
            )
                .into_response()
        }
        Ok(Err(ShardError::MoveConflict { id })) => users_app::error(
            StatusCode::CONFLICT,
            format!("move {id} of overlapping slots is running"),
        ),
        // Slots between an old owner's release and a new one's claim.
        Ok(Err(e @ ShardError::Unowned { .. })) => {
            users_app::error(StatusCode::CONFLICT, e.to_string())
        }
        Ok(Err(
            e @ (ShardError::UnknownShard(_)
            | ShardError::SlotOutOfRange { .. }
            | ShardError::Setup(_)),
        )) => bad(e.to_string()),
        Ok(Err(e)) => {
            eprintln!("axum_users: starting a move failed: {e}");
            users_app::error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable")
        }
        Err(_) => users_app::error(StatusCode::SERVICE_UNAVAILABLE, "database unavailable"),
    }
}

/// `GET /admin/shards/moves/{id}`.
pub(crate) async fn status(
    State(app): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    if let Some(denied) = admin_denied(&app, &headers) {
        return denied;
    }
    let progress = id.ok().and_then(|Path(id)| app.moves.progress(&id));
    let Some(p) = progress else {
        return users_app::error(StatusCode::NOT_FOUND, "no such move");
    };
    Json(serde_json::json!({
        "phase": p.phase.as_str(),
        "rows_copied": p.rows_copied,
        "bytes_behind": p.bytes_behind,
        "done": p.phase == MovePhase::Done,
        "error": p.error,
    }))
    .into_response()
}
