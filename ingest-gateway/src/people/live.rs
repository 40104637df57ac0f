//! `GET /v1/sessions/{id}/live`: an open session's rolling metrics as Server-Sent Events.
//!
//! Server-Sent Events rather than a WebSocket: the feed flows one way, SSE is plain HTTP (the
//! same TLS, cookies, proxies and HTTP/2 as every other read), and browsers reconnect by
//! themselves (a browser's `EventSource` cannot send an `Authorization` header: a web page
//! reads the stream with `fetch` and the bearer token). The access policy decides at the
//! start (audited as a read of `live`). Then, once
//! a second, the gateway re-checks all its open feeds at once — their login tokens in one query,
//! their sessions' status in another, and the policy (`still_allows`: the same decision, not
//! audited again) once per viewer and person — so a logout, a revoked relationship or the
//! session's end close the stream within a second, with an `end` event saying why, at a cost
//! that does not grow with the viewers of one person.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use biofeed_accounts::login;
use biofeed_accounts::policy::Action;
use biofeed_live::hub::FeedJson;
use futures_util::Stream;
use tokio::sync::{broadcast, mpsc, oneshot};
use uuid::Uuid;

use crate::metrics::ReasonLabels;
use crate::people::auth::UserAuth;
use crate::people::reads::readable_session;
use crate::people::{PeopleInner, PeopleState};
use crate::problem::ApiError;

/// How often the open feeds are re-checked.
const RECHECK: Duration = Duration::from_secs(1);
/// How long feeds go on while the re-check fails.
const UNCONFIRMED: Duration = Duration::from_secs(3);
/// How long the last event of an ended feed may wait for a viewer that does not read.
const END_TIMEOUT: Duration = Duration::from_secs(5);
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
    UserAuth { actor, token, .. }: UserAuth,
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
    let (id, ended) = state.inner.live_watchers.add(Watch {
        token,
        actor: actor.user_id,
        owner,
        session,
        end: None,
    });
    let watcher = Watcher {
        state: state.clone(),
        id,
    };
    tokio::spawn(watcher.run(subscription, ended, tx));
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

/// The open feeds of this gateway, re-checked together every second.
#[derive(Default)]
pub(crate) struct Watchers {
    open: Mutex<HashMap<u64, Watch>>,
    next: AtomicU64,
    /// Set at shutdown: every feed is ended, and new ones end at once.
    closing: std::sync::atomic::AtomicBool,
}

/// One open feed: who watches whose session with which login, and how to end it.
pub(crate) struct Watch {
    token: String,
    actor: Uuid,
    owner: Uuid,
    session: Uuid,
    end: Option<oneshot::Sender<&'static str>>,
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Watch>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a feed; its id, and the receiver of the reason it must end.
    fn add(&self, mut watch: Watch) -> (u64, oneshot::Receiver<&'static str>) {
        let (end, ended) = oneshot::channel();
        watch.end = Some(end);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, watch);
        if self.closing.load(Ordering::SeqCst) {
            self.end(id, "unavailable");
        }
        (id, ended)
    }

    /// Ends every feed (the gateway is stopping) and every one opened from now on.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.end_all("unavailable");
    }

    fn end_all(&self, reason: &'static str) {
        let ids: Vec<u64> = self.lock().keys().copied().collect();
        for id in ids {
            self.end(id, reason);
        }
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Ends (and forgets) the feed `id` with `reason`.
    fn end(&self, id: u64, reason: &'static str) {
        if let Some(end) = self.lock().remove(&id).and_then(|w| w.end) {
            let _ = end.send(reason);
        }
    }
}

/// Re-checks the gateway's open feeds every second while the people half lives. While the
/// checks fail (Postgres away), the feeds go on for at most [`UNCONFIRMED`], then end: what
/// cannot be confirmed is not shown.
pub(crate) async fn recheck_loop(people: Weak<PeopleInner>) {
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut confirmed = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let Some(inner) = people.upgrade() else {
            return;
        };
        let state = PeopleState { inner };
        match recheck(&state).await {
            Ok(()) => confirmed = tokio::time::Instant::now(),
            Err(e) if confirmed.elapsed() >= UNCONFIRMED => {
                tracing::warn!(error = %e, "cannot re-check the live feeds; ending them");
                state.inner.live_watchers.end_all("unavailable");
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-check the live feeds; trying again"),
        }
    }
}

