//! A replica that lost its disk, against 3-process clusters on loopback: a follower is SIGKILLed,
//! its whole data directory deleted, and it is started again with the same command. It comes
//! back with a new disk id; the leader stops counting it, demotes it to a learner marked
//! rebuilding, rebuilds it (log replay or InstallSnapshot) and promotes it to voter again once it
//! holds the committed log. Each test checks what `/status.json` reports meanwhile, that the
//! rebuilt node ends up a counted voter bound to its new disk id, and that its data file, read
//! from disk, is byte-identical to the other two. Once with the group idle, once under fio writes.
//!
//! The tests of this file run one at a time (each has three servers, and the second fio, on 2
//! cores): their time bounds are for one cluster on the machine.

mod common;

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Time a wiped and restarted node has to become a counted voter again.
const REBUILD: Duration = Duration::from_secs(60);
/// Time an idle cluster has to apply everything on every node.
const SETTLE: Duration = Duration::from_secs(30);
const BLOCK: u64 = 65536;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// `len` bytes of xorshift noise: every block of the volume differs from zero and from every
/// other, so a block copied to the wrong place, or not at all, shows.
fn noise_image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Writes `image` over the whole volume through node `via` with nbdcopy (4 connections, flush).
fn fill(c: &Cluster, via: usize, image: &[u8]) {
    let src = c.tmp.path().join("image.raw");
    std::fs::write(&src, image).unwrap();
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--flush",
            src.to_str().unwrap(),
            &c.nodes[via].uri(),
        ],
    );
}

/// bg0 read back through node `via`'s NBD export with nbdcopy.
fn read_volume(c: &Cluster, via: usize) -> Vec<u8> {
    let dst = c.tmp.path().join(format!("read-via-node{}.raw", via + 1));
    let _ = std::fs::remove_file(&dst);
    run_ok(
        "nbdcopy",
        &[
            "--connections=4",
            &c.nodes[via].uri(),
            dst.to_str().unwrap(),
        ],
    );
    std::fs::read(&dst).unwrap()
}

/// The leader's row for peer `id` (leaders list their followers in `peers`).
fn peer_row(leader: &Value, id: u64) -> Option<&Value> {
    leader["peers"].as_array()?.iter().find(|p| p["id"] == id)
}

fn u(v: &Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or(0)
}

/// One look at bg0 on every running node: the leader (index and status; the one of the highest
/// term if two say so) and node `f`'s own status.
fn poll(c: &Cluster, f: usize) -> (Option<(usize, Value)>, Option<Value>) {
    let mut leader: Option<(usize, Value)> = None;
    let mut mine = None;
    for (i, n) in c.nodes.iter().enumerate() {
        if n.child.is_none() {
            continue;
        }
        let Some(s) = n.status() else { continue };
        if s["state"] == "LEADER"
            && leader
                .as_ref()
                .is_none_or(|(_, l)| u(l, "term") < u(&s, "term"))
        {
            leader = Some((i, s.clone()));
        }
        if i == f {
            mine = Some(s);
        }
    }
    (leader, mine)
}

