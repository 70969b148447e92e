//! Storage identity (see ARCHITECTURE.md, "Storage identity"): which replicas count, how a
//! leader notices a member that came back on other storage or with an older copy of its own,
//! and the demotion and promotion that rebuild it.

use super::*;

impl RaftNode {
    /// Whether `conf` knows this replica by its own storage (or not yet by any).
    pub(super) fn disk_ok(&self, conf: &Configuration) -> bool {
        let d = conf.disk(self.id);
        d == 0 || d == self.disk || self.cfg.broken_rule == BrokenRule::AmnesiacVotes
    }

    /// Leader: whether `id`'s answers count toward quorums (commit, ReadIndex,
    /// lease, check-quorum): it answers with the disk id the configuration
    /// binds it to. Unbound members never count; a leader binds every voter
    /// in the first entry of its term.
    pub(super) fn counts(&self, id: NodeId) -> bool {
        if id == self.id {
            return true;
        }
        let bound = self.conf().disk(id);
        self.progress.get(&id).is_some_and(|p| {
            (bound != 0 && p.disk == bound && !p.forgot)
                || (self.cfg.broken_rule == BrokenRule::AmnesiacVotes && p.disk != 0)
        })
    }

    /// Leader: `id` answered from storage that is not the one it acknowledged
    /// with (another disk id than its binding, or one that lost entries).
    pub(super) fn replaced(&self, id: NodeId) -> bool {
        let bound = self.conf().disk(id);
        self.progress
            .get(&id)
            .is_some_and(|p| p.forgot || (p.disk != 0 && bound != 0 && p.disk != bound))
    }

    /// Leader: a response from `from` carried disk id `disk`, stamped with
    /// `round`. A different storage than the one tracked (or bound) is a new
    /// replica: its progress starts over, probing from scratch, and a voter is
    /// demoted to a rebuilding learner by [`RaftNode::maybe_rebuild`]. Unless
    /// the answer is stamped with no later round than the tracked disk's
    /// latest: then it comes from an earlier life of the follower (a message
    /// delayed across its restart on new storage), and `false` says to drop it.
    pub(super) fn observe_disk(&mut self, from: NodeId, disk: DiskId, round: u64) -> bool {
        let bound = self.conf().disk(from);
        let next = self.log.last_index() + 1;
        let Some(p) = self.progress.get_mut(&from) else {
            return true;
        };
        if p.disk == disk {
            p.disk_round = p.disk_round.max(round);
            return true;
        }
        if p.disk != 0 && round <= p.disk_round {
            return false;
        }
        let changed = p.disk != 0 || (bound != 0 && bound != disk);
        if changed && self.cfg.broken_rule != BrokenRule::AmnesiacVotes {
            *p = Progress::new(next);
            self.settled_round = self.round;
        }
        let p = self.progress.get_mut(&from).expect("progress");
        p.disk = disk;
        p.disk_round = round;
        if changed {
            self.maybe_rebuild();
        }
        true
    }

    /// Leader: `from` answered, in a round after the one that showed it
    /// holding `match_index`, with a log that lacks entries it acknowledged:
    /// its storage went back in time (restored from an older copy). It is
    /// rebuilt like a replaced disk.
    pub(super) fn forgot(&mut self, from: NodeId) {
        if self.cfg.broken_rule == BrokenRule::AmnesiacVotes {
            return;
        }
        let next = self.log.last_index() + 1;
        let Some(p) = self.progress.get_mut(&from) else {
            return;
        };
        let (disk, disk_round) = (p.disk, p.disk_round);
        *p = Progress::new(next);
        p.disk = disk;
        p.disk_round = disk_round;
        p.forgot = true;
        self.settled_round = self.round;
        self.maybe_rebuild();
    }

