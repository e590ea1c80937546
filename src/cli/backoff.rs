//! Waits between attempts: from a quarter second, doubling up to ten, with
//! some jitter so that clients that lost one server (or found it busy) do
//! not all come back at the same instant.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(250);
const MAX: Duration = Duration::from_secs(10);

pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: FIRST }
    }
}

impl Backoff {
    /// How long to wait before the next attempt.
    pub fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(MAX);
        delay.mul_f64(rand::random_range(0.8..1.2))
    }

    /// The last attempt worked: the next wait is short again.
    pub fn reset(&mut self) {
        self.next = FIRST;
    }
}
