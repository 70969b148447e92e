//! Properties of the simulator itself: determinism, and teeth (a deliberately
//! broken rule is caught). The seed sweep runs through the `sim` binary from
//! the test command (see README).

use raftlog::core::BrokenRule;
use tests::sim::{membership_change_scenario, resumed_leader_scenario, run_seed, SimOptions};

#[test]
fn same_seed_same_trace() {
    let opts = SimOptions::default();
    for seed in [1, 42, 977] {
        let a = run_seed(seed, &opts);
        let b = run_seed(seed, &opts);
        assert!(a.violations.is_empty(), "seed {seed}: {:?}", a.violations);
        assert_eq!(
            a.trace_hash, b.trace_hash,
            "seed {seed} replayed differently"
        );
        assert_eq!(a.ops_completed, b.ops_completed);
        assert!(
            a.ops_completed > 0,
            "seed {seed} completed no client operation"
        );
    }
    assert_ne!(run_seed(1, &opts).trace_hash, run_seed(2, &opts).trace_hash);
}

/// Skipping the up-to-date log check when granting (pre-)votes lets a node
/// with a stale log win and overwrite committed entries; the simulator must
/// notice within 1,000 seeds.
#[test]
fn broken_vote_log_check_is_caught_within_1000_seeds() {
    let opts = SimOptions {
        broken_rule: BrokenRule::VoteSkipsLogCheck,
        ..SimOptions::default()
    };
    tests::sim::install_quiet_panic_hook();
    let found = (0..1000).find(|&seed| !run_seed(seed, &opts).violations.is_empty());
    assert!(
        found.is_some(),
        "no violation in 1000 seeds with the vote log check disabled"
    );
}

/// Seeds in which a new leader started a membership change before an entry
/// of its term committed, and a committed entry was lost (leader
/// completeness). A 300,000-seed sweep on 2026-12-07 found the bug (seeds
/// 7,053,530 and 7,073,735); storage identities changed every seed's run (a new
/// group's first leader binds its voters, amnesia draws), and a sweep of
/// 7,000,000..7,370,000 with the rule broken found this one again. The
/// correct core passes it; with that rule broken it fails again, so the seed
/// still builds the scenario (the scripted scenario below builds it on purpose).
#[test]
fn membership_change_regression_seeds() {
    let seeds = [7_354_608];
    for seed in seeds {
        let r = run_seed(seed, &SimOptions::default());
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
    let broken = SimOptions {
        broken_rule: BrokenRule::ConfChangeBeforeTermCommit,
        ..SimOptions::default()
    };
    tests::sim::install_quiet_panic_hook();
    for seed in seeds {
        let r = run_seed(seed, &broken);
        assert!(
            r.violations
                .iter()
                .any(|v| v.contains("leader completeness")),
            "seed {seed} no longer builds the membership change bug: {:?}",
            r.violations
        );
    }
}

/// The membership change counterexample scripted (random seeds build it about once in
/// 150,000): the correct core refuses the new leader's early change and loses nothing; with
/// the rule broken the scenario loses a committed entry in every seed that builds it.
#[test]
fn membership_change_scenario_catches_an_early_change() {
    tests::sim::install_quiet_panic_hook();
    let mut built = 0;
    for seed in 0..50 {
        let Ok(ok) = membership_change_scenario(seed, BrokenRule::None) else {
            continue;
        };
        built += 1;
        assert!(ok.violations.is_empty(), "seed {seed}: {:?}", ok.violations);
        let broken = membership_change_scenario(seed, BrokenRule::ConfChangeBeforeTermCommit)
            .unwrap_or_else(|e| panic!("seed {seed} (broken): scenario not built: {e}"));
        assert!(
            broken
                .violations
                .iter()
                .any(|v| v.contains("leader completeness")),
            "seed {seed}: an early membership change went unnoticed: {:?}",
            broken.violations
        );
    }
    assert!(
        built >= 20,
        "the scenario was built in only {built} of 50 seeds"
    );
}

/// The correct core passes a small sweep in-process too (the long sweep is
/// the `sim` binary's job).
#[test]
fn small_sweep_has_no_violations() {
    let opts = SimOptions {
        nodes: Some(5),
        ..SimOptions::default()
    };
    for seed in 0..50 {
        let r = run_seed(seed, &opts);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
    }
}

/// Half the seeds hibernate quiescent nodes (no ticks until a message, a
/// client request or a liveness change wakes them, as the engine does), so
/// the sweep checks `RaftNode::resume` and the quiescence rule under faults.
#[test]
fn hibernation_is_exercised() {
    let opts = SimOptions::default();
    let (mut seeds, mut sleeps, mut wakes) = (0, 0, 0);
    for seed in 0..200 {
        let r = run_seed(seed, &opts);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        seeds += (r.hibernations > 0) as usize;
        sleeps += r.hibernations;
        wakes += r.wakes;
    }
    assert!(seeds >= 40, "only {seeds} of 200 seeds hibernated a node");
    assert!(
        wakes > 0 && sleeps >= wakes,
        "{sleeps} hibernations, {wakes} wakes"
    );
    eprintln!("{seeds} of 200 seeds hibernated: {sleeps} hibernations, {wakes} wakes");
}

/// A leader that hibernated, was cut off in its sleep and is woken by a
/// lease read after the others elected a new leader and committed a write:
/// scripted, since random seeds rarely build it (a broken `resume` went
/// unnoticed through 20,000 random seeds). The correct core never serves
/// the read from its old lease; one that keeps the lease returns the value
/// from before the write, which the linearizability check reports.
#[test]
fn resumed_leader_scenario_catches_a_kept_lease() {
    tests::sim::install_quiet_panic_hook();
    for seed in 0..50 {
        let ok = resumed_leader_scenario(seed, BrokenRule::None)
            .unwrap_or_else(|e| panic!("seed {seed}: scenario not built: {e}"));
        assert!(ok.violations.is_empty(), "seed {seed}: {:?}", ok.violations);
        assert!(ok.wakes > 0 && ok.hibernations >= 3, "seed {seed}: {ok:?}");
        let broken = resumed_leader_scenario(seed, BrokenRule::ResumeKeepsLease)
            .unwrap_or_else(|e| panic!("seed {seed} (broken): scenario not built: {e}"));
        assert!(
            broken
                .violations
                .iter()
                .any(|v| v.starts_with("linearizability")),
            "seed {seed}: a resumed leader kept its lease unnoticed: {:?}",
            broken.violations
        );
    }
}

/// Amnesia: a crash that also loses the node's whole storage (it restarts empty, with a new disk
/// id). A core that lets such a node vote at once and counts it like the member it was
/// (`BrokenRule::AmnesiacVotes`) elects two leaders in one term or loses committed entries
/// within 2,000 seeds (seeds 258, 644 and 834 when this was written); the correct core runs the
/// same seed, amnesia included, with no violation.
#[test]
fn amnesiac_votes_are_caught_and_the_same_seed_passes() {
    tests::sim::install_quiet_panic_hook();
    let broken = SimOptions {
        broken_rule: BrokenRule::AmnesiacVotes,
        ..SimOptions::default()
    };
    let found = (0..2000)
        .find(|&seed| !run_seed(seed, &broken).violations.is_empty())
        .expect("a violation within 2000 seeds with amnesiac votes allowed");
    let r = run_seed(found, &SimOptions::default());
    assert!(r.amnesias > 0, "seed {found} wiped no node");
    assert!(r.violations.is_empty(), "seed {found}: {:?}", r.violations);
}
