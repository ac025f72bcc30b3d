//! Replica choice: power of two choices over in-flight requests × EWMA
//! latency, penalised by lag, scaled by a re-admission ramp, same zone first.

use std::time::Duration;

/// What the balancer knows about one eligible replica.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Requests running on it now.
    pub in_flight: u64,
    /// Smoothed query latency.
    pub latency: Duration,
    /// The monitor's smoothed probe round trip (zero: not measured).
    pub rtt: Duration,
    /// Replication lag (zero when caught up).
    pub lag: Duration,
    /// Its share after re-admission, from a small floor up to 1.0.
    pub weight: f64,
    /// In the caller's zone.
    pub same_zone: bool,
}

/// How much one second of lag multiplies a replica's cost.
const LAG_PENALTY_PER_SECOND: f64 = 4.0;

impl Candidate {
    /// The cost P2C compares: lower is better. (The re-admission weight is
    /// applied after the comparison, as a probability.) The latency counts
    /// for at least the round trip: an estimate that decayed while the
    /// node was not used never makes a far node look near.
    pub fn cost(&self) -> f64 {
        let latency = self.latency.max(self.rtt).as_secs_f64().max(1e-6);
        let lag = 1.0 + self.lag.as_secs_f64() * LAG_PENALTY_PER_SECOND;
        (self.in_flight as f64 + 1.0) * latency * lag
    }
}

/// Picks a replica by power of two choices: two distinct candidates drawn
/// with `random`, the cheaper wins. Candidates in the caller's zone are
/// preferred whenever there is one. `None` when `candidates` is empty.
pub fn choose_replica(candidates: &[Candidate], random: u64) -> Option<usize> {
    let local = candidates.iter().filter(|c| c.same_zone).count();
    let pool: Vec<usize> = if local > 0 {
        (0..candidates.len())
            .filter(|&i| candidates[i].same_zone)
            .collect()
    } else {
        (0..candidates.len()).collect()
    };
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let a = (random % n as u64) as usize;
            let mut b = ((random >> 32) % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            let (a, b) = (pool[a], pool[b]);
            // The cheaper wins; a tie keeps the random pick.
            let (winner, loser) = if candidates[b].cost() < candidates[a].cost() {
                (b, a)
            } else {
                (a, b)
            };
            // A node being re-admitted wins against a node further along
            // its ramp only with the ratio of their weights as probability,
            // so its share ramps up instead of jumping back to full; nodes
            // at the same point of the ramp (all of them after a start or a
            // shared outage) compare by cost alone.
            let (w_win, w_lose) = (
                candidates[winner].weight.clamp(0.0, 1.0),
                candidates[loser].weight.clamp(0.0, 1.0),
            );
            if w_win >= w_lose {
                return Some(winner);
            }
            let dice =
                (crate::random::mix(random ^ 0x9E37_79B9_7F4A_7C15) % 10_000) as f64 / 10_000.0;
            Some(if dice < w_win / w_lose { winner } else { loser })
        }
    }
}

/// The share a node gets `since_healthy` after it became healthy again:
/// from 10% up to 100% over `ramp`.
pub fn ramp_weight(since_healthy: Duration, ramp: Duration) -> f64 {
    if ramp.is_zero() {
        return 1.0;
    }
    (since_healthy.as_secs_f64() / ramp.as_secs_f64()).clamp(0.1, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(in_flight: u64, latency_ms: u64) -> Candidate {
        Candidate {
            in_flight,
            latency: Duration::from_millis(latency_ms),
            rtt: Duration::ZERO,
            lag: Duration::ZERO,
            weight: 1.0,
            same_zone: false,
        }
    }

    fn shares(cands: &[Candidate], rounds: u64) -> Vec<u64> {
        let mut counts = vec![0; cands.len()];
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..rounds {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            counts[choose_replica(cands, x).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn load_steers_choices() {
        let counts = shares(&[c(0, 1), c(10, 1)], 1000);
        assert_eq!(counts[1], 0, "with two candidates P2C always compares both");
        let counts = shares(&[c(0, 1), c(0, 1), c(50, 1)], 3000);
        assert!(
            counts[2] < counts[0] / 5,
            "the loaded replica is avoided: {counts:?}"
        );
    }

    #[test]
    fn latency_steers_choices() {
        let counts = shares(&[c(0, 1), c(0, 20), c(0, 1)], 3000);
        assert!(counts[1] < 100, "the slow replica is avoided: {counts:?}");
    }

    #[test]
    fn it_is_not_round_robin() {
        // Equal candidates: P2C spreads, but not in a fixed cycle.
        let cands = [c(0, 1), c(0, 1), c(0, 1)];
        let mut x = 1u64;
        let picks: Vec<usize> = (0..30)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                choose_replica(&cands, x).unwrap()
            })
            .collect();
        let cyclic = picks.windows(2).all(|w| w[1] == (w[0] + 1) % 3);
        assert!(!cyclic);
        let counts = shares(&cands, 3000);
        assert!(counts.iter().all(|&n| n > 600), "{counts:?}");
    }

    #[test]
    fn a_tie_is_settled_by_the_draw_and_any_difference_by_the_cost() {
        // Equal costs: each of two wins about half of the draws.
        let counts = shares(&[c(0, 1), c(0, 1)], 2000);
        assert!(counts.iter().all(|&n| n > 800), "{counts:?}");
        // No tolerance band: 5% cheaper always wins against one other.
        let counts = shares(&[c(0, 100), c(0, 95)], 2000);
        assert_eq!(counts, [0, 2000]);
    }

    #[test]
    fn a_lagging_replica_is_penalised() {
        let mut lagging = c(0, 1);
        lagging.lag = Duration::from_secs(2);
        let counts = shares(&[c(1, 1), lagging], 1000);
        assert_eq!(
            counts[1], 0,
            "2 s of lag costs more than one request in flight"
        );
    }

    #[test]
    fn readmission_ramps_up() {
        let ramp = Duration::from_secs(10);
        let w0 = ramp_weight(Duration::ZERO, ramp);
        let w5 = ramp_weight(Duration::from_secs(5), ramp);
        let w10 = ramp_weight(Duration::from_secs(10), ramp);
        assert!(w0 < w5 && w5 < w10 && (w10 - 1.0).abs() < f64::EPSILON);
        let mut fresh = c(0, 1);
        fresh.weight = w0;
        let mut half = c(0, 1);
        half.weight = w5;
        let at_start = shares(&[c(0, 1), c(0, 1), fresh], 3000)[2];
        let half_way = shares(&[c(0, 1), c(0, 1), half], 3000)[2];
        let full = shares(&[c(0, 1), c(0, 1), c(0, 1)], 3000)[2];
        assert!(
            at_start < half_way && half_way <= full,
            "{at_start} {half_way} {full}"
        );
        assert!(at_start < full / 3, "not a jump back to a full share");
    }

    #[test]
    fn ramping_together_still_prefers_the_cheaper() {
        // After a start or a shared outage every replica ramps at once: the
        // cheaper one must still get most reads.
        let mut a = c(0, 1);
        a.weight = 0.1;
        let mut b = c(10, 1);
        b.weight = 0.1;
        let counts = shares(&[a, b], 2000);
        assert_eq!(counts[1], 0, "{counts:?}");
    }

    #[test]
    fn same_zone_first() {
        let mut near = c(5, 5);
        near.same_zone = true;
        let counts = shares(&[c(0, 1), near, c(0, 1)], 500);
        assert_eq!(counts[1], 500);
        assert_eq!(choose_replica(&[], 1), None);
    }
}
