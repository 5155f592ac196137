//! `cargo xtask vm-test`: the whole suite on a distribution's own kernel.
//!
//! A router runs its distribution's kernel, not the one this machine
//! has, so the suite boots Debian's stock kernels in QEMU (KVM when
//! `/dev/kvm` works, software emulation otherwise, said so) and runs there
//! as root:
//!
//! - The kernel comes from the Debian archive (`linux-image-amd64` of
//!   bookworm for 6.1, of trixie for 6.12), fetched with `apt-get
//!   download` through a private apt state under `target/vm/apt`, so the
//!   host's own sources and package lists are not touched; the `.deb` is
//!   unpacked with `dpkg-deb` into `target/vm/kernels/NAME`.
//! - The guest's root file system is this machine's, shared read-only over
//!   9p, with a tmpfs overlay on top: the same binaries, packages and
//!   checked-out tree, and nothing the guest writes reaches the host. The
//!   kernel's modules are bound at `/lib/modules/VERSION` so the guest
//!   loads them on demand as usual.
//! - A small initramfs (busybox, the 9p and overlay modules) mounts that
//!   root and hands over to `xtask vm-guest`, which mounts what a booted
//!   system has (proc, sys, bpffs, cgroup2, tmpfs on /tmp and /run), runs
//!   each test binary as `cargo test` would (built on the host first, same
//!   arguments), prints every line on the serial console and powers off.
//! - The host reads the console, echoes it, and ends with the same
//!   `N passed, N failed` line as `cargo xtask test`.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{root, run};

/// Debian packages the VM needs on the host.
pub const PACKAGES: &[&str] = &[
    "qemu-system-x86", // the VM
    "busybox-static",  // the initramfs's shell and mount
    "xz-utils",        // Debian's kernel modules are xz-compressed
    "kmod",            // depmod for the unpacked kernel, modprobe in the guest
];

/// A kernel the suite knows by name.
struct Known {
    name: &'static str,
    /// The Debian release whose `linux-image-amd64` it is.
    suite: &'static str,
}

const KNOWN: &[Known] = &[
    Known {
        name: "debian-6.1",
        suite: "bookworm",
    },
    Known {
        name: "debian-6.12",
        suite: "trixie",
    },
];

/// An unpacked kernel: its image, its modules and their version.
pub struct Kernel {
    pub name: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
    pub version: String,
}

/// Modules the initramfs loads to mount the root, in dependency order
/// (resolved from modules.dep, so any of them may be built in).
const ROOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];

/// Where everything of the VM lives on the host.
fn vm_dir() -> PathBuf {
    root().join("target").join("vm")
}