/// One re-check of every open feed: the login tokens in one query, the sessions in another,
/// the policy once per distinct viewer and person.
async fn recheck(state: &PeopleState) -> Result<(), ApiError> {
    let watchers = &state.inner.live_watchers;
    let open: Vec<(u64, String, Uuid, Uuid, Uuid)> = watchers
        .lock()
        .iter()
        .map(|(id, w)| (*id, w.token.clone(), w.actor, w.owner, w.session))
        .collect();
    if open.is_empty() {
        return Ok(());
    }
    let mut tokens: Vec<&str> = open.iter().map(|(_, t, ..)| t.as_str()).collect();
    tokens.sort_unstable();
    tokens.dedup();
    let actors = login::authenticate_many(state.pool(), &tokens).await?;
    let mut sessions: Vec<Uuid> = open.iter().map(|(.., s)| *s).collect();
    sessions.sort_unstable();
    sessions.dedup();
    let still_open: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM sessions WHERE id = ANY($1) AND status = 'open'")
            .bind(&sessions)
            .fetch_all(state.pool())
            .await?;
    // The policy once per viewer and person, concurrently (bounded by Postgres' pool); an
    // error fails the pass, and the feeds go on for the grace period while passes fail.
    let mut pairs: Vec<(Uuid, Uuid)> = open
        .iter()
        .filter(|(_, token, actor, ..)| actors.get(token).is_some_and(|a| a.user_id == *actor))
        .map(|(_, _, actor, owner, _)| (*actor, *owner))
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let actor_of: HashMap<Uuid, &biofeed_accounts::policy::Actor> =
        actors.values().map(|a| (a.user_id, a)).collect();
    let decisions = futures_util::future::join_all(pairs.iter().map(|(actor, owner)| async {
        match actor_of.get(actor) {
            Some(current) => {
                state
                    .inner
                    .access
                    .still_allows(current, ACTION, *owner)
                    .await
            }
            None => Ok(false),
        }
    }))
    .await;
    let mut allowed: HashMap<(Uuid, Uuid), bool> = HashMap::new();
    for (pair, decision) in pairs.into_iter().zip(decisions) {
        allowed.insert(pair, decision?);
    }
    for (id, token, actor, owner, session) in &open {
        let reason = match actors.get(token) {
            Some(current) if current.user_id == *actor => {
                if !allowed.get(&(*actor, *owner)).copied().unwrap_or(false) {
                    Some("access_ended")
                } else if !still_open.contains(session) {
                    Some("session_closed")
                } else {
                    None
                }
            }
            _ => Some("logged_out"),
        };
        if let Some(reason) = reason {
            watchers.end(*id, reason);
        }
    }
    Ok(())
}

/// One viewer's feed: forwards the hub's feeds until the viewer leaves or the re-check ends it.
struct Watcher {
    state: PeopleState,
    id: u64,
}

impl Watcher {
    async fn run(
        self,
        subscription: biofeed_live::hub::Subscription,
        ended: oneshot::Receiver<&'static str>,
        tx: mpsc::Sender<Event>,
    ) {
        let metrics = &self.state.inner.metrics;
        metrics.live_viewers.inc();
        let reason = forward(subscription, ended, &tx).await;
        self.state.inner.live_watchers.remove(self.id);
        metrics.live_viewers.dec();
        if let Some(reason) = reason {
            metrics
                .live_ended
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
            let data = serde_json::json!({ "reason": reason }).to_string();
            let end = tx.send(Event::default().event("end").data(data));
            let _ = tokio::time::timeout(END_TIMEOUT, end).await;
        }
    }
}

/// Forwards feeds until the viewer leaves (`None`) or the feed must end (the reason).
async fn forward(
    subscription: biofeed_live::hub::Subscription,
    mut ended: oneshot::Receiver<&'static str>,
    tx: &mpsc::Sender<Event>,
) -> Option<&'static str> {
    let mut feeds = subscription.feeds;
    for json in subscription.newest {
        if tx.try_send(feed_event(&json)).is_err() {
            break;
        }
    }
    loop {
        tokio::select! {
            () = tx.closed() => return None,
            reason = &mut ended => return Some(reason.unwrap_or("unavailable")),
            feed = feeds.recv() => match feed {
                // A viewer that does not read what it was sent skips feeds (never blocks this
                // loop, which must see the end of its access at once).
                Ok(json) => match tx.try_send(feed_event(&json)) {
                    Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return None,
                },
                // A viewer too slow for the feed skips to the newest.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return Some("unavailable"),
            },
        }
    }
}

fn feed_event(json: &FeedJson) -> Event {
    Event::default().event("feed").data(&**json)
}
