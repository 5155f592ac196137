//! `cargo xtask`: every build, set-up and test step of the project.
//!
//! - `setup`: installs what the project needs, idempotently (Debian packages,
//!   the nightly's `rust-src`, `bpf-linker` built against the nightly's own
//!   libLLVM). A second run only checks, in seconds.
//! - `build`: builds the daemon (which builds the BPF object) and tools.
//! - `run [--config FILE]`: runs vpnd; without a config, a self-contained demo
//!   in network namespaces with the real openconnect client (`vpn-demo`).
//!
//! xtask itself depends on nothing that needs the BPF toolchain, so it builds
//! on a fresh machine before `setup` has installed that toolchain.
//! - `test`: set-up, build, then every unit and integration test; under CI
//!   also each fuzz target for 60 s.
//! - `fuzz [TARGET...] [--secs N]`: the cargo-fuzz targets (`fuzz.rs`).
//! - `bench [NAME]`: a benchmark from bench/, its table in bench/results/.
//! - `install [--prefix DIR] [--destdir DIR]`: a release build, the systemd
//!   unit, the example configuration and the state directories.
//! - `vm-test [--kernel debian-6.1|debian-6.12|FILE.deb] [-- ARGS]`: the
//!   same tests on one of Debian's stock kernels in QEMU (`vm.rs`).