/// The kernel `spec` names: one of [`KNOWN`], or the path of a
/// `linux-image-*.deb`.
pub fn kernel(spec: &str) -> anyhow::Result<Kernel> {
    let (name, deb) = match KNOWN.iter().find(|k| k.name == spec) {
        Some(k) => (k.name.to_owned(), None),
        None if spec.ends_with(".deb") && Path::new(spec).is_file() => (
            Path::new(spec)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("custom")
                .to_owned(),
            Some(PathBuf::from(spec)),
        ),
        None => bail!(
            "unknown kernel '{spec}': give {} or the path of a linux-image-*.deb",
            KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
        ),
    };
    let dir = vm_dir().join("kernels").join(&name);
    if let Some(k) = unpacked(&dir, &name)? {
        return Ok(k);
    }
    let deb = match deb {
        Some(d) => d,
        None => {
            let k = KNOWN.iter().find(|k| k.name == name).expect("known");
            download_kernel(k.suite)?
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    let version =
        image_version(&dir)?.with_context(|| format!("{} holds no kernel image", deb.display()))?;
    // Debian 13's packages keep modules in /usr/lib (merged /usr); depmod
    // and the guest look in /lib.
    if dir.join("usr/lib/modules").is_dir() && !dir.join("lib").exists() {
        std::os::unix::fs::symlink("usr/lib", dir.join("lib"))?;
    }
    // What installing the package would have made: modules.dep and the
    // rest, for the initramfs and the guest's modprobe.
    run(Command::new("depmod").arg("-b").arg(&dir).arg(&version))?;
    unpacked(&dir, &name)?.with_context(|| format!("no modules for {version} in {}", deb.display()))
}

/// The version of the kernel image unpacked in `dir` (`boot/vmlinuz-V`).
fn image_version(dir: &Path) -> anyhow::Result<Option<String>> {
    let Ok(boot) = std::fs::read_dir(dir.join("boot")) else {
        return Ok(None);
    };
    for e in boot {
        let file = e?.file_name().to_string_lossy().into_owned();
        if let Some(version) = file.strip_prefix("vmlinuz-") {
            return Ok(Some(version.to_owned()));
        }
    }
    Ok(None)
}

/// The kernel unpacked in `dir`, if it is there with its modules indexed.
fn unpacked(dir: &Path, name: &str) -> anyhow::Result<Option<Kernel>> {
    let Some(version) = image_version(dir)? else {
        return Ok(None);
    };
    let modules = dir.join("lib/modules").join(&version);
    if !modules.join("modules.dep").is_file() {
        return Ok(None);
    }
    Ok(Some(Kernel {
        name: name.to_owned(),
        vmlinuz: dir.join("boot").join(format!("vmlinuz-{version}")),
        modules,
        version,
    }))
}

/// `apt-get` with a private state under target/vm/apt whose only source is
/// Debian's `suite`.
fn apt(suite: &str) -> anyhow::Result<Command> {
    let base = vm_dir().join("apt").join(suite);
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "etc/preferences.d",
    ] {
        std::fs::create_dir_all(base.join(d))?;
    }
    std::fs::write(
        base.join("etc/sources.list"),
        format!("deb http://deb.debian.org/debian {suite} main\n"),
    )?;
    let o = |k: &str, v: &Path| format!("-o{k}={}", v.display());
    let mut c = Command::new("apt-get");
    c.arg("-q")
        .arg(o("Dir::Etc::SourceList", &base.join("etc/sources.list")))
        .arg(o("Dir::Etc::SourceParts", &base.join("etc/none")))
        .arg(o(
            "Dir::Etc::PreferencesParts",
            &base.join("etc/preferences.d"),
        ))
        .arg(o("Dir::State::Lists", &base.join("lists")))
        .arg(o("Dir::Cache", &base.join("cache")))
        .arg("-oAPT::Architecture=amd64")
        // The archive's keys are the host's (debian-archive-keyring puts
        // bookworm's and trixie's in /etc/apt/trusted.gpg.d).
        .arg("-oAcquire::Languages=none");
    Ok(c)
}

/// Downloads the current `linux-image-amd64` kernel of `suite` and returns
/// the `.deb`.
fn download_kernel(suite: &str) -> anyhow::Result<PathBuf> {
    println!("xtask: fetching Debian {suite}'s kernel package");
    run(apt(suite)?.arg("update"))?;
    // The metapackage names the versioned image package.
    let out = apt_cache(suite)?
        .args(["depends", "linux-image-amd64"])
        .output()
        .context("apt-cache depends")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let image = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
        .with_context(|| format!("linux-image-amd64 of {suite} names no image: {text}"))?
        .to_owned();
    let into = vm_dir().join("debs").join(suite);
    std::fs::create_dir_all(&into)?;
    run(apt(suite)?.arg("download").arg(&image).current_dir(&into))?;
    std::fs::read_dir(&into)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with(&format!("{image}_")) && f.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download {image} left no .deb"))
}

/// `apt-cache` over the same private state as [`apt`].
fn apt_cache(suite: &str) -> anyhow::Result<Command> {
    let apt = apt(suite)?;
    let mut c = Command::new("apt-cache");
    c.args(apt.get_args());
    Ok(c)
}

/// The initramfs for `k`: busybox, the modules that mount the root and an
/// `/init` that mounts it and starts `xtask vm-guest` there.
pub fn initramfs(k: &Kernel, guest: &Path, out: &Path) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for d in [
        "bin", "dev", "proc", "sys", "lower", "rw", "root", "modules",
    ] {
        cpio.dir(d);
    }
    let busybox = std::fs::read("/bin/busybox").context("/bin/busybox (busybox-static)")?;
    cpio.file("bin/busybox", &busybox, 0o755);
    let mut load = Vec::new();
    for m in ROOT_MODULES {
        for path in module_with_deps(&k.modules, m)? {
            if !load.contains(&path) {
                load.push(path);
            }
        }
    }
    let mut insmods = String::new();
    for (i, rel) in load.iter().enumerate() {
        let bytes = read_module(&k.modules.join(rel))?;
        let name = format!("modules/{i}.ko");
        cpio.file(&name, &bytes, 0o644);
        insmods.push_str(&format!("/bin/busybox insmod /{name}\n"));
    }
    let modules_in_root = k.modules.to_string_lossy().into_owned();
    let init = format!(
        r#"#!/bin/busybox sh
fail() {{ echo "initramfs: $1"; echo "{DONE_MARK}3"; /bin/busybox poweroff -f; }}
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
{insmods}
/bin/busybox mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /lower || fail "mounting the host's root over 9p failed"
/bin/busybox mount -t tmpfs -o size=75% rw /rw
/bin/busybox mkdir -p /rw/upper /rw/work
/bin/busybox mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /root || fail "the overlay on the host's root failed"
/bin/busybox mkdir -p /root/lib/modules/{version}
/bin/busybox mount --bind /root{modules_in_root} /root/lib/modules/{version}
/bin/busybox mount --move /dev /root/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /root {guest} vm-guest
fail "switch_root failed"
"#,
        version = k.version,
        guest = guest.display(),
    );
    cpio.file("init", init.as_bytes(), 0o755);
    std::fs::write(out, cpio.finish()).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `module` and what it depends on, dependencies first, as paths relative
/// to the modules directory (none for a module built in).
fn module_with_deps(modules: &Path, module: &str) -> anyhow::Result<Vec<String>> {
    let dep = std::fs::read_to_string(modules.join("modules.dep"))
        .with_context(|| format!("{}/modules.dep", modules.display()))?;
    let builtin = std::fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let base = |p: &str| {
        Path::new(p)
            .file_name()
            .and_then(|f| f.to_str())
            .map(|f| f.split('.').next().unwrap_or(f).replace('-', "_"))
            .unwrap_or_default()
    };
    let wanted = module.replace('-', "_");
    if builtin.lines().any(|l| base(l) == wanted) {
        return Ok(Vec::new());
    }
    let line = dep
        .lines()
        .find(|l| l.split(':').next().is_some_and(|p| base(p) == wanted))
        .with_context(|| format!("module {module} is neither in modules.dep nor built in"))?;
    let (path, deps) = line.split_once(':').unwrap_or((line, ""));
    // modules.dep lists a module's dependencies nearest first: loading
    // them in reverse order loads each after what it needs.
    let mut order: Vec<String> = deps.split_whitespace().rev().map(str::to_owned).collect();
    order.push(path.to_owned());
    Ok(order)
}

/// A module file, decompressed (`.ko.xz`, `.ko.zst` or plain `.ko`).
fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).with_context(|| format!("module {name}")),
        Some(t) => {
            let out = Command::new(t)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("{t} -dc {name}"))?;
            if !out.status.success() {
                bail!("{t} -dc {name}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(out.stdout)
        }
    }
}

