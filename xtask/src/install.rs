//! `cargo xtask install [--prefix DIR] [--destdir DIR]`: a release build
//! installed as a service would run it. Binaries go to `PREFIX/sbin/vpnd`
//! and `PREFIX/bin/vpnctl`, the systemd unit to
//! `/etc/systemd/system/vpn-gateway.service` (its ExecStart pointing at
//! that vpnd), the example configuration to
//! `/etc/vpn-gateway/gateway.toml` unless one is there (an admin's file is
//! never overwritten), and the state and log directories are created with
//! the modes the daemon expects. `DESTDIR` puts all of it under another
//! root (packaging, and the tests).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// Where each piece goes.
pub struct Layout {
    pub vpnd: PathBuf,
    pub vpnctl: PathBuf,
    pub unit: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log_dir: PathBuf,
    /// The vpnd path the unit runs (without DESTDIR).
    exec: PathBuf,
}

impl Layout {
    pub fn new(prefix: &Path, destdir: &Path) -> Self {
        let under = |p: &Path| destdir.join(p.strip_prefix("/").unwrap_or(p));
        Layout {
            vpnd: under(&prefix.join("sbin/vpnd")),
            vpnctl: under(&prefix.join("bin/vpnctl")),
            unit: under(Path::new("/etc/systemd/system/vpn-gateway.service")),
            config: under(Path::new("/etc/vpn-gateway/gateway.toml")),
            state_dir: under(Path::new("/var/lib/vpn-gateway")),
            log_dir: under(Path::new("/var/log/vpn-gateway")),
            exec: prefix.join("sbin/vpnd"),
        }
    }
}

fn mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn put(from: &Path, to: &Path, m: u32) -> anyhow::Result<()> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    // Copy beside it and rename: a running vpnd's binary is replaced, not
    // written into.
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    mode(&tmp, m)?;
    std::fs::rename(&tmp, to).with_context(|| format!("installing {}", to.display()))
}

/// Installs the binaries of `bin_dir` and the files of the workspace
/// `root` into `layout`; returns what it did, a line each.
pub fn install(bin_dir: &Path, root: &Path, layout: &Layout) -> anyhow::Result<Vec<String>> {
    let mut did = Vec::new();
    put(&bin_dir.join("vpnd"), &layout.vpnd, 0o755)?;
    did.push(format!("installed {}", layout.vpnd.display()));
    put(&bin_dir.join("vpnctl"), &layout.vpnctl, 0o755)?;
    did.push(format!("installed {}", layout.vpnctl.display()));

    let unit = std::fs::read_to_string(root.join("examples/systemd/vpn-gateway.service"))
        .context("reading examples/systemd/vpn-gateway.service")?
        .replace(
            "ExecStart=/usr/local/sbin/vpnd",
            &format!("ExecStart={}", layout.exec.display()),
        );
    if let Some(d) = layout.unit.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&layout.unit, unit)
        .with_context(|| format!("writing {}", layout.unit.display()))?;
    mode(&layout.unit, 0o644)?;
    did.push(format!("installed {}", layout.unit.display()));

    let dir = layout.config.parent().expect("the config has a directory");
    std::fs::create_dir_all(dir)?;
    if layout.config.exists() {
        did.push(format!("kept {} (it exists)", layout.config.display()));
    } else {
        put(&root.join("examples/gateway.toml"), &layout.config, 0o600)?;
        did.push(format!(
            "installed {} (the example: edit it)",
            layout.config.display()
        ));
    }
    for (d, m) in [(&layout.state_dir, 0o700), (&layout.log_dir, 0o750)] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        mode(d, m)?;
        did.push(format!("created {} ({m:o})", d.display()));
    }
    Ok(did)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installs_the_layout_and_keeps_an_admins_config() {
        let base = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let bins = base.join("bins");
        std::fs::create_dir_all(&bins).unwrap();
        std::fs::write(bins.join("vpnd"), b"vpnd").unwrap();
        std::fs::write(bins.join("vpnctl"), b"vpnctl").unwrap();
        let dest = base.join("root");
        let layout = Layout::new(Path::new("/opt/vpn"), &dest);
        install(&bins, &crate::root(), &layout).unwrap();

        assert_eq!(
            std::fs::read(dest.join("opt/vpn/sbin/vpnd")).unwrap(),
            b"vpnd"
        );
        let m = |p: &str| {
            std::fs::metadata(dest.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(m("opt/vpn/sbin/vpnd"), 0o755);
        assert_eq!(m("opt/vpn/bin/vpnctl"), 0o755);
        assert_eq!(m("etc/vpn-gateway/gateway.toml"), 0o600);
        assert_eq!(m("var/lib/vpn-gateway"), 0o700);
        assert_eq!(m("var/log/vpn-gateway"), 0o750);
        let unit =
            std::fs::read_to_string(dest.join("etc/systemd/system/vpn-gateway.service")).unwrap();
        assert!(
            unit.contains("ExecStart=/opt/vpn/sbin/vpnd --config"),
            "{unit}"
        );

        // A second install replaces the binaries and keeps the config.
        std::fs::write(dest.join("etc/vpn-gateway/gateway.toml"), "# mine\n").unwrap();
        std::fs::write(bins.join("vpnd"), b"vpnd 2").unwrap();
        let did = install(&bins, &crate::root(), &layout).unwrap();
        assert!(did.iter().any(|l| l.starts_with("kept")), "{did:?}");
        assert_eq!(
            std::fs::read_to_string(dest.join("etc/vpn-gateway/gateway.toml")).unwrap(),
            "# mine\n"
        );
        assert_eq!(
            std::fs::read(dest.join("opt/vpn/sbin/vpnd")).unwrap(),
            b"vpnd 2"
        );
        let _ = std::fs::remove_dir_all(base);
    }
}