/// Waits until the leader's row for node `f` matches the leader's last log index and `f` has
/// applied the commit index; returns the leader's index and status then.
fn wait_caught_up(c: &Cluster, f: usize) -> (usize, Value) {
    let id = c.nodes[f].id;
    let deadline = Instant::now() + SETTLE;
    loop {
        if let (Some((l, ls)), Some(mine)) = poll(c, f) {
            if l != f {
                if let Some(row) = peer_row(&ls, id) {
                    if u(row, "match_index") == u(&ls, "last_log_index")
                        && u(&mine, "known_applied_index") >= u(&ls, "last_committed_index")
                    {
                        return (l, ls);
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {id} did not catch up in {SETTLE:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Why node `f` (`id`) is not yet a rebuilt, counted voter bound to `new_disk`, or Ok.
fn rebuilt(
    leader: &Option<(usize, Value)>,
    mine: &Option<Value>,
    f: usize,
    id: u64,
    old_disk: u64,
) -> Result<(), String> {
    let Some(mine) = mine else {
        return Err(format!("node {id} does not answer"));
    };
    let Some((l, ls)) = leader else {
        return Err("no leader".into());
    };
    let new_disk = u(mine, "disk_id");
    if new_disk == 0 || new_disk == old_disk {
        return Err(format!(
            "node {id} reports disk id {new_disk:#x} (before the wipe: {old_disk:#x})"
        ));
    }
    if mine["rebuilding"] != false {
        return Err(format!("node {id} still reports rebuilding: {mine}"));
    }
    if ls["under_replicated"] != false {
        return Err(format!("the leader reports under_replicated: {ls}"));
    }
    if !ls["voters"]
        .as_array()
        .is_some_and(|v| v.iter().any(|x| *x == id))
    {
        return Err(format!("node {id} is not among the leader's voters: {ls}"));
    }
    if *l != f {
        let Some(row) = peer_row(ls, id) else {
            return Err(format!("the leader has no row for node {id}: {ls}"));
        };
        if row["voter"] != true
            || row["counted"] != true
            || row["rebuilding"] != false
            || u(row, "disk_id") != new_disk
        {
            return Err(format!(
                "the leader's row for node {id} is not a counted voter on disk {new_disk:#x}: {row}"
            ));
        }
    }
    let (applied, commit) = (
        u(mine, "known_applied_index"),
        u(ls, "last_committed_index"),
    );
    if applied < commit {
        return Err(format!(
            "node {id} applied {applied}, the leader committed {commit}"
        ));
    }
    Ok(())
}

/// What was seen of a rebuild, from the restart on.
#[derive(Debug, Default)]
struct Rebuild {
    new_disk: u64,
    /// The first leader status showing the restarted node (answering from a new disk id) not
    /// counted or rebuilding, with under_replicated, and when.
    leader_saw: Option<(Duration, String)>,
    /// The first status of the restarted node reporting itself rebuilding, and when.
    node_saw: Option<(Duration, String)>,
    /// Polls that showed the rebuild in progress (either way).
    polls_rebuilding: u64,
    polls: u64,
    /// Largest snapshot download progress the node reported.
    bytes_done_max: u64,
    bytes_total_max: u64,
    snapshot_states: std::collections::BTreeSet<String>,
    /// Restart to a counted voter again.
    took: Duration,
}

/// Polls every 10 ms from node `f`'s restart until it is a rebuilt, counted voter (failing the
/// test after `REBUILD`), recording what the leader and the node report meanwhile.
fn watch_rebuild(c: &Cluster, f: usize, old_disk: u64, restarted: Instant) -> Rebuild {
    let id = c.nodes[f].id;
    let mut r = Rebuild::default();
    loop {
        let (leader, mine) = poll(c, f);
        let at = restarted.elapsed();
        r.polls += 1;
        let mut rebuilding = false;
        if let Some(m) = &mine {
            let d = u(m, "disk_id");
            assert!(
                d != 0 && d != old_disk,
                "the wiped node {id} reports disk id {d:#x}, the one before the wipe was \
                 {old_disk:#x}: {m}\n{}",
                c.logs()
            );
            assert!(
                r.new_disk == 0 || r.new_disk == d,
                "node {id}'s disk id changed from {:#x} to {d:#x} without a wipe: {m}",
                r.new_disk
            );
            r.new_disk = d;
            if m["rebuilding"] == true {
                rebuilding = true;
                r.node_saw.get_or_insert((at, m.to_string()));
            }
            r.bytes_done_max = r.bytes_done_max.max(u(m, "rebuild_bytes_done"));
            r.bytes_total_max = r.bytes_total_max.max(u(m, "rebuild_bytes_total"));
            if let Some(s) = m["snapshot_status"].as_str() {
                r.snapshot_states
                    .insert(s.split_whitespace().next().unwrap_or("").to_string());
            }
        }
        if let Some((l, ls)) = &leader {
            if *l != f {
                if let Some(row) = peer_row(ls, id) {
                    let d = u(row, "disk_id");
                    if d != 0
                        && d != old_disk
                        && (row["counted"] == false || row["rebuilding"] == true)
                        && ls["under_replicated"] == true
                    {
                        rebuilding = true;
                        r.leader_saw.get_or_insert((at, ls.to_string()));
                    }
                }
            }
        }
        r.polls_rebuilding += rebuilding as u64;
        match rebuilt(&leader, &mine, f, id, old_disk) {
            Ok(()) => {
                r.took = at;
                return r;
            }
            Err(why) => assert!(
                at < REBUILD,
                "node {id} was not a rebuilt, counted voter {REBUILD:?} after its restart: \
                 {why}\nseen so far: {r:?}\nleader: {leader:?}\nnode {id}: {mine:?}\n{}",
                c.logs()
            ),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until every running node has applied the leader's commit index, which stays put for
/// 300 ms; returns the commit index.
fn wait_settled(c: &Cluster) -> u64 {
    let deadline = Instant::now() + SETTLE;
    let mut last = None;
    loop {
        let l = c.leader();
        let commit = c.nodes[l].stat("last_committed_index").unwrap_or(0);
        let all = c
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .all(|n| n.stat("known_applied_index").unwrap_or(0) >= commit);
        if all && last == Some(commit) {
            return commit;
        }
        last = all.then_some(commit);
        assert!(
            Instant::now() < deadline,
            "the cluster did not settle in {SETTLE:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The first 4 KiB block where `a` and `b` differ, and how many differ.
fn diff_blocks(a: &[u8], b: &[u8]) -> Option<(usize, usize)> {
    let n = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    let first = a.chunks(4096).zip(b.chunks(4096)).position(|(x, y)| x != y);
    match (first, a.len() == b.len()) {
        (None, true) => None,
        (None, false) => Some((a.len().min(b.len()) / 4096, n)),
        (Some(f), _) => Some((f, n)),
    }
}

/// Asserts that every node's data file, read from disk, is byte-identical to the rebuilt node
/// `f`'s (and to `expected` when given); returns the rebuilt node's file.
fn assert_same_data(c: &Cluster, f: usize, expected: Option<&[u8]>) -> Vec<u8> {
    let files: Vec<Vec<u8>> = c
        .nodes
        .iter()
        .map(|n| std::fs::read(n.data_file()).unwrap())
        .collect();
    let mine = &files[f];
    assert_eq!(
        mine.len() as u64,
        c.bg_bytes,
        "node {}'s data file size",
        f + 1
    );
    for (i, file) in files.iter().enumerate() {
        if let Some((at, n)) = diff_blocks(file, mine) {
            panic!(
                "node {}'s data file and the rebuilt node {}'s differ in {n} blocks of 4 KiB, \
                 the first at offset {} (sizes {} and {})\n{}",
                i + 1,
                f + 1,
                at * 4096,
                file.len(),
                mine.len(),
                c.logs()
            );
        }
    }
    if let Some(img) = expected {
        if let Some((at, n)) = diff_blocks(img, mine) {
            panic!(
                "the data files differ from what was written in {n} blocks of 4 KiB, the first at \
                 offset {}",
                at * 4096
            );
        }
    }
    files.into_iter().nth(f).unwrap()
}

/// The rebuilt node `f` counts toward quorums: with the third node `other` killed, writes
/// through `f` still commit (leader + `f`), and land in `f`'s own data file.
fn assert_counts_toward_quorum(c: &mut Cluster, f: usize, other: usize) {
    c.kill(other);
    let l = c.leader();
    assert_ne!(l, other);
    let started = Instant::now();
    let blocks = 0..8;
    let acked = write_blocks(&c.nodes[f].uri(), blocks.clone());
    assert_eq!(
        acked.len(),
        8,
        "with node {} down, writes through the rebuilt node {} were not all acknowledged\n{}",
        other + 1,
        f + 1,
        c.logs()
    );
    eprintln!(
        "node {} down: 8 writes committed by the leader and the rebuilt node in {:?}",
        other + 1,
        started.elapsed()
    );
    let commit = c.commit_index();
    c.nodes[f]
        .wait_applied(commit, SETTLE)
        .unwrap_or_else(|| panic!("node {} did not apply {commit}\n{}", f + 1, c.logs()));
    let data = std::fs::read(c.nodes[f].data_file()).unwrap();
    for b in blocks {
        let at = (b * BLOCK) as usize;
        let p = pattern(b) as u8;
        assert!(
            data[at..at + BLOCK as usize].iter().all(|x| *x == p),
            "block {b} of the rebuilt node's data file does not hold {p:#x}"
        );
    }
    for i in [l, f] {
        let n = &mut c.nodes[i];
        let alive = n.running();
        assert!(
            alive.is_ok() && !n.log().contains("panicked"),
            "node {}: {alive:?}, or it logged a panic\n{}",
            i + 1,
            c.logs()
        );
    }
}

/// `/raft_stat` (the text form of the same status) once the rebuild is over: the rebuilt node
/// `f` prints its new disk id and no rebuilding line, the leader a counted voter row for it and
/// no under_replicated line.
fn assert_raft_stat_settled(c: &Cluster, f: usize, new_disk: u64) {
    let id = c.nodes[f].id;
    let l = c.leader();
    let mine = http_get(c.nodes[f].http, "/raft_stat").expect("the rebuilt node's /raft_stat");
    assert!(
        mine.contains(&format!("disk_id: {new_disk:016x}\n")) && !mine.contains("rebuilding:"),
        "node {id}'s /raft_stat after the rebuild:\n{mine}"
    );
    if l == f {
        return;
    }
    let leader = http_get(c.nodes[l].http, "/raft_stat").expect("the leader's /raft_stat");
    let row = leader
        .lines()
        .find(|line| line.starts_with(&format!("replicator_{id}: ")))
        .unwrap_or_else(|| panic!("no replicator_{id} line on the leader:\n{leader}"));
    assert!(
        row.contains(&format!("voter=true disk_id={new_disk:016x} counted=true"))
            && !row.ends_with(" rebuilding")
            && !leader.contains("under_replicated"),
        "the leader's /raft_stat after node {id}'s rebuild:\n{leader}"
    );
}

/// Snapshot on every node (so the leader's log no longer starts at 1), then the follower `f`
/// caught up; returns the leader, its status, and `f`'s disk id as `f` reports it.
fn snapshot_and_catch_up(c: &Cluster, f: usize) -> (usize, Value, u64) {
    let out = bdctl_ok(c, &["snapshot", "--bg", "0"]);
    assert_eq!(out.matches("snapshot at index").count(), 3, "{out}");
    let (l, ls) = wait_caught_up(c, f);
    let id = c.nodes[f].id;
    let disk = c.nodes[f].stat("disk_id").unwrap_or(0);
    assert_ne!(disk, 0, "node {id} reports no disk id");
    let row = peer_row(&ls, id).unwrap();
    assert_eq!(
        u(row, "disk_id"),
        disk,
        "the leader's row for node {id} names another disk id than the node: {row}"
    );
    assert!(
        row["voter"] == true && row["counted"] == true && ls["under_replicated"] == false,
        "before the wipe node {id} is a counted voter: {ls}"
    );
    (l, ls, disk)
}

/// Kills node `f`, deletes its whole data directory and, `down` later, starts it again with the
/// same command; returns when it was started and the length of its log before.
fn wipe_and_restart(c: &mut Cluster, f: usize, down: Duration) -> (Instant, usize) {
    c.kill(f);
    std::fs::remove_dir_all(&c.nodes[f].dir).unwrap();
    assert!(!c.nodes[f].dir.exists());
    let log_before = c.nodes[f].log().len();
    std::thread::sleep(down);
    c.spawn(f);
    (Instant::now(), log_before)
}

fn report(r: &Rebuild, id: u64, installed_snapshot: bool) {
    eprintln!(
        "node {id}: rebuilt in {:?} (InstallSnapshot: {installed_snapshot}), new disk id {:#x}; \
         {} of {} polls showed the rebuild; snapshot download up to {}/{} bytes; snapshot \
         states {:?}",
        r.took,
        r.new_disk,
        r.polls_rebuilding,
        r.polls,
        r.bytes_done_max,
        r.bytes_total_max,
        r.snapshot_states
    );
    if let Some((at, s)) = &r.leader_saw {
        eprintln!("leader saw it at {at:?}: {s}");
    }
    if let Some((at, s)) = &r.node_saw {
        eprintln!("node saw it at {at:?}: {s}");
    }
}

#[test]
fn wiped_follower_is_rebuilt_and_reported_meanwhile() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let id = c.nodes[f].id;
    let image = noise_image(c.bg_bytes as usize, 0x0072_6562_7569_6c64);
    fill(&c, l, &image);
    // The leader may have moved while the volume was written.
    let (l, ls, old_disk) = snapshot_and_catch_up(&c, f);
    let other = 3 - l - f;
    let first_log = u(&ls, "first_log_index");
    eprintln!(
        "filled in {:?}; leader node {}: log [{first_log}, {}], commit {}; node {id} disk id \
         {old_disk:#x}",
        started.elapsed(),
        l + 1,
        u(&ls, "last_log_index"),
        u(&ls, "last_committed_index")
    );

    let (restarted, log_before) = wipe_and_restart(&mut c, f, Duration::ZERO);
    let r = watch_rebuild(&c, f, old_disk, restarted);
    let installed = c.nodes[f].log()[log_before..].contains("snapshot installed");
    report(&r, id, installed);
    // (a) The rebuild was visible while it ran.
    assert!(
        r.leader_saw.is_some() || r.node_saw.is_some(),
        "no status showed node {id} being rebuilt (not counted or rebuilding with \
         under_replicated on the leader, or rebuilding on the node) in {} polls over {:?}",
        r.polls,
        r.took
    );
    if first_log > 1 {
        assert!(
            installed,
            "the leader's log starts at {first_log}, yet the empty node {id} did not install a \
             snapshot\n{}",
            c.logs()
        );
    }
    // (b) is what watch_rebuild waited for; it still holds once the group is idle.
    let commit = wait_settled(&c);
    let (leader, mine) = poll(&c, f);
    if let Err(why) = rebuilt(&leader, &mine, f, id, old_disk) {
        panic!("after settling at {commit}: {why}\n{}", c.logs());
    }
    // (c) Data files read from disk: all three the same, and what was written.
    assert_same_data(&c, f, Some(&image));
    // (d) Reads through the rebuilt node's export.
    let read = read_volume(&c, f);
    if let Some((at, n)) = diff_blocks(&image, &read) {
        panic!(
            "reads through node {id} differ from what was written in {n} blocks of 4 KiB, the \
             first at offset {}",
            at * 4096
        );
    }
    assert_raft_stat_settled(&c, f, r.new_disk);
    c.assert_all_alive();
    assert_counts_toward_quorum(&mut c, f, other);
    eprintln!("test took {:?}", started.elapsed());
}

#[test]
fn wiped_follower_under_fio_writes_is_rebuilt() {
    let _serial = serial();
    let started = Instant::now();
    let mut c = Cluster::start(&[]);
    let l = c.leader();
    let f = (l + 1) % 3;
    let id = c.nodes[f].id;
    fill(&c, l, &noise_image(c.bg_bytes as usize, 0x0066_696f));
    let (l, _, old_disk) = snapshot_and_catch_up(&c, f);
    let other = 3 - l - f;

    const FIO_S: u64 = 18;
    let uri = c.nodes[l].uri();
    let fio_started = Instant::now();
    let fio = std::thread::spawn(move || {
        run_ok(
            "fio",
            &[
                "--name=rebuild",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bsrange=4k-64k",
                "--iodepth=8",
                "--size=64m",
                "--time_based",
                &format!("--runtime={FIO_S}"),
                "--verify=0",
                "--randseed=26",
                "--output-format=json",
            ],
        )
    });
    // Kill and wipe 3 s into the run, start again 1 s later (the two others commit meanwhile).
    std::thread::sleep(Duration::from_secs(3));
    let (restarted, log_before) = wipe_and_restart(&mut c, f, Duration::from_secs(1));
    let r = watch_rebuild(&c, f, old_disk, restarted);
    let rebuilt_at = fio_started.elapsed();
    let fio_out = fio
        .join()
        .unwrap_or_else(|_| panic!("fio failed\n{}", c.logs()));
    let fio_took = fio_started.elapsed();
    let installed = c.nodes[f].log()[log_before..].contains("snapshot installed");
    report(&r, id, installed);
    let doc: Value = serde_json::from_str(&fio_out[fio_out.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("fio's JSON: {e}\n{fio_out}"));
    let job = &doc["jobs"][0];
    let (err, bytes, iops) = (
        u(job, "error"),
        u(&job["write"], "io_bytes"),
        job["write"]["iops"].as_f64().unwrap_or(0.0),
    );
    eprintln!(
        "fio: {bytes} bytes written at {iops:.0} IOPS, error {err}; node {id} was a counted voter \
         again {rebuilt_at:?} into fio's {fio_took:?} run"
    );
    assert_eq!(err, 0, "fio reported an error: {job}");
    assert!(bytes >= 4096, "fio wrote nothing: {job}");
    assert!(
        r.leader_saw.is_some() || r.node_saw.is_some(),
        "no status showed node {id} being rebuilt in {} polls over {:?}",
        r.polls,
        r.took
    );
    // Once fio is done and the cluster settled, the rebuilt node is still a counted voter, and
    // the three data files are identical (and are what reads through the rebuilt node return).
    let commit = wait_settled(&c);
    let (leader, mine) = poll(&c, f);
    if let Err(why) = rebuilt(&leader, &mine, f, id, old_disk) {
        panic!("after fio, settled at {commit}: {why}\n{}", c.logs());
    }
    let data = assert_same_data(&c, f, None);
    let read = read_volume(&c, f);
    if let Some((at, n)) = diff_blocks(&data, &read) {
        panic!(
            "reads through node {id} differ from the data files in {n} blocks of 4 KiB, the first \
             at offset {}",
            at * 4096
        );
    }
    assert_raft_stat_settled(&c, f, r.new_disk);
    c.assert_all_alive();
    assert_counts_toward_quorum(&mut c, f, other);
    eprintln!("test took {:?}", started.elapsed());
}