/// A `newc` cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8], perm: u32) {
        self.entry(name, 0o100000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

/// The CPU a KVM guest gets: the host's, without IA32_ARCH_CAPABILITIES,
/// which QEMU 7.2 cannot set under some hypervisors (it aborts with
/// "failed to set MSR 0x10a").
const KVM_CPU: &str = "host,-arch-capabilities";

/// QEMU with no devices but a serial console on its stdout (stdin none).
fn qemu() -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-nodefaults", "-no-reboot", "-display", "none"])
        .args(["-monitor", "none", "-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    c
}

/// Whether a KVM guest runs here: `/dev/kvm` opens, and `k` started under
/// it prints its banner within 20 s. Under nested virtualisation the
/// device can be there while guests hang before the kernel's first line
/// (seen on this project's 2-core hosts): then the suite runs under
/// software emulation, and says why.
fn kvm_works(k: &Kernel) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm: {e}"));
    }
    let mut probe = match qemu()
        .args(["-m", "256", "-enable-kvm", "-cpu", KVM_CPU])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .args(["-append", "console=ttyS0 panic=-1"])
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(p) => p,
        Err(e) => return Err(format!("qemu-system-x86_64: {e}")),
    };
    let out = probe.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out)
            .split(b'\n')
            .map_while(Result::ok)
        {
            if String::from_utf8_lossy(&line).contains("Linux version") {
                let _ = tx.send(());
                return;
            }
        }
    });
    let booted = rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok();
    let _ = probe.kill();
    let _ = probe.wait();
    if booted {
        Ok(())
    } else {
        Err("/dev/kvm is there, but a guest under it printed nothing in 20 s".into())
    }
}

