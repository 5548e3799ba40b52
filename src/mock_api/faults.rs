//! Fault injection: which requests get latency, a dropped connection, a
//! 500 or a 429, decided per request by a seeded RNG.
//!
//! Every decision draws the same four numbers from the RNG whatever the
//! rates are, so a given seed yields the same sequence of faults for the
//! same sequence of requests, even across `set_faults` changes.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Answered normally.
    None,
    /// Connection closed without an answer, nothing applied.
    DropBefore,
    /// Records applied, then the connection closed without an answer.
    DropAfter,
    /// `500 {"error":"internal"}`.
    Fail,
    /// `429` with `Retry-After: 1`.
    Throttle,
}

/// Current fault rates and the RNG.
pub(crate) struct Faults {
    pub fail_rate: f64,
    pub throttle_rate: f64,
    pub drop_rate: f64,
    pub latency: Duration,
    rng: StdRng,
}

impl Faults {
    /// Rates as given; the RNG seeded with `seed`.
    pub fn new(
        fail_rate: f64,
        throttle_rate: f64,
        drop_rate: f64,
        latency: Duration,
        seed: u64,
    ) -> Self {
        Faults {
            fail_rate,
            throttle_rate,
            drop_rate,
            latency,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Decides the fate of the next request: its added latency and fault.
    /// Order of precedence: drop, then fail, then throttle.
    pub fn decide(&mut self) -> (Duration, Fault) {
        let drop: f64 = self.rng.random();
        let after: bool = self.rng.random();
        let fail: f64 = self.rng.random();
        let throttle: f64 = self.rng.random();
        let fault = if drop < self.drop_rate {
            if after {
                Fault::DropAfter
            } else {
                Fault::DropBefore
            }
        } else if fail < self.fail_rate {
            Fault::Fail
        } else if throttle < self.throttle_rate {
            Fault::Throttle
        } else {
            Fault::None
        };
        (self.latency, fault)
    }
}

/// Checks a rate is a share in `0..=1`.
pub(crate) fn check_rate(name: &str, rate: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&rate) {
        Ok(rate)
    } else {
        Err(format!("{name} must be between 0 and 1 (e.g. 0.05)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_zero_and_one_and_determinism() {
        let mut f = Faults::new(0.0, 0.0, 0.0, Duration::ZERO, 1);
        assert!((0..100).all(|_| f.decide().1 == Fault::None));
        let mut f = Faults::new(1.0, 1.0, 0.0, Duration::ZERO, 1);
        assert!((0..100).all(|_| f.decide().1 == Fault::Fail));
        let mut f = Faults::new(0.0, 1.0, 0.0, Duration::ZERO, 1);
        assert!((0..100).all(|_| f.decide().1 == Fault::Throttle));
        let mut f = Faults::new(0.0, 0.0, 1.0, Duration::ZERO, 1);
        let drops: Vec<Fault> = (0..100).map(|_| f.decide().1).collect();
        assert!(drops.contains(&Fault::DropAfter) && drops.contains(&Fault::DropBefore));
        let seq = |seed| {
            let mut f = Faults::new(0.3, 0.3, 0.3, Duration::ZERO, seed);
            (0..50).map(|_| f.decide().1).collect::<Vec<_>>()
        };
        assert_eq!(seq(7), seq(7));
        assert_ne!(seq(7), seq(8));
        assert!(check_rate("fail_rate", 1.5).is_err());
        assert!(check_rate("fail_rate", f64::NAN).is_err());
    }
}
