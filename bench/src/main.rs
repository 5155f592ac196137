//! `vpn-bench`: benchmarks (see bench/README.md). Each writes a Markdown
//! table to stdout and to `bench/results/<name>.md`.
//!
//! - `classifier`: per-packet cost of the policy classifier in the kernel
//!   (`BPF_PROG_TEST_RUN`, the kernel's own ns/run over many repeats) for
//!   policies of 10, 1,000 and 10,000 rules, packets spread over all rules.
//! - `forwarding`: packets per second through a gateway namespace with the
//!   classifier on the veth ingress against the same rules in nftables.
//! - `tunnel`: iperf3 through the tunnel over DTLS and TLS, vpnd against
//!   ocserv, throughput and gateway CPU per GB as ratios.

mod clients;
mod forwarding;
mod load;
mod neighbours;
mod ocserv;
mod scale;
mod soak;
mod tunnel;

use std::{fmt::Write as _, net::IpAddr, time::Instant};

use anyhow::{Context as _, bail};
use vpn_common::{PolicyInfo, SessionInfo};
use vpn_daemon::{
    datapath::bpf::Datapath,
    policy::{self, Rule, RuleConfig},
};
use vpn_tests::packets::{Spec, frame};

const CLIENT: &str = "198.19.0.9";

/// Rule `i`: a /32 in 198.18.0.0/15 with its own TCP port; every fourth
/// allows, the others deny. Distinct prefixes make the classes as many as
/// the rules: the worst case for the class map, the common one for ports.
fn rule(i: usize) -> Rule {
    Rule::parse(&RuleConfig {
        action: if i.is_multiple_of(4) { "allow" } else { "deny" }.into(),
        protocol: "tcp".into(),
        destination: format!("198.{}.{}.{}/32", 18 + i / 65536, (i / 256) % 256, i % 256),
        port: (1000 + i % 5000).to_string(),
        comment: None,
    })
    .expect("valid rule")
}

fn classifier() -> anyhow::Result<String> {
    let mut dp = Datapath::load_for_test_run().context("loading the BPF programs (run as root)")?;
    let client: IpAddr = CLIENT.parse()?;
    dp.add_session(
        client,
        SessionInfo {
            session_id: 1,
            policy_id: 0,
            flags: 0,
        },
    )?;
    let repeat = 200_000;
    let samples = 64;
    let mut rows = Vec::new();
    for (k, &n) in [10usize, 1_000, 10_000].iter().enumerate() {
        let rules: Vec<Rule> = (0..n).map(rule).collect();
        let id = k as u32 + 1;
        let t = Instant::now();
        let compiled = policy::compile(id, &rules, 0, &[], 10_000_000)?;
        let compile_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        dp.install_policy(id, PolicyInfo::default(), &compiled, 0)?;
        let install_ms = t.elapsed().as_secs_f64() * 1e3;
        dp.set_session(
            client,
            SessionInfo {
                session_id: 1,
                policy_id: id,
                flags: 0,
            },
        )?;
        // Packets spread evenly over all rules, each matching its rule.
        let mut total_ns = 0.0;
        for s in 0..samples {
            let i = s * n / samples;
            let r = &rules[i];
            let dst = r.dst.expect("rule has a prefix").network();
            let spec = Spec {
                src: client,
                dst,
                proto: 6,
                sport: 40000,
                dport: r.ports.expect("rule has a port").0,
                later_fragment: false,
                hop_by_hop: false,
            };
            let (ret, per_run) = dp.test_run(true, &frame(&spec), repeat)?;
            let want = if i.is_multiple_of(4) { 0 } else { 2 };
            if ret != want {
                bail!("rule {i}: verdict {ret}, expected {want}");
            }
            total_ns += per_run.as_nanos() as f64;
        }
        rows.push((
            n,
            compiled.entries(),
            compile_ms,
            install_ms,
            total_ns / samples as f64,
        ));
        dp.remove_policy(id, &compiled);
    }
    // The same packets with no policy: parsing, session lookup, counters.
    dp.set_session(
        client,
        SessionInfo {
            session_id: 1,
            policy_id: 0,
            flags: 0,
        },
    )?;
    let spec = Spec {
        src: client,
        dst: "198.18.0.1".parse()?,
        proto: 6,
        sport: 40000,
        dport: 1001,
        later_fragment: false,
        hop_by_hop: false,
    };
    let (_, no_policy) = dp.test_run(true, &frame(&spec), repeat)?;
    let base = rows[0].4;
    let mut out = String::new();
    writeln!(
        out,
        "# Policy classifier: cost per packet against rule count\n"
    )?;
    writeln!(
        out,
        "`BPF_PROG_TEST_RUN` of the tunnel ingress program (parse, session lookup, class hash probe per prefix length, interval search, hit counter), {repeat} repeats for each of {samples} packets spread over the rules; the kernel reports ns per run.\n"
    )?;
    writeln!(
        out,
        "| rules | map entries | compile ms | install ms | ns/packet | ratio to 10 rules |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    for (n, entries, c, i, ns) in &rows {
        writeln!(
            out,
            "| {n} | {entries} | {c:.1} | {i:.1} | {ns:.1} | {:.3} |",
            ns / base
        )?;
    }
    writeln!(
        out,
        "\nWithout a policy (parse, session lookup, counters): {} ns/packet.",
        no_policy.as_nanos()
    )?;
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let which = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "classifier".into());
    if which == "load" {
        // The load generator itself: run in a client namespace by the
        // scale benchmark and the smoke test; its report is JSON.
        use clap::Parser as _;
        let opts = load::Options::parse_from(std::env::args().skip(1));
        let report = load::run(&opts)?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let (name, table) = match which.as_str() {
        "classifier" => ("classifier", classifier()?),
        "forwarding" => ("forwarding", forwarding::run()?),
        "tunnel" => ("tunnel", tunnel::run()?),
        "scale" => ("scale", scale::run()?),
        "clients" => ("clients", clients::run()?),
        "neighbours" => ("neighbours", neighbours::run()?),
        "soak" => ("soak", soak::run()?),
        other => {
            bail!(
                "unknown benchmark '{other}': available: classifier, forwarding, tunnel, scale, clients, neighbours, soak"
            )
        }
    };
    print!("{table}");
    if std::env::var_os("VPN_BENCH_ONLY").is_some()
        || std::env::var_os("VPN_BENCH_IPERF3_ARGS").is_some()
    {
        // A partial or modified run (profiling, a window-limited flow) does
        // not replace the recorded table.
        return Ok(());
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.md")), &table)?;
    Ok(())
}