/// A test binary as `cargo test` runs it: the executable and the package
/// directory it runs in.
#[derive(Debug, Clone)]
pub struct TestBinary {
    pub exe: PathBuf,
    pub cwd: PathBuf,
}

/// Where the guest's copy of this binary is.
fn guest_binary() -> PathBuf {
    vm_dir().join("xtask")
}

/// Keeps a copy of this binary for the guest to run (the host's root is
/// its root). First thing: a workspace build relinks target/debug/xtask
/// (its dependencies' features are unified with the workspace's).
pub fn keep_self() -> anyhow::Result<()> {
    let guest = guest_binary();
    std::fs::create_dir_all(vm_dir())?;
    std::fs::copy(std::env::current_exe()?, &guest)
        .with_context(|| format!("copying xtask to {}", guest.display()))?;
    Ok(())
}

/// Builds every test binary of the workspace on the host and lists them.
pub fn build_tests() -> anyhow::Result<Vec<TestBinary>> {
    let out = crate::cargo()
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        bins.push(TestBinary {
            exe: exe.into(),
            cwd: Path::new(manifest)
                .parent()
                .context("a manifest has a directory")?
                .to_owned(),
        });
    }
    if bins.is_empty() {
        bail!("cargo test --no-run listed no test binary");
    }
    Ok(bins)
}

/// How many times slower than the host the suite runs under TCG, for the
/// tests' `VPN_TEST_SLOWDOWN` (`vpn_tests::slowdown`). Measured on this
/// project's 2-core hosts: 3 logins a second where the host's debug vpnd
/// does dozens, iperf3 through the tunnel at 16-27 Mbit/s; 5 keeps the
/// load tests' ramps within what it can do.
const TCG_SLOWDOWN: u32 = 5;

/// Boots `k` with the plan in `plan` and returns QEMU, its console on the
/// child's stdout.
pub fn boot(k: &Kernel, plan: &Path) -> anyhow::Result<std::process::Child> {
    let dir = vm_dir();
    let guest = guest_binary();
    let initrd = dir.join(format!("initrd-{}.cpio", k.name));
    initramfs(k, &guest, &initrd)?;
    let kvm = match kvm_works(k) {
        Ok(()) => true,
        Err(why) => {
            println!(
                "xtask: no KVM ({why}): software emulation (TCG), many times slower; \
                 the tests scale their clocks by {TCG_SLOWDOWN} and report speed checks \
                 they miss instead of failing on them"
            );
            false
        }
    };
    let slowdown = if kvm { 1 } else { TCG_SLOWDOWN };
    let mem_mib = 6144;
    let mut qemu = qemu();
    qemu.args(["-m", &mem_mib.to_string()])
        .args([
            "-smp",
            &std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .to_string(),
        ])
        .arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            &format!(
                "console=ttyS0 panic=-1 quiet loglevel=4 xtask.plan={} xtask.slowdown={slowdown}",
                plan.display()
            ),
        ])
        .args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ])
        .args(["-nic", "none"]);
    if kvm {
        qemu.args(["-enable-kvm", "-cpu", KVM_CPU]);
    } else {
        // One host thread per vCPU; VM_TCG_THREADS=single runs them all on
        // one (half the speed, but no cross-vCPU race with the guest's
        // live code patching: see `summarize`).
        let threads = match std::env::var("VM_TCG_THREADS").as_deref() {
            Ok("single") => "single",
            _ => "multi",
        };
        qemu.args(["-accel", &format!("tcg,thread={threads}"), "-cpu", "max"]);
    }
    println!(
        "xtask: booting {} ({}) with {} MiB{}",
        k.name,
        k.version,
        mem_mib,
        if kvm { " under KVM" } else { "" }
    );
    qemu.spawn().context("starting qemu-system-x86_64")
}

/// Writes the guest's plan: the test binaries, the arguments for each,
/// and the environment `cargo xtask test` gives them.
pub fn write_plan(bins: &[TestBinary], args: &[String]) -> anyhow::Result<PathBuf> {
    let path = vm_dir().join("plan.json");
    let bin_dir = snapshot_binaries()?;
    let plan = serde_json::json!({
        "binaries": bins.iter().map(|b| serde_json::json!({
            "exe": b.exe,
            "cwd": b.cwd,
        })).collect::<Vec<_>>(),
        "args": args,
        "env": {
            "VPN_GATEWAY_BIN_DIR": bin_dir,
            "CI": std::env::var("CI").unwrap_or_default(),
        },
    });
    std::fs::write(&path, serde_json::to_vec_pretty(&plan)?)?;
    Ok(path)
}

