//! The per-connection frame budget: a token bucket for frames, and a count
//! of refusals that forgives only slowly, so that a client that keeps
//! sending past its budget is closed however it paces itself.

use std::time::Instant;

pub(super) struct RateLimit {
    tokens: f64,
    last: Instant,
    per_second: f64,
    burst: f64,
    /// Refused frames, less one per [`FORGIVE_EVERY_SECS`].
    refused: f64,
}

/// A refusal is forgotten after this long: a client that is refused more
/// often than once a minute, on average, is closed eventually.
const FORGIVE_EVERY_SECS: f64 = 60.0;

/// What to do with a frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Allow,
    Refuse,
    /// Refused once too often: close the connection.
    Close,
}

impl RateLimit {
    pub(super) fn new(per_second: u32, burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            last: Instant::now(),
            per_second: per_second as f64,
            burst: burst as f64,
            refused: 0.0,
        }
    }

    pub(super) fn check(&mut self) -> Verdict {
        self.check_at(Instant::now())
    }

    fn check_at(&mut self, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.refused = (self.refused - elapsed / FORGIVE_EVERY_SECS).max(0.0);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        self.refused += 1.0;
        if self.refused > self.burst {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Frames sent at `rate` per second for `secs`: the verdict that ended it.
    fn paced(rate: f64, secs: f64) -> (Verdict, f64) {
        let mut limit = RateLimit::new(50, 200);
        let start = limit.last;
        let step = Duration::from_secs_f64(1.0 / rate);
        let mut now = start;
        while now.duration_since(start).as_secs_f64() < secs {
            now += step;
            if limit.check_at(now) == Verdict::Close {
                return (Verdict::Close, now.duration_since(start).as_secs_f64());
            }
        }
        (Verdict::Allow, secs)
    }

    #[test]
    fn a_flood_is_closed_whatever_its_pace() {
        // Ten times the budget: closed within a second.
        assert!(matches!(paced(500.0, 60.0), (Verdict::Close, t) if t < 1.0));
        // Just above it (one frame in 51 refused): the burst lasts 200 s,
        // then refusals pile up: closed within about 400 s.
        assert!(matches!(paced(51.0, 900.0), (Verdict::Close, t) if t < 450.0));
    }

    #[test]
    fn within_the_budget_nothing_is_refused() {
        assert_eq!(paced(49.0, 600.0).0, Verdict::Allow);
    }
}
