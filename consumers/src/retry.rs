//! Retrying an operation against a backend that may be failing for a while (ClickHouse for an
//! insert, Postgres for the question which sessions may be written): exponential backoff from
//! 100 ms doubling to 5 s, until it succeeds or the caller gives up (shutdown).

use std::future::Future;
use std::time::Duration;

/// Runs `operation` until it succeeds (`Some` of its value) or `give_up` says so after a
/// failure (`None`); `on_failure` hears of every failure with its attempt number.
pub(crate) async fn with_backoff<T, E, F, Fut>(
    mut operation: F,
    mut give_up: impl FnMut() -> bool,
    mut on_failure: impl FnMut(&E, u32),
) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        match operation().await {
            Ok(value) => return Some(value),
            Err(e) => {
                attempt += 1;
                on_failure(&e, attempt);
                if give_up() {
                    return None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