    /// Leader: starts the next step of rebuilding a member, when no other
    /// membership change is running: a voter answering from replaced storage
    /// becomes a learner bound to its new disk id and marked rebuilding (one
    /// voter removed: a single-server change); a rebuilding learner that
    /// holds everything committed becomes a voter again through the ordinary
    /// catch-up and configuration change.
    pub(super) fn maybe_rebuild(&mut self) {
        if self.role != Role::Leader
            || self.conf_change.is_some()
            || self.conf().is_joint()
            || self.conf_uncommitted()
            || self.transfer.is_some()
            || !self.committed_in_term()
        {
            return;
        }
        let conf = self.conf().clone();
        let replaced = conf
            .all_voters()
            .into_iter()
            .find(|v| *v != self.id && self.replaced(*v));
        if let Some(v) = replaced {
            let disk = self.progress[&v].disk;
            let mut target = conf;
            target.voters.remove(&v);
            target.learners.insert(v);
            target.disks.insert(v, disk);
            target.rebuilding.insert(v);
            if matches!(self.change_conf(target), Ok(ConfChangeStart::Started)) {
                if let Some(p) = self.progress.get_mut(&v) {
                    p.forgot = false;
                }
            }
            return;
        }
        // A rebuilding learner bound to other storage than it answers from (demoted on an
        // answer from an earlier life, or wiped again): bind it to what it answers from.
        // Learners count in no quorum, so the binding may change in one entry.
        let rebound = conf.rebuilding.iter().copied().find(|l| {
            self.progress
                .get(l)
                .is_some_and(|p| p.disk != 0 && p.disk != conf.disk(*l))
        });
        if let Some(l) = rebound {
            let mut target = conf;
            target.disks.insert(l, self.progress[&l].disk);
            let _ = self.change_conf(target);
            return;
        }
        let commit = self.commit;
        let rebuilt = conf.rebuilding.iter().copied().find(|l| {
            self.progress.get(l).is_some_and(|p| {
                p.disk == conf.disk(*l) && !p.forgot && p.match_index >= commit && p.match_index > 0
            })
        });
        if let Some(l) = rebuilt {
            let mut target = conf;
            target.learners.remove(&l);
            target.rebuilding.remove(&l);
            target.voters.insert(l);
            let _ = self.change_conf(target);
        }
    }

    /// Binds the members of `conf` for the configuration entry that follows
    /// `current`: a voter of both keeps its binding (moving a voter to other
    /// storage in one step could give the old and the new configuration
    /// disjoint quorums, so that goes through demotion and promotion instead);
    /// a new voter is bound to the disk id it answers with; a learner keeps
    /// the binding `conf` gives it (a demoted voter's new disk), else the one
    /// it answers with.
    pub(super) fn bind_new_members(&self, conf: &mut Configuration, current: &Configuration) {
        for id in conf.all_members() {
            let answered = if id == self.id {
                self.disk
            } else {
                self.progress.get(&id).map_or(0, |p| p.disk)
            };
            let disk = if conf.is_voter(id) && current.is_voter(id) && current.disk(id) != 0 {
                current.disk(id)
            } else if conf.is_voter(id) || conf.disk(id) == 0 {
                answered
            } else {
                conf.disk(id)
            };
            if disk != 0 {
                conf.disks.insert(id, disk);
            }
        }
        conf.retain_members();
    }

    /// Whether this replica may vote for `m`'s candidate as far as storage
    /// identities go: the candidate knows it by its disk id (or by none yet),
    /// and its own configuration still counts it as the member it names. What
    /// this replica binds the candidate to is not asked: a stale voter may know
    /// a rebuilt candidate by its old disk while the candidate's newer log binds
    /// it to the new one, and refusing it then can leave no electable
    /// candidate. A candidate on other storage than its own configuration
    /// binds does not campaign (`can_campaign`), and one with an empty or old
    /// log fails the log check.
    pub(super) fn vote_identity_ok(&self, m: &Message) -> bool {
        if self.cfg.broken_rule == BrokenRule::AmnesiacVotes {
            return true;
        }
        (m.to_disk == 0 || m.to_disk == self.disk) && self.disk_ok(self.conf())
    }
}
