//! The gateway's side of live feedback: one reader of the live topic per gateway, which hands
//! each feed to the viewers of its session connected to this gateway.
//!
//! Every gateway reads every partition of the live topic from its end (assigned, never a group
//! member, nothing committed): a viewer may connect to any gateway, and the feeds are small (one per session and
//! data type per interval). The newest feed of each session and data type is kept for a minute,
//! so a viewer who connects sees the current metrics at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use biofeed_backends::kafka::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::feed::parse_key;
use crate::LiveError;

/// A feed as JSON, shared by every viewer it goes to.
pub type FeedJson = Arc<str>;

/// Feeds a viewer may fall behind by before the oldest are skipped.
const VIEWER_BUFFER: usize = 64;
/// How long the newest feed of a session is kept for viewers who connect.
const KEEP_NEWEST: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Routes {
    viewers: HashMap<Uuid, broadcast::Sender<FeedJson>>,
    newest: HashMap<(Uuid, String), (Instant, FeedJson)>,
}

/// The live topic's reader and its viewers; cheap to clone. The reader stops when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Hub {
    routes: Arc<Mutex<Routes>>,
    _stop: Arc<StopOnDrop>,
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A viewer's feeds: the newest ones known when it subscribed, then each new one.
pub struct Subscription {
    /// The newest feed of each of the session's data types, when the viewer subscribed.
    pub newest: Vec<FeedJson>,
    /// The feeds from now on (`Lagged` when the viewer fell more than a buffer behind).
    pub feeds: broadcast::Receiver<FeedJson>,
}

impl Hub {
    /// Starts reading `topic` on a thread of its own. A topic that does not exist yet (before
    /// `biofeed migrate`) is waited for; Kafka failing is retried, never fatal to the gateway.
    pub fn start(kafka: &KafkaSettings, topic: &str) -> Result<Self, LiveError> {
        let mut config: ClientConfig = kafka.client_config()?;
        config
            .set("client.id", "biofeed-live-hub")
            // librdkafka's consumer needs a group id even for `assign`; nothing is committed
            // and no group is joined.
            .set("group.id", "biofeed-live-hub")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest")
            .set("fetch.wait.max.ms", "10");
        let routes = Arc::new(Mutex::new(Routes::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_routes, thread_stop, topic) =
            (Arc::clone(&routes), Arc::clone(&stop), topic.to_owned());
        std::thread::Builder::new()
            .name("live-hub".to_owned())
            .spawn(move || read_loop(&config, &topic, &thread_routes, &thread_stop))
            .map_err(|e| LiveError::Panicked(e.to_string()))?;
        Ok(Self {
            routes,
            _stop: Arc::new(StopOnDrop(stop)),
        })
    }

    /// Subscribes to a session's feeds.
    pub fn subscribe(&self, session: Uuid) -> Subscription {
        let mut routes = lock(&self.routes);
        let newest = routes
            .newest
            .iter()
            .filter(|((s, _), (at, _))| *s == session && at.elapsed() < KEEP_NEWEST)
            .map(|(_, (_, json))| Arc::clone(json))
            .collect();
        let feeds = routes
            .viewers
            .entry(session)
            .or_insert_with(|| broadcast::channel(VIEWER_BUFFER).0)
            .subscribe();
        Subscription { newest, feeds }
    }

    /// Sessions with viewers on this gateway.
    pub fn watched_sessions(&self) -> usize {
        lock(&self.routes).viewers.len()
    }
}

fn read_loop(config: &ClientConfig, topic: &str, routes: &Mutex<Routes>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = read(config, topic, routes, stop) {
            tracing::warn!(error = %e, topic, "cannot read the live topic; retrying in 5 s");
            for _ in 0..50 {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn read(
    config: &ClientConfig,
    topic: &str,
    routes: &Mutex<Routes>,
    stop: &AtomicBool,
) -> Result<(), LiveError> {
    let consumer: BaseConsumer = config.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        return Err(LiveError::Fatal(format!(
            "the topic {topic} has no partitions (run biofeed migrate)"
        )));
    }
    let mut assignment = TopicPartitionList::new();
    for p in &partitions {
        assignment.add_partition_offset(topic, *p, Offset::End)?;
    }
    consumer.assign(&assignment)?;
    tracing::info!(topic, partitions = partitions.len(), "reading live feeds");
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Ok(message)) => {
                let (Some(key), Some(payload)) = (message.key(), message.payload()) else {
                    continue;
                };
                let (Some((session, data_type)), Ok(json)) =
                    (parse_key(key), std::str::from_utf8(payload))
                else {
                    continue;
                };
                let json: FeedJson = Arc::from(json);
                let mut r = lock(routes);
                r.newest.insert(
                    (session, data_type.to_owned()),
                    (Instant::now(), Arc::clone(&json)),
                );
                if let Some(viewers) = r.viewers.get(&session) {
                    if viewers.send(json).is_err() {
                        // Nobody listens any more.
                        r.viewers.remove(&session);
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "kafka error reading live feeds"),
        }
        if last_sweep.elapsed() >= Duration::from_secs(5) {
            last_sweep = Instant::now();
            let mut r = lock(routes);
            r.newest.retain(|_, (at, _)| at.elapsed() < KEEP_NEWEST);
            r.viewers.retain(|_, viewers| viewers.receiver_count() > 0);
        }
    }
    Ok(())
}

fn lock(routes: &Mutex<Routes>) -> MutexGuard<'_, Routes> {
    routes
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
