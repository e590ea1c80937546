//! The per-connection frame rate limit (a token bucket).

use std::time::Instant;

pub(super) struct RateLimit {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
    /// Frames refused in a row; a client that keeps flooding is closed.
    pub(super) refused: u32,
}

impl RateLimit {
    pub(super) fn new(per_second: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            last: Instant::now(),
            per_second: per_second as f64,
            burst: burst as f64,
            refused: 0,
        }
    }

    pub(super) fn allow(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_second)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }
}
