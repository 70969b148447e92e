//! Rate-limited reports of traffic from nodes that are not members of a group.
//!
//! A replica removed while it was cut off never learns of its removal: it keeps campaigning
//! (a pre-vote every election timeout to each of the group's other replicas) and every one of
//! those messages is dropped here. One `warn!` per message would bury the log; none would hide
//! a misconfigured node. So the first refusal of a (group, node, kind) is reported at once, the
//! ones after it are only counted until [`REFUSAL_REPORT_INTERVAL`] has passed, and the next
//! report says how many were left unreported. Raft messages and forwarded client requests are
//! reported apart: a client using the export of a removed replica must show up in the log even
//! while that replica's campaign is being counted. Every refusal counts in the core's
//! `raft_messages_refused` counter (status and `/metrics`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use raftlog::core::types::{GroupId, NodeId};

/// What was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refused {
    RaftMessage,
    ForwardedRequest,
}

/// At most one report per (group, node, kind) in this long.
pub const REFUSAL_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Pairs remembered at most; beyond it the memory is cleared (a flood from many node ids
/// cannot grow it, at worst it reports some pairs again early).
const REFUSAL_PAIRS_MAX: usize = 4096;

#[derive(Default)]
pub struct Refusals {
    /// (group, node, kind) → (when last reported, refusals since then not reported).
    pairs: HashMap<(GroupId, NodeId, Refused), (Instant, u64)>,
}

impl Refusals {
    /// Counts one refusal of `node`'s traffic for `bg` at `now`. `Some(n)` when this one is to
    /// be reported, `n` being the refusals of its kind left unreported since the last report.
    pub fn note(&mut self, bg: GroupId, node: NodeId, what: Refused, now: Instant) -> Option<u64> {
        if let Some((at, quiet)) = self.pairs.get_mut(&(bg, node, what)) {
            if now.duration_since(*at) < REFUSAL_REPORT_INTERVAL {
                *quiet += 1;
                return None;
            }
            let n = *quiet;
            *at = now;
            *quiet = 0;
            return Some(n);
        }
        if self.pairs.len() >= REFUSAL_PAIRS_MAX {
            self.pairs.clear();
        }
        self.pairs.insert((bg, node, what), (now, 0));
        Some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_the_first_refusal_then_one_per_interval_with_the_count_left_out() {
        use Refused::*;
        let mut r = Refusals::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(r.note(7, 4, RaftMessage, t0), Some(0));
        for i in 1..=5 {
            assert_eq!(r.note(7, 4, RaftMessage, t0 + s(i)), None);
        }
        // Another node, group or kind is reported on its own.
        assert_eq!(r.note(7, 5, RaftMessage, t0 + s(2)), Some(0));
        assert_eq!(r.note(8, 4, RaftMessage, t0 + s(2)), Some(0));
        assert_eq!(r.note(7, 4, ForwardedRequest, t0 + s(2)), Some(0));
        assert_eq!(r.note(7, 4, ForwardedRequest, t0 + s(3)), None);
        let later = t0 + REFUSAL_REPORT_INTERVAL;
        assert_eq!(r.note(7, 4, RaftMessage, later), Some(5));
        assert_eq!(r.note(7, 4, RaftMessage, later + s(1)), None);
        assert_eq!(
            r.note(7, 4, RaftMessage, later + REFUSAL_REPORT_INTERVAL),
            Some(1)
        );
    }

    #[test]
    fn many_pairs_do_not_grow_the_memory_past_its_limit() {
        let mut r = Refusals::default();
        let t0 = Instant::now();
        for node in 0..(REFUSAL_PAIRS_MAX as u64 * 3) {
            assert_eq!(r.note(1, node, Refused::RaftMessage, t0), Some(0));
            assert!(r.pairs.len() <= REFUSAL_PAIRS_MAX);
        }
    }
}
