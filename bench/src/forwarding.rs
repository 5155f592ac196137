//! Forwarding rate through a gateway namespace: no filter, the policy
//! classifier (the tunnel ingress program, attached to the gateway's veth
//! ingress), and the same rules as an nftables forward chain, over rule
//! count. The traffic matches no rule (default allow), so nftables walks
//! every rule while the classifier does its fixed lookups.
//!
//! ```text
//!  src ns 198.18.10.2 --veth-- 198.18.10.1 gw ns 198.18.11.1 --veth-- 198.18.11.2 dst ns
//! ```

use std::{
    fmt::Write as _,
    net::{IpAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use vpn_common::{PolicyInfo, SessionInfo};
use vpn_daemon::{datapath::bpf::Datapath, policy};
use vpn_tests::{Netns, in_netns, sh, unique_id};

const SECS: f64 = 3.0;

struct Topo {
    src: Netns,
    gw: Netns,
    dst: Netns,
}

fn topo() -> anyhow::Result<Topo> {
    let id = unique_id();
    let src = Netns::new(format!("vgb-{id}-s"))?;
    let gw = Netns::new(format!("vgb-{id}-g"))?;
    let dst = Netns::new(format!("vgb-{id}-d"))?;
    src.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "up0", "netns", &gw.name,
    ])?;
    dst.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &gw.name,
    ])?;
    src.ip(&["addr", "add", "198.18.10.2/24", "dev", "eth0"])?;
    src.ip(&["link", "set", "eth0", "up"])?;
    src.ip(&["route", "add", "198.18.11.0/24", "via", "198.18.10.1"])?;
    gw.ip(&["addr", "add", "198.18.10.1/24", "dev", "up0"])?;
    gw.ip(&["addr", "add", "198.18.11.1/24", "dev", "lan0"])?;
    gw.ip(&["link", "set", "up0", "up"])?;
    gw.ip(&["link", "set", "lan0", "up"])?;
    gw.sysctl("net.ipv4.ip_forward", "1")?;
    dst.ip(&["addr", "add", "198.18.11.2/24", "dev", "eth0"])?;
    dst.ip(&["link", "set", "eth0", "up"])?;
    Ok(Topo { src, gw, dst })
}

fn rx_packets(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    let out = sh(Command::new("ip").args(["-n", &ns.name, "-s", "-j", "link", "show", dev]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx counter")
}

/// Sends small UDP datagrams from `src` for SECS seconds (bounded) and
/// returns the packets per second that reached `dst`.
fn measure(t: &Topo) -> anyhow::Result<f64> {
    let before = rx_packets(&t.dst, "eth0")?;
    let sent = in_netns(&t.src, || -> anyhow::Result<u64> {
        let s = UdpSocket::bind("198.18.10.2:0")?;
        s.connect("198.18.11.2:9")?;
        let payload = [0u8; 18];
        let end = Instant::now() + Duration::from_secs_f64(SECS);
        let mut n = 0u64;
        while Instant::now() < end {
            for _ in 0..256 {
                if s.send(&payload).is_ok() {
                    n += 1;
                }
            }
        }
        Ok(n)
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let got = rx_packets(&t.dst, "eth0")? - before;
    if sent == 0 {
        bail!("the generator sent nothing");
    }
    Ok(got as f64 / SECS)
}

/// Rule `i`: TCP to a /32 in 198.19.0.0/16 — never the benchmark traffic.
fn rule_text(i: usize) -> (String, u16) {
    (
        format!("198.19.{}.{}", (i / 256) % 256, i % 256),
        1000 + (i % 5000) as u16,
    )
}

fn nft_rules(t: &Topo, n: usize) -> anyhow::Result<()> {
    let mut f = String::from(
        "table inet vpnbench {\n chain forward {\n  type filter hook forward priority 0; policy accept;\n",
    );
    for i in 0..n {
        let (a, p) = rule_text(i);
        writeln!(f, "  ip daddr {a} tcp dport {p} drop")?;
    }
    f.push_str(" }\n}\n");
    let path = std::env::temp_dir().join(format!("vpnbench-{}.nft", unique_id()));
    std::fs::write(&path, f)?;
    let r = sh(t.gw.cmd("nft").arg("-f").arg(&path));
    let _ = std::fs::remove_file(&path);
    r.map(|_| ())
}

pub fn run() -> anyhow::Result<String> {
    let counts = [10usize, 1_000, 10_000];
    let mut rows = Vec::new();
    for &n in &counts {
        let t = topo()?;
        // Warm up ARP and routes.
        measure(&t)?;
        let none = measure(&t)?;

        // The classifier on the gateway's ingress, the source as a session.
        let rules: Vec<policy::Rule> = (0..n)
            .map(|i| {
                let (a, p) = rule_text(i);
                policy::Rule::parse(&policy::RuleConfig {
                    action: "deny".into(),
                    protocol: "tcp".into(),
                    destination: format!("{a}/32"),
                    port: p.to_string(),
                    comment: None,
                })
                .expect("valid rule")
            })
            .collect();
        let compiled = policy::compile(1, &rules, 0, &[], 10_000_000)?;
        let gw_name = t.gw.name.clone();
        let dp = in_netns(&t.gw, move || -> anyhow::Result<Datapath> {
            let mut dp = Datapath::load_for_test_run()?;
            dp.install_policy(1, PolicyInfo::default(), &compiled, 0)?;
            let src: IpAddr = "198.18.10.2".parse()?;
            dp.add_session(
                src,
                SessionInfo {
                    session_id: 1,
                    policy_id: 1,
                    flags: 0,
                },
            )?;
            dp.attach_ingress_for_bench("up0")
                .with_context(|| format!("in {gw_name}"))?;
            Ok(dp)
        })?;
        let bpf = measure(&t)?;
        drop(dp);

        nft_rules(&t, n)?;
        let nft = measure(&t)?;
        rows.push((n, none, bpf, nft));
    }
    let mut out = String::new();
    writeln!(
        out,
        "# Forwarding through the gateway: policy classifier against an nftables chain\n"
    )?;
    writeln!(
        out,
        "UDP datagrams (18-byte payload) from one namespace through a gateway namespace to another for {SECS} s per cell; packets per second received. The traffic matches none of the N rules (TCP to /32s elsewhere), so each packet is checked against all of them. The classifier is the tunnel ingress program attached to the gateway's veth ingress; nftables is an inet forward chain with the same N rules. One core generates, the kernel forwards; compare ratios, not absolutes.\n"
    )?;
    writeln!(
        out,
        "| rules | no filter pps | classifier pps | nftables pps | classifier / no filter | nftables / no filter | classifier / nftables |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for (n, none, bpf, nft) in &rows {
        writeln!(
            out,
            "| {n} | {none:.0} | {bpf:.0} | {nft:.0} | {:.2} | {:.2} | {:.2} |",
            bpf / none,
            nft / none,
            bpf / nft
        )?;
    }
    Ok(out)
}
