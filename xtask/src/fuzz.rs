//! `cargo xtask fuzz [TARGET] [--secs N]`: the cargo-fuzz targets in
//! `vpn-daemon/fuzz/`, one for every parser of bytes from the network and
//! for the config.
//!
//! The targets are built once (`cargo +nightly fuzz build`, coverage
//! instrumentation and debug assertions, so an arithmetic overflow is a
//! panic too; no sanitizer: the parsers are safe Rust, where a bug is a
//! panic, which libFuzzer catches without one), then run two at a time
//! (this project's hosts have 2 cores) for `--secs` each. Each starts from
//! its committed seeds (`fuzz/seeds/TARGET/`: what the real openconnect
//! sends, taken from the protocol notes' verified transcripts, and inputs
//! that once crashed a target) and keeps what it finds in
//! `fuzz/corpus/TARGET/` (not committed) for the next run. A crash leaves
//! its input in `fuzz/artifacts/TARGET/` and fails the command; copy it
//! into the seeds and a regression test when it is fixed.
//!
//! `--seed N` makes a run repeatable: libFuzzer's random choices come
//! from N and the corpus starts from the committed seeds alone (in
//! `fuzz/target/fresh-corpus/`, emptied first), so the same commit meets
//! the same inputs in the same order, and a run stopped by time differs
//! only in how far it got. The test gate (`cargo xtask test` under CI)
//! runs that way, with [`GATE_SEED`]: CI stays a verdict on the commit,
//! not on a roll of the dice, and `cargo xtask fuzz --seed 1` on a
//! developer's machine meets what CI met. Finding new inputs is the job
//! of runs without a seed, which keep their corpus.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{root, run};

/// The seed of the test gate's runs.
pub const GATE_SEED: u32 = 1;

/// cargo-fuzz, from the crate registry.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The targets, as `vpn-daemon/fuzz/Cargo.toml` names them.
pub const TARGETS: &[&str] = &[
    "http_request",
    "auth_xml",
    "cstp",
    "dtls_datagram",
    "tcp_packets",
    "radius_reply",
    "config",
];

fn fuzz_dir() -> PathBuf {
    root().join("vpn-daemon/fuzz")
}

fn cargo_fuzz_ok() -> bool {
    Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        })
}

/// Installs cargo-fuzz if it is missing (built from the registry, about
/// a minute).
fn cargo_fuzz() -> anyhow::Result<()> {
    if cargo_fuzz_ok() {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["install", "--locked", "--force", "cargo-fuzz", "--version"])
            .arg(CARGO_FUZZ_VERSION),
    )?;
    if !cargo_fuzz_ok() {
        bail!("cargo-fuzz was installed but `cargo fuzz --version` does not run");
    }
    Ok(())
}

/// Builds every target.
fn build() -> anyhow::Result<PathBuf> {
    cargo_fuzz()?;
    // `cargo +nightly` through rustup, whatever cargo runs xtask.
    run(Command::new("rustup")
        .args([
            "run",
            "nightly",
            "cargo",
            "fuzz",
            "build",
            "--sanitizer",
            "none",
            "--debug-assertions",
        ])
        .current_dir(root().join("vpn-daemon"))
        // The workspace's stable toolchain must not leak into the nightly
        // build (xtask runs under `cargo`, which sets these).
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN"))?;
    Ok(fuzz_dir().join("target/x86_64-unknown-linux-gnu/release"))
}

/// What one target's run came to.
pub struct Outcome {
    pub target: String,
    pub runs: u64,
    pub coverage: u64,
    pub corpus: u64,
    pub crashed: bool,
}

/// Runs `targets` (all when empty) for `secs` each, two at a time;
/// with `seed`, repeatably (see the module's notes).
pub fn fuzz(targets: &[String], secs: u64, seed: Option<u32>) -> anyhow::Result<Vec<Outcome>> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            bail!(
                "no fuzz target {t:?}: the targets are {}",
                TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        targets.to_vec()
    };
    let bin = build()?;
    let mut out = Vec::new();
    for pair in targets.chunks(2) {
        let running = pair
            .iter()
            .map(|t| start(&bin, t, secs, seed).map(|c| (t, c)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for (t, (mut child, log)) in running {
            // libFuzzer stops itself at -max_total_time; the bound here
            // is for a target stuck in one input.
            let status = wait_bounded(&mut child, Duration::from_secs(secs + 120))?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let stat = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(&format!("stat::{name}:")))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0)
            };
            // The last status line's "cov: N" (or "corp: N/...").
            let last = |key: &str| {
                text.lines()
                    .rev()
                    .find_map(|l| l.split(&format!("{key}: ")).nth(1))
                    .and_then(|v| {
                        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
                        digits.parse().ok()
                    })
                    .unwrap_or(0)
            };
            let o = Outcome {
                target: t.clone(),
                runs: stat("number_of_executed_units"),
                coverage: last("cov"),
                corpus: last("corp"),
                crashed: !status.is_some_and(|s| s.success()),
            };
            println!(
                "fuzz {}{}: {} inputs in {secs} s, coverage {}, corpus {}, {}",
                o.target,
                seed.map(|s| format!(" (seed {s})")).unwrap_or_default(),
                o.runs,
                o.coverage,
                o.corpus,
                if o.crashed { "CRASHED" } else { "no crash" }
            );
            if o.crashed {
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                for l in tail.into_iter().rev() {
                    println!("  {l}");
                }
                println!(
                    "  (the input is in {}, the whole log in {})",
                    artifacts(t).display(),
                    log.display()
                );
            }
            out.push(o);
        }
    }
    Ok(out)
}

fn artifacts(target: &str) -> PathBuf {
    fuzz_dir().join("artifacts").join(target)
}

/// Starts `target` for `secs`, its output in a log file.
fn start(
    bin: &Path,
    target: &str,
    secs: u64,
    seed: Option<u32>,
) -> anyhow::Result<(std::process::Child, PathBuf)> {
    let dir = fuzz_dir();
    let corpus = match seed {
        Some(_) => {
            let c = dir.join("target").join("fresh-corpus").join(target);
            if c.exists() {
                std::fs::remove_dir_all(&c).with_context(|| c.display().to_string())?;
            }
            c
        }
        None => dir.join("corpus").join(target),
    };
    let seeds = dir.join("seeds").join(target);
    let arts = artifacts(target);
    for d in [&corpus, &arts] {
        std::fs::create_dir_all(d)?;
    }
    let log = dir.join("target").join(format!("{target}.log"));
    let file = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
    let mut c = Command::new(bin.join(target));
    c.arg(&corpus);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    if let Some(s) = seed {
        c.arg(format!("-seed={s}"));
    }
    c.arg(format!("-max_total_time={secs}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", arts.display()))
        .stdout(file.try_clone()?)
        .stderr(file)
        .stdin(Stdio::null());
    let child = c.spawn().with_context(|| format!("starting {c:?}"))?;
    Ok((child, log))
}

fn wait_bounded(
    child: &mut std::process::Child,
    limit: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let until = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
