//! Builds the BPF programs in `vpn-ebpf` with the nightly toolchain (aya-build
//! runs `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`)
//! so the daemon can embed the object with `include_bytes_aligned!`.
//!
//! The daemon itself builds on stable; only this step needs the nightly,
//! `rust-src` and `bpf-linker`, which `cargo xtask setup` installs.

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "vpn-ebpf")
        .ok_or_else(|| anyhow!("vpn-ebpf package not found"))?;
    let cargo_metadata::Package {
        name,
        manifest_path,
        ..
    } = ebpf_package;
    let root_dir = manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {manifest_path}"))?
        .as_str();
    let ebpf_package = Package {
        name: name.as_str(),
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf_package], Toolchain::default())
}