/// Copies the built programs (vpnd, vpnctl, ...) to `target/vm/bin` for
/// the guest: it reads the host's files live over 9p, and a build on the
/// host during a run would replace them under the running tests.
fn snapshot_binaries() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let (from, to) = (root().join("target/debug"), vm_dir().join("bin"));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to)?;
    for e in std::fs::read_dir(&from)? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_file() && meta.permissions().mode() & 0o111 != 0 && e.file_name() != "xtask" {
            std::fs::copy(e.path(), to.join(e.file_name()))
                .with_context(|| format!("copying {}", e.path().display()))?;
        }
    }
    Ok(to)
}

/// What the guest prints last: the exit status of its run.
pub const DONE_MARK: &str = "xtask-vm-guest: done, status ";

/// `xtask vm-guest`: PID 1 in the guest. Mounts what a booted system has,
/// runs the plan's test binaries one after another and powers off.
pub fn guest() -> anyhow::Result<()> {
    let status = match guest_run() {
        Ok(failed) => i32::from(failed),
        Err(e) => {
            println!("xtask-vm-guest: {e:#}");
            2
        }
    };
    println!("{DONE_MARK}{status}");
    let _ = std::io::stdout().flush();
    // SAFETY: sync and reboot(RB_POWER_OFF) as PID 1; nothing of the
    // guest is kept.
    unsafe {
        sync();
        reboot(0x4321_fedc);
    }
    Ok(())
}

unsafe extern "C" {
    fn sync();
    fn reboot(cmd: i32) -> i32;
}

/// Returns whether any binary failed.
fn guest_run() -> anyhow::Result<bool> {
    let sh = |script: &str| run(Command::new("/bin/sh").args(["-ec", script]));
    sh("mount -t proc proc /proc
        mount -t sysfs sys /sys
        mkdir -p /dev/pts /dev/shm
        # What udev would make: nft -f /dev/stdin, shells' /dev/fd.
        ln -sf /proc/self/fd /dev/fd
        ln -sf /proc/self/fd/0 /dev/stdin
        ln -sf /proc/self/fd/1 /dev/stdout
        ln -sf /proc/self/fd/2 /dev/stderr
        mount -t devpts devpts /dev/pts
        mount -t tmpfs tmpfs /dev/shm
        mount -t tmpfs tmpfs /run
        mount -t tmpfs tmpfs /tmp
        mount -t bpf bpf /sys/fs/bpf
        mount -t cgroup2 cgroup2 /sys/fs/cgroup
        mount -t debugfs debugfs /sys/kernel/debug || true
        mount -t tracefs tracefs /sys/kernel/tracing || true
        ip link set lo up
        hostname vm-test
        # No udev here: /dev/net/tun appears once its module is in.
        modprobe tun")?;
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let plan_path = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("xtask.plan="))
        .context("no xtask.plan= on the kernel command line")?;
    let slowdown = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("xtask.slowdown="))
        .unwrap_or("1");
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(plan_path)?)?;
    let args: Vec<String> = serde_json::from_value(plan["args"].clone())?;
    println!(
        "xtask-vm-guest: kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim()
    );
    let mut failed = false;
    for b in plan["binaries"].as_array().context("binaries")? {
        let exe = b["exe"].as_str().context("exe")?;
        let cwd = b["cwd"].as_str().context("cwd")?;
        println!("     Running {exe}");
        let mut c = Command::new(exe);
        // The console is a terminal: no colour codes in what the host parses.
        c.arg("--color=never").args(&args).current_dir(cwd);
        c.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        c.env("HOME", "/root");
        c.env("VPN_TEST_SLOWDOWN", slowdown);
        if let Some(env) = plan["env"].as_object() {
            for (k, v) in env {
                if let Some(v) = v.as_str().filter(|v| !v.is_empty()) {
                    c.env(k, v);
                }
            }
        }
        let st = c.status().with_context(|| format!("starting {exe}"))?;
        failed |= !st.success();
    }
    Ok(failed)
}
