//! `GET /v1/sessions/{id}/live`: an open session's rolling metrics as Server-Sent Events.
//!
//! Server-Sent Events rather than a WebSocket: the feed flows one way, SSE is plain HTTP (the
//! same TLS, cookies, proxies and HTTP/2 as every other read), and browsers reconnect by
//! themselves. The access policy decides at the start (audited as a read of `live`) and is asked
//! again every second without a new audit row, together with the login token and the session's
//! status: a logout, a revoked relationship or the session's end close the stream within a
//! second, with an `end` event saying why.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use biofeed_accounts::login;
use biofeed_accounts::policy::{Action, Actor};
use biofeed_live::hub::FeedJson;
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use uuid::Uuid;

use crate::metrics::ReasonLabels;
use crate::people::auth::UserAuth;
use crate::people::reads::readable_session;
use crate::people::PeopleState;
use crate::problem::ApiError;

/// How often an open feed re-asks whether it may go on.
const RECHECK: Duration = Duration::from_secs(1);
const ACTION: Action = Action::ReadData { resource: "live" };

/// An open session's live feedback.
#[utoipa::path(get, path = "/v1/sessions/{id}/live", tag = "reads",
    params(("id" = Uuid, Path, description = "the session (open)")),
    responses(
        (status = 200, description = "Server-Sent Events: `feed` events, each one data type's rolling \
metrics over the live window with the newest samples downsampled for a plot (JSON: session_id, \
data_type, channels, window_us, through_us, samples, metrics[{name, channel, value, samples}], \
plot{t_us, values}, computed_at_us), at most one per data type per second while samples arrive; \
then one `end` event (JSON: reason — session_closed, access_ended, logged_out, unavailable) when \
the gateway closes the stream", content_type = "text/event-stream"),
        (status = 404, description = "no such session whose data you may read", body = crate::problem::Problem, content_type = "application/problem+json"),
        (status = 409, description = "the session is not open (its metrics are at /v1/sessions/{id}/metrics)", body = crate::problem::Problem, content_type = "application/problem+json"),
    ), security(("login_token" = [])))]
pub async fn session_live(
    State(state): State<PeopleState>,
    UserAuth { actor, token }: UserAuth,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (session, owner) = readable_session(&state, &actor, &id, "live").await?;
    let status = session_status(&state, session).await?;
    if status.as_deref() != Some("open") {
        return Err(ApiError::Conflict(format!(
            "the session is {}: live feedback is for open sessions; its metrics are at /v1/sessions/{session}/metrics",
            status.as_deref().unwrap_or("gone")
        )));
    }
    let subscription = state.inner.live.subscribe(session);
    let (tx, rx) = mpsc::channel::<Event>(16);
    let watcher = Watcher {
        state: state.clone(),
        actor,
        token,
        session,
        owner,
    };
    tokio::spawn(watcher.run(subscription, tx));
    Ok(Sse::new(futures_util::stream::unfold(rx, |mut rx| async {
        rx.recv().await.map(|event| (Ok(event), rx))
    }))
    .keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn session_status(state: &PeopleState, session: Uuid) -> Result<Option<String>, ApiError> {
    Ok(
        sqlx::query_scalar("SELECT status FROM sessions WHERE id = $1")
            .bind(session)
            .fetch_optional(state.pool())
            .await?,
    )
}

/// One viewer's feed: forwards the hub's feeds and re-asks every second.
struct Watcher {
    state: PeopleState,
    actor: Actor,
    token: String,
    session: Uuid,
    owner: Uuid,
}

impl Watcher {
    async fn run(self, subscription: biofeed_live::hub::Subscription, tx: mpsc::Sender<Event>) {
        let metrics = &self.state.inner.metrics;
        metrics.live_viewers.inc();
        let reason = self.forward(subscription, &tx).await;
        metrics.live_viewers.dec();
        if let Some(reason) = reason {
            metrics
                .live_ended
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
            let data = serde_json::json!({ "reason": reason }).to_string();
            let _ = tx.send(Event::default().event("end").data(data)).await;
        }
    }

    /// Forwards feeds until the viewer leaves (`None`) or the feed must end (the reason).
    async fn forward(
        &self,
        subscription: biofeed_live::hub::Subscription,
        tx: &mpsc::Sender<Event>,
    ) -> Option<&'static str> {
        let mut feeds = subscription.feeds;
        for json in subscription.newest {
            if tx.send(feed_event(&json)).await.is_err() {
                return None;
            }
        }
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.tick().await;
        loop {
            tokio::select! {
                () = tx.closed() => return None,
                feed = feeds.recv() => match feed {
                    Ok(json) => {
                        if tx.send(feed_event(&json)).await.is_err() {
                            return None;
                        }
                    }
                    // A viewer too slow for the feed skips to the newest.
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return Some("unavailable"),
                },
                _ = recheck.tick() => match self.may_go_on().await {
                    Ok(None) => {}
                    Ok(Some(reason)) => return Some(reason),
                    Err(e) => {
                        // Unable to confirm the viewer may still see it: stop rather than show.
                        tracing::warn!(error = %e, "cannot re-check a live feed's access; ending it");
                        return Some("unavailable");
                    }
                },
            }
        }
    }

    /// `None` while the login, the access and the session's openness hold; else why not.
    async fn may_go_on(&self) -> Result<Option<&'static str>, ApiError> {
        let pool = self.state.pool();
        let Some(actor) = login::authenticate(pool, &self.token).await? else {
            return Ok(Some("logged_out"));
        };
        if actor.user_id != self.actor.user_id
            || !self
                .state
                .inner
                .access
                .still_allows(&actor, ACTION, self.owner)
                .await?
        {
            return Ok(Some("access_ended"));
        }
        Ok(
            match session_status(&self.state, self.session).await?.as_deref() {
                Some("open") => None,
                _ => Some("session_closed"),
            },
        )
    }
}

fn feed_event(json: &FeedJson) -> Event {
    Event::default().event("feed").data(&**json)
}
