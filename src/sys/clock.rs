//! The monotonic clock as the storage code reads it, behind a trait so that a test can move it on
//! (a lease left unrenewed for its whole time) without waiting that long.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The monotonic clock plus whatever time a test has moved it on.
#[derive(Debug, Default)]
pub struct SteppedClock {
    ahead: Mutex<Duration>,
}

impl SteppedClock {
    /// Moves this clock `by` ahead of the real one, for good.
    pub fn advance(&self, by: Duration) {
        *self.ahead.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

impl Clock for SteppedClock {
    fn now(&self) -> Instant {
        Instant::now() + *self.ahead.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stepped_clock_runs_with_the_real_one_and_ahead_by_what_it_was_moved() {
        let c = SteppedClock::default();
        let before = Instant::now();
        c.advance(Duration::from_secs(30));
        let now = c.now();
        assert!(now >= before + Duration::from_secs(30));
        assert!(now < Instant::now() + Duration::from_secs(31));
    }
}
