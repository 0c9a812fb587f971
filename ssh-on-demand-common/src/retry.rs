//! Retry pacing: exponential backoff with jitter, never past the caller's deadline. Every retry and poll of
//! both programs paces itself with it: the start and stop API calls, the daemon's accept loop after an error,
//! and the companion's polls of a platform.

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

    /// The next pause. backon adds its jitter (up to the delay itself) after capping the delay, which would
    /// double the cap: `max` is the documented longest pause, so it caps the sum.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Sleeps for the next pause, cut short at `deadline`. `false` once the deadline has come: no time is
    /// left for another attempt, and the caller reports its last error.
    pub async fn pause(&mut self, deadline: Instant) -> bool {
        let delay = self.next_delay();
        sleep_until(deadline.min(Instant::now() + delay)).await;
        Instant::now() < deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_but_never_pass_the_cap() {
        let (first, max) = (Duration::from_millis(200), Duration::from_secs(5));
        let mut backoff = Backoff::new(first, max);
        let delays: Vec<Duration> = (0..50).map(|_| backoff.next_delay()).collect();
        assert!(
            delays.iter().all(|d| (first..=max).contains(d)),
            "{delays:?}"
        );
        assert!(delays[0] < first * 2);
        assert_eq!(delays[49], max);
    }

    /// A pause ends at the deadline at the latest, and says that no time is left.
    #[tokio::test(start_paused = true)]
    async fn a_pause_never_passes_the_deadline() {
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(10));
        let deadline = Instant::now() + Duration::from_secs(1);
        assert!(!backoff.pause(deadline).await);
        assert_eq!(Instant::now(), deadline);
    }
}
