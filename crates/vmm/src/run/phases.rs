//! The phases of a run (create, launch, run, teardown): wall-clock time always, and the
//! simulated machine's cycles where the host has a clock.

use std::time::Instant;

use backend_sim::PhaseClock;
use serde::Serialize;

/// One phase.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseSummary {
    /// The phase.
    pub name: &'static str,
    /// Its wall-clock length in microseconds.
    pub wall_us: u64,
    /// Its length in simulated cycles (simulator only).
    pub cycles: Option<u64>,
    /// Its simulated length in microseconds at the cost model's clock (simulator only).
    pub us: Option<f64>,
}

/// Cuts a run into consecutive phases; each [`Phases::end`] closes the one that began where
/// the previous ended.
#[derive(Debug)]
pub struct Phases<'m> {
    start: Instant,
    wall: Vec<(&'static str, u64)>,
    clock: Option<PhaseClock<'m>>,
}

impl<'m> Phases<'m> {
    /// Wall-clock phases only.
    pub fn wall() -> Self {
        Self {
            start: Instant::now(),
            wall: Vec::new(),
            clock: None,
        }
    }

    /// Wall-clock phases and the simulated machine's, from `clock`.
    pub fn simulated(clock: PhaseClock<'m>) -> Self {
        Self {
            clock: Some(clock),
            ..Self::wall()
        }
    }

    /// Close the current phase as `name`.
    pub fn end(&mut self, name: &'static str) {
        let now = Instant::now();
        self.wall
            .push((name, now.duration_since(self.start).as_micros() as u64));
        self.start = now;
        if let Some(c) = &mut self.clock {
            c.end(name);
        }
    }

    /// The phases closed so far.
    pub fn into_phases(self) -> Vec<PhaseSummary> {
        let sim = self.clock.map(PhaseClock::into_phases).unwrap_or_default();
        self.wall
            .into_iter()
            .enumerate()
            .map(|(i, (name, wall_us))| PhaseSummary {
                name,
                wall_us,
                cycles: sim.get(i).map(|p| p.cycles),
                us: sim.get(i).map(|p| p.us),
            })
            .collect()
    }
}

impl std::fmt::Display for PhaseSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.cycles, self.us) {
            (Some(c), Some(us)) => write!(f, "{} {c} cycles ({us:.1} µs)", self.name),
            _ => write!(f, "{} {:.3} ms", self.name, self.wall_us as f64 / 1000.0),
        }
    }
}
