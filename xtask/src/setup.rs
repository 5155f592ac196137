//! `cargo xtask setup`: installs what building and testing need. Each step
//! checks first, so a second run changes nothing and takes seconds.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages: the real peers and tools the tests drive.
const PACKAGES: &[&str] = &[
    "openconnect",      // the client the tests connect with
    "vpnc-scripts",     // openconnect's default script (the demo and admins use it)
    "iperf3",           // throughput through the tunnel
    "bpftool",          // reading pinned maps
    "nftables",         // masquerade (uplinks issue) and UDP blocking in tests
    "iproute2",         // ip netns, veth
    "iputils-ping",     // ping through the tunnel
    "util-linux",       // nsenter
    "procps",           // sysctl
    "libssl-dev",       // OpenSSL 3 for the DTLS server (openssl crate)
    "pkg-config",       // how openssl-sys finds it
    "ocserv",           // the peer the tunnel benchmark compares against
    "freeradius",       // the RADIUS server the authentication tests log in against
    "freeradius-utils", // radclient: the RADIUS server's side of CoA and Disconnect tests
    "slapd",            // the LDAP directory the authentication tests log in against
    "ldap-utils",       // ldapsearch, for checking an LDAP setup by hand
    "squid",            // the web proxy redirection tests send web traffic through
    "curl",             // web requests through the tunnel and to the identity feed
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn setup() -> anyhow::Result<()> {
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt_packages() -> anyhow::Result<()> {
    apt_install(PACKAGES)?;
    // `cargo xtask vm-test`'s: QEMU, busybox for the initramfs.
    apt_install(crate::vm::PACKAGES)
}

/// Installs those of `packages` that are missing.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: run `cargo xtask setup` as root (or apt-get install them)",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn rustup(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("rustup")
        .args(args)
        .output()
        .context("running rustup (the BPF programs need the nightly toolchain)")?;
    if !out.status.success() {
        bail!(
            "rustup {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = rustup(&["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly Rust toolchain: the BPF crate builds with the nightly and -Z build-std=core"
        );
    }
    let comps = rustup(&["component", "list", "--toolchain", "nightly", "--installed"])?;
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to the nightly toolchain");
        rustup(&["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    Ok(())
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
}

/// bpf-linker must use the same LLVM as the nightly rustc that emits the
/// bitcode. We point its build at the nightly's own `libLLVM.so.*` through a
/// prefix directory holding two symlinks: `libLLVM.so` for the link step
/// (the toolchain's `libLLVM-22-*.so` is a linker script that does not
/// work) and the soname for the runtime loader (bpf-linker's RUNPATH points
/// at this directory).
fn bpf_linker() -> anyhow::Result<()> {
    if bpf_linker_ok() {
        return Ok(());
    }
    let sysroot = rustup(&["run", "nightly", "rustc", "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let real = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
    let prefix = llvm_prefix()?;
    let plib = prefix.join("lib");
    std::fs::create_dir_all(&plib)?;
    for name in [
        std::ffi::OsString::from("libLLVM.so"),
        real.file_name().unwrap().to_owned(),
    ] {
        let link = plib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against {}",
        real.display()
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !bpf_linker_ok() {
        bail!(
            "bpf-linker was installed but `bpf-linker --version` does not run; is ~/.cargo/bin on PATH?"
        );
    }
    Ok(())
}

/// A lasting home for the LLVM prefix: bpf-linker's RUNPATH points into it.
fn llvm_prefix() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    Ok(home.join("vpn-gateway-llvm-prefix"))
}
