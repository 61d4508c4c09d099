//! Where a training step's time goes: data wait, encode (CLIP and the VAE), forward (UNet and
//! loss), backward, all-reduce and optimizer.
//!
//! On a GPU the host only queues work, so a phase's time is known only if the host waits for the
//! device at the phase's end. [`PhaseClock`] does that on the steps it is told to time (every
//! `train.time_phases_every` optimizer steps) and on no other: an untimed step never waits. The
//! all-reduce phase is the part of the gradient averaging that did not overlap the backward pass
//! (with the c10d Reducer most of it runs inside `backward`).

use std::time::Instant;

use tch::Device;

use crate::device::synchronize;

/// Seconds per phase of one optimizer step (summed over its accumulation window).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PhaseSeconds {
    pub data_wait: f64,
    pub encode: f64,
    pub forward: f64,
    pub backward: f64,
    pub all_reduce: f64,
    pub optimizer: f64,
}

impl PhaseSeconds {
    pub fn total(&self) -> f64 {
        self.data_wait
            + self.encode
            + self.forward
            + self.backward
            + self.all_reduce
            + self.optimizer
    }

    /// Adds another micro-batch's phases.
    pub fn add(&mut self, other: &PhaseSeconds) {
        self.data_wait += other.data_wait;
        self.encode += other.encode;
        self.forward += other.forward;
        self.backward += other.backward;
        self.all_reduce += other.all_reduce;
        self.optimizer += other.optimizer;
    }
}

/// The phases of [`PhaseSeconds`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    DataWait,
    Encode,
    Forward,
    Backward,
    AllReduce,
    Optimizer,
}

/// Times the phases of one micro-batch when enabled; otherwise every call is free.
#[derive(Debug)]
pub struct PhaseClock {
    device: Device,
    enabled: bool,
    lap_started: Instant,
    seconds: PhaseSeconds,
}

impl PhaseClock {
    /// Starts the clock. When enabled it first waits for the device, so the step's phases do
    /// not include work queued by earlier steps.
    pub fn start(device: Device, enabled: bool) -> Self {
        if enabled {
            synchronize(device);
        }
        Self {
            device,
            enabled,
            lap_started: Instant::now(),
            seconds: PhaseSeconds::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Ends `phase`: waits for the device and books the time since the last lap.
    pub fn lap(&mut self, phase: Phase) {
        if !self.enabled {
            return;
        }
        synchronize(self.device);
        let now = Instant::now();
        let seconds = now.duration_since(self.lap_started).as_secs_f64();
        self.lap_started = now;
        let slot = match phase {
            Phase::DataWait => &mut self.seconds.data_wait,
            Phase::Encode => &mut self.seconds.encode,
            Phase::Forward => &mut self.seconds.forward,
            Phase::Backward => &mut self.seconds.backward,
            Phase::AllReduce => &mut self.seconds.all_reduce,
            Phase::Optimizer => &mut self.seconds.optimizer,
        };
        *slot += seconds;
    }

    /// The phases timed so far; `None` when the clock is off.
    pub fn seconds(&self) -> Option<PhaseSeconds> {
        self.enabled.then_some(self.seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disabled_clock_books_nothing() {
        let mut clock = PhaseClock::start(Device::Cpu, false);
        clock.lap(Phase::Forward);
        assert_eq!(clock.seconds(), None);
    }

    #[test]
    fn laps_book_the_time_since_the_previous_lap_to_their_phase() {
        let mut clock = PhaseClock::start(Device::Cpu, true);
        std::thread::sleep(std::time::Duration::from_millis(20));
        clock.lap(Phase::DataWait);
        clock.lap(Phase::Forward);
        std::thread::sleep(std::time::Duration::from_millis(10));
        clock.lap(Phase::Forward);
        let seconds = clock.seconds().unwrap();
        assert!(seconds.data_wait >= 0.02, "{seconds:?}");
        assert!(seconds.forward >= 0.01, "{seconds:?}");
        assert_eq!(seconds.backward, 0.0);
        let mut sum = PhaseSeconds::default();
        sum.add(&seconds);
        sum.add(&seconds);
        assert!((sum.total() - 2.0 * seconds.total()).abs() < 1e-12);
    }
}
