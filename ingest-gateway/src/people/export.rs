//! `GET /v1/me/export` (GDPR articles 15 and 20): everything biofeed holds about the caller,
//! streamed as newline-delimited JSON (`application/x-ndjson`) in the `biofeed-export/1` format.
//! The lines are written by [`biofeed_accounts::export::export_user`] (where the format is
//! documented), with the sessions and samples read by [`StoredRecordings`]; this handler asks
//! the policy and streams.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use biofeed_accounts::export::export_user;
use tokio::sync::mpsc;

use crate::people::auth::UserAuth;
use crate::people::recordings::StoredRecordings;
use crate::people::PeopleState;
use crate::problem::ApiError;

/// Streams everything held about the caller (see the module documentation for the format).
#[utoipa::path(get, path = "/v1/me/export", tag = "accounts",
    responses((status = 200, description = "newline-delimited JSON; complete when its last line has type `end`",
               content_type = "application/x-ndjson", body = String)),
    security(("login_token" = [])))]
pub async fn export_me(
    State(state): State<PeopleState>,
    UserAuth { actor, .. }: UserAuth,
) -> Result<Response, ApiError> {
    let me = state.allow_own(&actor, "export").await?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>(16);
    let inner = state.inner.clone();
    tokio::spawn(async move {
        let recordings = StoredRecordings::new(inner.accounts.clone(), inner.clickhouse.client());
        if let Err(e) = export_user(&inner.accounts, &recordings, me, tx).await {
            tracing::warn!(user_id = %me, error = %e, "export cut short");
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|line| (Ok::<_, std::io::Error>(Bytes::from(line)), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
