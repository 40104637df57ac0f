//! The process's stop signal, one for every part of it: the gateway, a consumer and a jobs
//! runner each take a [`Shutdown`] and stop when it fires — on SIGTERM or Ctrl-C, or when another
//! part of the same process ended ([`run_parts`]).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A stop signal shared by the parts of a process: fired once, seen by all (async waiters, and
/// blocking loops that poll [`Shutdown::is_fired`]).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    fired: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Shutdown {
    /// A signal that fires only when told to.
    pub fn new() -> Self {
        Self::default()
    }

    /// A signal that also fires on SIGTERM or Ctrl-C (listened for from now on).
    pub fn on_signal() -> Self {
        let shutdown = Self::new();
        let fire = shutdown.clone();
        tokio::spawn(async move {
            termination().await;
            tracing::info!("stopping: finishing the work in hand");
            fire.fire();
        });
        shutdown
    }

    /// Fires the signal (again is harmless).
    pub fn fire(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Whether it fired.
    pub fn is_fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Resolves once the signal fired.
    pub async fn fired(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_fired() {
                return;
            }
            notified.await;
        }
    }

    /// A `'static` future that resolves once the signal fired (for graceful-shutdown hooks).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let shutdown = self.clone();
        async move { shutdown.fired().await }
    }
}

/// What a part of a process returns.
pub type PartOutcome = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// A named part of a process, for [`run_parts`].
pub struct Part {
    name: &'static str,
    run: std::pin::Pin<Box<dyn Future<Output = PartOutcome> + Send>>,
}

impl Part {
    /// Names a part's work.
    pub fn new<E>(
        name: &'static str,
        work: impl Future<Output = Result<(), E>> + Send + 'static,
    ) -> Self
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Self {
            name,
            run: Box::pin(async move { work.await.map_err(Into::into) }),
        }
    }
}

/// Runs the parts of one process side by side; the first to end (done, failed or panicked)
/// fires `shutdown`, so the others stop too. Returns the first failure, naming its part.
pub async fn run_parts(shutdown: &Shutdown, parts: Vec<Part>) -> Result<(), PartError> {
    let mut running = tokio::task::JoinSet::new();
    for part in parts {
        running.spawn(async move { (part.name, part.run.await) });
    }
    let mut failure = None;
    while let Some(ended) = running.join_next().await {
        shutdown.fire();
        let failed = match ended {
            Ok((_, Ok(()))) => None,
            Ok((part, Err(source))) => {
                tracing::error!(part, error = %source, "a part of the process ended with an error");
                Some(PartError::Failed { part, source })
            }
            Err(e) => {
                tracing::error!(error = %e, "a part of the process panicked");
                Some(PartError::Panicked(e.to_string()))
            }
        };
        if let Some(e) = failed {
            failure.get_or_insert(e);
        }
    }
    failure.map_or(Ok(()), Err)
}

/// A part of a process failed.
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// The part returned an error.
    #[error("the {part} failed")]
    Failed {
        /// Which part.
        part: &'static str,
        /// What failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The part panicked.
    #[error("a part panicked: {0}")]
    Panicked(String),
}

async fn termination() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn firing_wakes_every_waiter_and_later_ones_return_at_once() {
        let shutdown = Shutdown::new();
        let waiter = tokio::spawn(shutdown.wait());
        assert!(!shutdown.is_fired());
        shutdown.fire();
        waiter.await.unwrap();
        shutdown.wait().await;
        assert!(shutdown.is_fired());
    }

    #[tokio::test]
    async fn the_first_part_to_end_stops_the_others_and_its_failure_is_named() {
        let shutdown = Shutdown::new();
        let waiting = shutdown.clone();
        let outcome = run_parts(
            &shutdown,
            vec![
                Part::new("waiter", async move {
                    waiting.fired().await;
                    Ok::<(), PartError>(())
                }),
                Part::new("failing", async {
                    Err(PartError::Panicked("boom".to_owned()))
                }),
            ],
        )
        .await;
        assert!(shutdown.is_fired());
        let message = outcome.unwrap_err().to_string();
        assert!(message.contains("the failing failed"), "{message}");
    }
}
