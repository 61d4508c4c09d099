//! The time the membership logic reads: passed in, so its decisions (lost workers, timed
//! checkpoints, group settling) are unit-testable without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// Where the membership logic reads the time.
pub trait Clock: Send + Sync {
    /// Monotonic time, for timeouts and rates.
    fn now(&self) -> Instant;
    /// Wall-clock time, for the events shown to people.
    fn wall(&self) -> SystemTime;
}

/// The process's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    wall_start: SystemTime,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_284_354),
            elapsed: Mutex::new(Duration::ZERO),
        }
    }

    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn wall(&self) -> SystemTime {
        self.wall_start + self.elapsed()
    }
}
