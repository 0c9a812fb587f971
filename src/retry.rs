//! Retry pacing: exponential backoff with jitter, never past the connection's deadline.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::{Instant, sleep_until};

/// Pauses that start at `first` and double, with jitter so that many connections retrying at once spread
/// out, up to `max`.
pub struct Backoff {
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        let delays = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times()
            .build();
        Backoff { delays, max }
    }

    /// Sleeps for the next pause, cut short at `deadline`. `false` once the deadline has come: no time is
    /// left for another attempt, and the caller reports its last error.
    pub async fn pause(&mut self, deadline: Instant) -> bool {
        let delay = self.delays.next().unwrap_or(self.max);
        sleep_until(deadline.min(Instant::now() + delay)).await;
        Instant::now() < deadline
    }
}
