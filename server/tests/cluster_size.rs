//! A block group's size is the group's, not a per-node setting: a node restarted with another
//! `--bg-size-bytes` refuses to open the group with an error naming both sizes, instead of
//! growing its replica, exporting a larger volume and (once it leads) acknowledging writes past
//! the other replicas' end. The other two keep serving; restarted with the right size, it
//! catches up.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn node_restarted_with_another_bg_size_refuses_naming_both_sizes() {
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let wrote = write_blocks(&c.nodes[l].uri(), 0..16);
    assert_eq!(wrote.len(), 16, "{}", c.logs());
    let f = (l + 1) % 3;
    let commit = c.commit_index();
    assert!(
        c.nodes[f]
            .wait_applied(commit, Duration::from_secs(20))
            .is_some(),
        "follower caught up\n{}",
        c.logs()
    );
    c.kill(f);
    let size = c.bg_bytes;
    for other in [size * 2, size / 2] {
        c.bg_bytes = other;
        c.spawn(f);
        c.bg_bytes = size;
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.nodes[f].running().is_ok() {
            assert!(
                Instant::now() < deadline,
                "node {} started with {other} bytes instead of {size} and kept running\n{}",
                f + 1,
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = c.nodes[f].log();
        let refusal = log
            .lines()
            .rev()
            .find(|l| {
                l.contains("bg 0")
                    && l.contains(&size.to_string())
                    && l.contains(&other.to_string())
            })
            .unwrap_or_else(|| panic!("no error naming bg 0, {size} and {other}:\n{}", c.logs()));
        assert!(refusal.contains("size"), "{refusal}");
        let len = std::fs::metadata(c.nodes[f].data_file()).unwrap().len();
        assert_eq!(
            len, size,
            "the refused start left the replica's file as it was"
        );
        c.kill(f);
    }
    // The other two serve meanwhile, and nobody wrote past the volume.
    let l = c.leader();
    let more = write_blocks(&c.nodes[l].uri(), 16..24);
    assert_eq!(more.len(), 8, "{}", c.logs());
    // With its size back, the node starts, catches up and serves the whole volume.
    c.spawn(f);
    let commit = c.commit_index();
    assert!(
        c.nodes[f]
            .wait_applied(commit, Duration::from_secs(30))
            .is_some(),
        "follower caught up after the fix\n{}",
        c.logs()
    );
    let out = qemu_io(&c.nodes[f].uri(), &block_reads(0..24));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(c.nodes[f].stat("size_bytes"), Some(size));
    c.assert_all_alive();
    for n in &c.nodes {
        assert!(
            !n.log().contains("outside the volume"),
            "node {} saw a write outside the volume",
            n.id
        );
    }
}
