//! Regions and zones: how near each replica is (its tier by labels, its
//! measured round trip within a tier) and the choice among the nearest
//! replicas that can serve a read. The rule is documented on
//! [`ClusterBuilder::local_region`](super::ClusterBuilder::local_region).

use std::time::Duration;

use super::balance::{Candidate, choose_replica};
use super::config::Options;
use super::node::Node;

/// A replica in the local zone (of the local region, if one is set).
pub(crate) const LOCAL_ZONE: u8 = 0;
/// A replica in the local region (every replica when no region is set).
pub(crate) const LOCAL_REGION: u8 = 1;
/// A replica in another region, or with no region label while the cluster
/// has one.
pub(crate) const REMOTE: u8 = 2;

/// Slack added to twice the nearest round trip of a tier: replicas within
/// it count as near (local round trips are tenths of a millisecond and
/// noisy).
const RTT_SLACK: Duration = Duration::from_millis(2);

/// How near `node` is by its labels.
pub(crate) fn tier(options: &Options, node: &Node) -> u8 {
    if let Some(region) = &options.region
        && node.region.as_ref() != Some(region)
    {
        return REMOTE;
    }
    match &options.zone {
        Some(zone) if node.zone.as_ref() == Some(zone) => LOCAL_ZONE,
        _ => LOCAL_REGION,
    }
}

/// A candidate for a read with its node index and tier.
pub(crate) type Tiered = (usize, Candidate, u8);

/// Picks among `candidates` (node index, candidate, tier): the nearest
/// tier that has one, except that while its replicas are being re-admitted
/// a share of reads (one minus the ratio of the tiers' weights) stays on
/// the next tier; within the tier, replicas more than twice as far as the
/// nearest measured one (plus [`RTT_SLACK`]) are left out and the
/// balancer picks among the rest. Returns the node index and its tier.
pub(crate) fn pick_nearest(candidates: &[Tiered], random: impl Fn() -> u64) -> Option<(usize, u8)> {
    let mut tiers: Vec<u8> = candidates.iter().map(|c| c.2).collect();
    tiers.sort_unstable();
    tiers.dedup();
    let weight = |t: u8| {
        candidates
            .iter()
            .filter(|c| c.2 == t)
            .map(|c| c.1.weight.clamp(0.0, 1.0))
            .fold(0.0, f64::max)
    };
    for (n, &t) in tiers.iter().enumerate() {
        if let Some(&next) = tiers.get(n + 1) {
            let (here, there) = (weight(t), weight(next));
            if here < there {
                let dice = (random() % 10_000) as f64 / 10_000.0;
                if dice >= here / there {
                    continue;
                }
            }
        }
        let in_tier: Vec<&Tiered> = candidates.iter().filter(|c| c.2 == t).collect();
        let nearest = in_tier
            .iter()
            .map(|c| c.1.rtt)
            .filter(|r| !r.is_zero())
            .min();
        let near: Vec<&Tiered> = match nearest {
            Some(nearest) => in_tier
                .into_iter()
                .filter(|c| c.1.rtt.is_zero() || c.1.rtt <= nearest * 2 + RTT_SLACK)
                .collect(),
            None => in_tier,
        };
        let only: Vec<Candidate> = near.iter().map(|c| c.1).collect();
        return choose_replica(&only, random()).map(|i| (near[i].0, t));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(index: usize, tier: u8, rtt_ms: u64, weight: f64) -> Tiered {
        (
            index,
            Candidate {
                in_flight: 0,
                latency: Duration::ZERO,
                rtt: Duration::from_millis(rtt_ms),
                lag: Duration::ZERO,
                weight,
                same_zone: false,
            },
            tier,
        )
    }

    fn counts(candidates: &[Tiered], rounds: u64) -> Vec<u64> {
        let mut counts = vec![0; 8];
        let x = std::cell::Cell::new(0x9E37_79B9_7F4A_7C15_u64);
        let random = || {
            let mut v = x.get();
            v ^= v << 13;
            v ^= v >> 7;
            v ^= v << 17;
            x.set(v);
            v
        };
        for _ in 0..rounds {
            let (i, _) = pick_nearest(candidates, random).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn the_nearest_tier_serves_and_the_far_one_only_when_it_is_alone() {
        let all = [c(0, LOCAL_REGION, 1, 1.0), c(1, REMOTE, 80, 1.0)];
        assert_eq!(counts(&all, 500)[1], 0);
        let remote_only = [c(1, REMOTE, 80, 1.0)];
        assert_eq!(counts(&remote_only, 10)[1], 10);
        let zone = [c(0, LOCAL_REGION, 1, 1.0), c(2, LOCAL_ZONE, 1, 1.0)];
        assert_eq!(counts(&zone, 500)[2], 500);
        assert_eq!(pick_nearest(&[], || 1), None);
    }

    #[test]
    fn within_a_tier_the_measured_round_trip_decides() {
        // Two remote regions: 40 ms and 120 ms away.
        let far = [
            c(1, REMOTE, 120, 1.0),
            c(2, REMOTE, 40, 1.0),
            c(3, REMOTE, 40, 1.0),
        ];
        let n = counts(&far, 1000);
        assert_eq!(n[1], 0, "{n:?}");
        assert!(n[2] > 100 && n[3] > 100, "{n:?}");
        // Unmeasured: kept (it gets measured).
        let unmeasured = [c(1, REMOTE, 0, 1.0), c(2, REMOTE, 40, 1.0)];
        assert!(counts(&unmeasured, 1000)[1] > 0);
    }

    #[test]
    fn a_tier_coming_back_gets_its_share_gradually() {
        let ramping = |w| [c(0, LOCAL_REGION, 1, w), c(1, REMOTE, 80, 1.0)];
        let at_start = counts(&ramping(0.1), 2000)[0];
        let half_way = counts(&ramping(0.5), 2000)[0];
        let full = counts(&ramping(1.0), 2000)[0];
        assert!(
            at_start < half_way && half_way < full,
            "{at_start} {half_way} {full}"
        );
        assert!((100..400).contains(&at_start), "{at_start}");
        assert_eq!(full, 2000);
        // Every tier ramping together (a start): the nearest serves.
        let together = [c(0, LOCAL_REGION, 1, 0.1), c(1, REMOTE, 80, 0.1)];
        assert_eq!(counts(&together, 500)[0], 500);
    }
}
