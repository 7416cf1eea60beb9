//! How many spare addresses a node's pod starts call for (pure: the
//! reserve in [`crate::reserve`] feeds it the instants of its takes and
//! asks it for a target).
//!
//! A spare exists so that a pod start waits for no write to the API
//! server. One start at a time needs one spare, refilled long before the
//! next; what runs a node dry is a burst: a Deployment scaled up puts tens
//! of pods on a node within a second, and every start past the last spare
//! waits for a direct assign. So the target follows the largest burst seen
//! recently (takes within [`BURST_WINDOW`] of each other), twice over so
//! that a burst a little larger than the last is still covered while the
//! refill runs behind it, between the operator's floor (`--ipam-spares`)
//! and ceiling (`--ipam-spares-max`). The peak is halved every hold
//! period ([`HOLD`] by default) without a larger burst: a node that has
//! gone quiet gives its extra spares back to the pool within minutes, not
//! at once (a burst often comes again: a rollout, a job's next wave).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Takes this close together count as one burst.
pub const BURST_WINDOW: Duration = Duration::from_secs(2);

/// How long a peak holds before it is halved, by default.
pub const HOLD: Duration = Duration::from_secs(120);

/// The recent takes and the peak burst.
#[derive(Debug)]
pub struct Demand {
    /// The floor (0: the fast path is off, no spares at all).
    min: usize,
    /// The ceiling (never below the floor).
    max: usize,
    /// How long a peak holds before it is halved.
    hold: Duration,
    /// Instants of the takes within [`BURST_WINDOW`] of the last.
    recent: VecDeque<Instant>,
    /// The largest burst remembered.
    peak: usize,
    /// When the peak was set or last halved.
    peak_at: Option<Instant>,
}

impl Demand {
    /// No demand seen yet: targets between `min` and `max` (never below
    /// `min`; 0 throughout when `min` is 0), a peak holding for `hold`.
    pub fn new(min: usize, max: usize, hold: Duration) -> Self {
        Self {
            min,
            max: if min == 0 { 0 } else { max.max(min) },
            hold,
            recent: VecDeque::new(),
            peak: 0,
            peak_at: None,
        }
    }

    /// Remembers a burst of `n` at `now` (a restarted agent that adopted
    /// `2n` spares keeps them for a hold period).
    pub fn seed(&mut self, n: usize, now: Instant) {
        self.peak = n;
        self.peak_at = Some(now);
    }

    /// The most spares any demand calls for.
    pub fn ceiling(&self) -> usize {
        self.max
    }

    /// A pod took addresses at `now`.
    pub fn took(&mut self, now: Instant) {
        self.recent.push_back(now);
        while let Some(first) = self.recent.front()
            && now.saturating_duration_since(*first) > BURST_WINDOW
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.peak {
            self.peak = self.recent.len();
            self.peak_at = Some(now);
        }
    }

    /// The spares to keep at `now`: twice the peak burst, between the
    /// floor and the ceiling.
    pub fn target(&mut self, now: Instant) -> usize {
        if self.min == 0 {
            return 0;
        }
        while let Some(at) = self.peak_at
            && self.peak > 0
            && now.saturating_duration_since(at) >= self.hold
        {
            self.peak /= 2;
            self.peak_at = Some(at + self.hold);
        }
        self.peak.saturating_mul(2).clamp(self.min, self.max)
    }

    /// The peak burst remembered (for status).
    pub fn peak(&self) -> usize {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn one_start_at_a_time_keeps_the_floor() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, 32, HOLD);
        for i in 0..100 {
            d.took(t0 + Duration::from_secs(3 * i));
        }
        assert_eq!(d.peak(), 1);
        assert_eq!(d.target(t0 + Duration::from_secs(300)), 8);
    }

    #[test]
    fn a_burst_raises_the_target_to_twice_it_within_the_ceiling() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, 32, HOLD);
        let mut low = Demand::new(8, 4, HOLD);
        for i in 0..10 {
            d.took(t0 + ms(50 * i));
        }
        assert_eq!(d.target(t0 + ms(600)), 20);
        for i in 10..40 {
            d.took(t0 + ms(50 * i));
            low.took(t0 + ms(50 * i));
        }
        assert_eq!(d.peak(), 40);
        assert_eq!(d.target(t0 + ms(2100)), 32, "the ceiling holds");
        assert_eq!(low.ceiling(), 8);
        assert_eq!(low.target(t0 + ms(2100)), 8, "never below the floor");
    }

    #[test]
    fn takes_further_apart_than_the_window_are_not_one_burst() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, 32, HOLD);
        d.took(t0);
        d.took(t0 + BURST_WINDOW + ms(1));
        d.took(t0 + 2 * BURST_WINDOW + ms(2));
        assert_eq!(d.peak(), 1);
    }

    #[test]
    fn a_quiet_node_halves_its_peak_every_hold() {
        let t0 = Instant::now();
        let mut d = Demand::new(4, 64, HOLD);
        for i in 0..16 {
            d.took(t0 + ms(10 * i));
        }
        assert_eq!(d.target(t0 + HOLD - ms(1)), 32);
        assert_eq!(d.target(t0 + HOLD + ms(200)), 16);
        assert_eq!(d.target(t0 + 3 * HOLD + ms(200)), 4);
        // Back to the floor for good, and a new burst counts again.
        assert_eq!(d.target(t0 + 10 * HOLD), 4);
        d.took(t0 + 10 * HOLD);
        d.took(t0 + 10 * HOLD + ms(1));
        d.took(t0 + 10 * HOLD + ms(2));
        assert_eq!(d.target(t0 + 10 * HOLD + ms(3)), 6);
    }

    #[test]
    fn off_is_off() {
        let t0 = Instant::now();
        let mut d = Demand::new(0, 32, HOLD);
        for i in 0..10 {
            d.took(t0 + ms(i));
        }
        assert_eq!(d.target(t0), 0);
        assert_eq!(d.ceiling(), 0);
    }

    #[test]
    fn a_seeded_peak_holds_then_decays() {
        let t0 = Instant::now();
        let mut d = Demand::new(8, 32, HOLD);
        d.seed(12, t0);
        assert_eq!(d.target(t0 + ms(1)), 24);
        assert_eq!(d.target(t0 + HOLD), 12);
    }
}
