//! The gateway at the limits of its own process (issue 19): out of memory
//! (`limits.max_memory_mib`) or out of descriptors (the process's
//! RLIMIT_NOFILE), a new login is told why in words openconnect prints,
//! a session already up keeps its traffic, and `vpnctl` answers. The
//! session limit has its test in bench/tests/load_smoke.rs; the address
//! pool cannot run out before it (a config whose max_sessions exceeds the
//! pool is refused at load).

use std::{path::Path, time::Duration};

use vpn_tests::*;

/// `vpnctl stats --json`'s admission figures.
fn admission(gw: &Gateway) -> serde_json::Value {
    gw.stats().unwrap()["admission"].clone()
}

/// Bob's openconnect, expected to be refused: its log.
fn refused_login(topo: &Topology, gw: &Gateway) -> String {
    let mut c = Client::start_in(&topo.client2, gw, BOB.name, BOB.password, &[]).unwrap();
    assert!(
        c.wait_exit(Duration::from_secs(20)).is_some(),
        "bob's openconnect should give up:\n{}",
        c.log()
    );
    c.log()
}

fn set_memory_ceiling(gw: &Gateway, mib: u64) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let (head, tail) = text.split_once("max_memory_mib = ").unwrap();
    let rest = tail.split_once('\n').map_or("", |(_, r)| r);
    std::fs::write(&gw.config, format!("{head}max_memory_mib = {mib}\n{rest}")).unwrap();
    let out = gw.vpnctl(&["reload"]).unwrap();
    assert!(out.contains("reloaded"), "{out}");
    assert!(
        !out.contains("restart"),
        "the ceiling applies at once: {out}"
    );
}

#[test]
fn above_the_memory_ceiling_logins_are_told_and_sessions_keep_going() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(
        &topo,
        ConfigParts {
            rest: "[limits]\nmax_memory_mib = 0\n",
            ..Default::default()
        },
        &[ALICE, BOB],
    )
    .unwrap();
    let mut alice = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    alice.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));

    // A ceiling below what the daemon holds: no new logins.
    set_memory_ceiling(&gw, 1);
    let log = refused_login(&topo, &gw);
    assert!(
        log.contains("out of memory and takes no new logins now"),
        "{log}"
    );
    let a = admission(&gw);
    assert!(a["logins_refused_memory"].as_u64() >= Some(1), "{a}");
    assert!(a["resident_bytes"].as_u64() > Some(1 << 20), "{a}");
    assert_eq!(a["max_memory_bytes"], 1 << 20, "{a}");
    // Alice's session is untouched.
    assert!(topo.client.ping(SERVER, 2), "{}", gw.log());
    assert_eq!(gw.sessions().unwrap().len(), 1);

    // Raised by a reload: Bob gets in.
    set_memory_ceiling(&gw, 8192);
    let mut bob = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(gw.sessions().unwrap().len(), 2);
    assert!(topo.client.ping(SERVER, 1));
}

/// The lowest descriptor number process `pid` has free, the lowest of a
/// few looks (a command the daemon runs holds a pipe for a moment): with
/// RLIMIT_NOFILE there, every descriptor it may have is open.
fn lowest_free_descriptor(pid: u32) -> usize {
    (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            let open: std::collections::BTreeSet<usize> =
                std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .unwrap()
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect();
            (0..).find(|n| !open.contains(n)).unwrap()
        })
        .min()
        .unwrap()
}

/// The soft RLIMIT_NOFILE of process `pid` (changing the hard one takes
/// CAP_SYS_RESOURCE, which test machines may not have).
fn nofile(pid: u32) -> usize {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Sets it as vpnd's own user (nobody): another user's limits take
/// CAP_SYS_RESOURCE, which test machines may not have either.
fn set_nofile(pid: u32, n: usize) {
    sh(std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "prlimit",
        ])
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:")))
    .unwrap();
    assert_eq!(nofile(pid), n);
}

#[test]
fn at_the_descriptor_limit_logins_are_told_vpnctl_answers_and_sessions_keep_going() {
    require_root();
    let topo = Topology::new().unwrap();
    let gw = Gateway::start(&topo, ConfigParts::default(), &[ALICE, BOB]).unwrap();
    let mut alice = Client::start(&topo, &gw, ALICE.name, ALICE.password, &[]).unwrap();
    alice.wait_connected(Duration::from_secs(20)).unwrap();
    assert!(topo.client.ping(SERVER, 1));

    // Every descriptor the daemon may have is open: the next accept
    // fails with EMFILE.
    let pid = gw.pid().unwrap();
    let spares = dev_nulls(pid);
    let free = lowest_free_descriptor(pid);
    let was = nofile(pid);
    set_nofile(pid, free);
    let log = refused_login(&topo, &gw);
    assert!(
        log.contains("out of connection slots and takes no new logins now"),
        "{log}\n{}",
        gw.log()
    );
    // vpnctl gets in on its own spare descriptor.
    let a = admission(&gw);
    assert!(
        a["connections_refused_descriptors"].as_u64() >= Some(1),
        "{a}"
    );
    assert_eq!(gw.sessions().unwrap().len(), 1);
    assert!(topo.client.ping(SERVER, 2), "{}", gw.log());

    // Room again: Bob is served (not told off by a listener that waited
    // at the limit), and the spares are held again.
    set_nofile(pid, was);
    let mut bob = Client::start_in(&topo.client2, &gw, BOB.name, BOB.password, &[]).unwrap();
    bob.wait_connected(Duration::from_secs(20)).unwrap();
    assert_eq!(gw.sessions().unwrap().len(), 2);
    assert_eq!(dev_nulls(pid), spares, "{}", gw.log());

    // Stopped at the limit, the daemon still removes what it set up: its
    // nft table, through `nft`, which takes eight descriptors for its
    // pipes (before, the table stayed in one of two runs: "unable to
    // execute nft: Too many open files"). The broker does that now, with
    // descriptors of its own.
    set_nofile(pid, lowest_free_descriptor(pid));
    assert!(refused_login(&topo, &gw).contains("out of connection slots"));
    let mut gw = gw;
    assert!(gw.stop().is_some_and(|s| s.success()), "{}", gw.log());
    assert!(!gw.log().contains("removing uplink state"), "{}", gw.log());
    let tables = sh(topo.gw.cmd("nft").args(["list", "tables"])).unwrap();
    let tables = String::from_utf8(tables.stdout).unwrap();
    assert!(!tables.contains("inet vpn_gateway"), "{tables}");
}

/// Descriptors of process `pid` open on /dev/null (stdin and the spares).
fn dev_nulls(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter(|e| {
            e.as_ref().is_ok_and(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/dev/null"))
            })
        })
        .count()
}