mod fuzz;
mod install;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "vpn-gateway build, set-up and test tasks")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything needed to build and test (idempotent).
    Setup,
    /// Build vpnd, vpnctl and the BPF programs.
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Run the gateway: with --config on this machine's interfaces, without it
    /// a self-contained demo in network namespaces.
    Run {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a benchmark from bench/ (release build, needs root); writes its
    /// table to bench/results/NAME.md.
    Bench {
        /// classifier | forwarding | tunnel | scale | clients | neighbours | soak
        #[arg(default_value = "classifier")]
        name: String,
    },
    /// Install vpnd, vpnctl, the systemd unit, the example configuration
    /// (kept if one exists) and the state directories.
    Install {
        /// Where the binaries go (PREFIX/sbin, PREFIX/bin).
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Install under this root instead of / (packaging).
        #[arg(long, default_value = "/")]
        destdir: PathBuf,
    },
    /// Run every test (unit and integration; the latter need root).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run every test as `test` does, in QEMU on one of Debian's stock
    /// kernels (needs root; KVM when /dev/kvm works).
    VmTest {
        /// debian-6.1 (bookworm), debian-6.12 (trixie), or the path of a
        /// linux-image-*.deb.
        #[arg(long, default_value = "debian-6.12")]
        kernel: String,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Runs the fuzz targets (all, or those named) for `--secs` each.
    Fuzz {
        targets: Vec<String>,
        #[arg(long, default_value_t = 60)]
        secs: u64,
        /// Repeatable: this seed, the corpus from the committed seeds
        /// alone (what the test gate does with seed 1).
        #[arg(long)]
        seed: Option<u32>,
    },
    /// Inside the VM only: PID 1, runs the plan and powers off.
    #[command(hide = true)]
    VmGuest,
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// Runs a command, failing with its name if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--workspace", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

/// Runs the test command, echoing its output, and ends with one summary
/// line over every test binary (`N passed, N failed`), so the result is
/// not hidden behind the last binary's own line.
fn test(cmd: &mut Command) -> anyhow::Result<()> {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    summarize(child, false)
}

/// `vpn_tests::SPEED_UNMET_MARK`: a test's speed check that a slowed CPU
/// (QEMU without KVM) did not meet.
const SPEED_UNMET_MARK: &str = "vpn-tests: speed check not met on a slowed CPU: ";

/// Echoes `child`'s output (test binaries' lines) and sums their results;
/// `vm`: the output is a VM's console, which ends with the guest's status.
fn summarize(mut child: std::process::Child, vm: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let mut guest_status = None;
    let mut speed_unmet = 0u64;
    // The guest kernel's own failure, if it had one: its first line.
    let mut guest_oops: Option<String> = None;
    for line in BufReader::new(child.stdout.take().expect("piped")).split(b'\n') {
        let line = String::from_utf8_lossy(&line?)
            .trim_end_matches('\r')
            .to_owned();
        println!("{line}");
        if vm
            && guest_oops.is_none()
            && (line.contains("] Oops: ") || line.contains("] Kernel panic - "))
        {
            guest_oops = Some(line.clone());
        }
        if line.contains(SPEED_UNMET_MARK) {
            speed_unmet += 1;
        }
        if let Some(st) = line.strip_prefix(vm::DONE_MARK) {
            guest_status = st.trim().parse::<i32>().ok();
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(';') {
                let mut words = part.split_whitespace().rev();
                let (Some(what), Some(n)) = (words.next(), words.next()) else {
                    continue;
                };
                let n: u64 = n
                    .trim_start_matches("ok.")
                    .trim_start_matches("FAILED.")
                    .trim()
                    .parse()
                    .unwrap_or(0);
                match what {
                    "passed" => passed += n,
                    "failed" => failed += n,
                    "ignored" => ignored += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    println!("\nsummary: {passed} passed, {failed} failed, {ignored} skipped");
    if speed_unmet > 0 {
        println!(
            "summary: {speed_unmet} speed checks not met on the slowed CPU (reported, not asserted)"
        );
    }
    if vm && guest_status.is_none() {
        if let Some(oops) = guest_oops {
            // Seen once in four whole runs under TCG: an int3 left by the
            // guest's live code patching (static keys) hit on the other
            // vCPU after the patch was done, a race of QEMU's
            // multi-threaded TCG. Under KVM, or with one TCG thread, the
            // patching is coherent.
            bail!(
                "the guest kernel failed ({}); if it is `Oops: int3`, that is QEMU's \
                 multi-threaded TCG racing the kernel's code patching, not the tests: \
                 run again, or with VM_TCG_THREADS=single (twice as slow)",
                oops.trim()
            );
        }
        bail!("the VM ended without finishing its run ({status})");
    }
    if !status.success() || failed > 0 || guest_status.is_some_and(|s| s != 0) {
        bail!("tests failed ({status})");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// After the tests: every fuzz target for `VPN_FUZZ_SECS` (60 under CI,
/// none otherwise: `cargo xtask fuzz` runs them on demand), repeatably
/// (seed [`fuzz::GATE_SEED`], corpus from the committed seeds).
fn fuzz_smoke() -> anyhow::Result<()> {
    let secs = std::env::var("VPN_FUZZ_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if std::env::var_os("CI").is_some() {
            60
        } else {
            0
        });
    if secs == 0 {
        println!(
            "fuzz: not run (VPN_FUZZ_SECS=N or CI=true runs each target N s; or `cargo xtask fuzz`)"
        );
        return Ok(());
    }
    let out = fuzz::fuzz(&[], secs, Some(fuzz::GATE_SEED))?;
    let crashed: Vec<&str> = out
        .iter()
        .filter(|o| o.crashed)
        .map(|o| o.target.as_str())
        .collect();
    println!(
        "fuzz: {} targets ran {secs} s each, {} inputs in all; crashed: {}",
        out.len(),
        out.iter().map(|o| o.runs).sum::<u64>(),
        if crashed.is_empty() {
            "none".to_owned()
        } else {
            crashed.join(", ")
        }
    );
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Build { release } => build(release).map(|_| ()),
        Cmd::Run { config } => {
            setup::setup()?;
            let bin = build(false)?;
            match config {
                Some(config) => {
                    use std::os::unix::process::CommandExt;
                    let err = Command::new(bin.join("vpnd"))
                        .arg("--config")
                        .arg(config)
                        .exec();
                    Err(err).context("starting vpnd")
                }
                None => run(Command::new(bin.join("vpn-demo")).env("VPN_GATEWAY_BIN_DIR", &bin)),
            }
        }
        Cmd::Bench { name } => {
            setup::setup()?;
            let bin = build(true)?;
            run(Command::new(bin.join("vpn-bench"))
                .arg(name)
                .env("VPN_GATEWAY_BIN_DIR", &bin))
        }
        Cmd::Install { prefix, destdir } => {
            setup::setup()?;
            let bin = build(true)?;
            let layout = install::Layout::new(&prefix, &destdir);
            for line in install::install(&bin, &root(), &layout)? {
                println!("xtask: {line}");
            }
            println!("xtask: then: systemctl daemon-reload && systemctl enable --now vpn-gateway");
            Ok(())
        }
        Cmd::Test { args } => {
            setup::setup()?;
            let bin = build(false)?;
            let mut c = cargo();
            c.args(["test", "--workspace", "--no-fail-fast"])
                .env("VPN_GATEWAY_BIN_DIR", &bin)
                .arg("--")
                .args(args);
            let tests = test(&mut c);
            let fuzzed = fuzz_smoke();
            tests.and(fuzzed)
        }
        Cmd::Fuzz {
            targets,
            secs,
            seed,
        } => {
            setup::setup()?;
            let out = fuzz::fuzz(&targets, secs, seed)?;
            match out.iter().filter(|o| o.crashed).count() {
                0 => Ok(()),
                n => bail!("{n} fuzz targets crashed"),
            }
        }
        Cmd::VmTest { kernel, args } => {
            vm::keep_self()?;
            setup::setup()?;
            build(false)?;
            let k = vm::kernel(&kernel)?;
            let bins = vm::build_tests()?;
            let plan = vm::write_plan(&bins, &args)?;
            let started = std::time::Instant::now();
            let r = summarize(vm::boot(&k, &plan)?, true);
            println!(
                "xtask: {} ({}) ran for {} s",
                k.name,
                k.version,
                started.elapsed().as_secs()
            );
            r
        }
        Cmd::VmGuest => vm::guest(),
    }
}
