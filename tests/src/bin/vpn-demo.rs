//! `vpn-demo`, what `cargo xtask run` starts without a config: a
//! self-contained demo.
//!
//! Builds client, gateway and internal-server namespaces (198.18.0.0/15
//! only), starts vpnd with an embedded config on the default control socket
//! and pin directory (so plain `vpnctl sessions` and `bpftool map dump
//! pinned /sys/fs/bpf/vpn/sessions` work from another terminal), connects
//! the real openconnect client, and runs until Ctrl-C. Everything it made is
//! removed on the way out.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};

use vpn_tests::{Client, Gateway, SERVER, TestUser, Topology};

const DEMO_USER: &str = "demo";
const DEMO_PASSWORD: &str = "demo-password";

fn demo_config(dir: &Path) -> String {
    format!(
        r#"# vpn-gateway demo (written by `cargo xtask run`)
[server]
listen = "{gw}:443"
state_dir = "{dir}/state"
event_log = "{dir}/events.jsonl"
max_sessions = 20

[auth]
users_file = "{dir}/users.toml"

[tunnel]
pool_v4 = "198.19.0.0/24"
pool_v6 = "fd00:1::/64"
dns = ["198.18.2.2"]
default_domain = "demo.example"
banner = "Welcome to the vpn-gateway demo."

[client_routing]
mode = "include"
subnets = ["198.18.2.0/24", "fd00:2::/64"]

[policy]
default = "demo"

[[group_policy]]
name = "demo"
split_enforcement = true

[[group_policy.rule]]
action = "deny"
protocol = "tcp"
destination = "198.18.2.0/24"
port = "23"
comment = "no telnet"
"#,
        gw = vpn_tests::GW_OUTSIDE,
        dir = dir.display()
    )
}

fn main() -> anyhow::Result<()> {
    vpn_tests::require_root();
    let bin = vpn_tests::bin_dir();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing the Ctrl-C handler")?;
    }
    if Path::new(vpn_daemon::paths::CONTROL_SOCKET).exists()
        && std::os::unix::net::UnixStream::connect(vpn_daemon::paths::CONTROL_SOCKET).is_ok()
    {
        bail!(
            "a vpnd is already running on {}; stop it before starting the demo",
            vpn_daemon::paths::CONTROL_SOCKET
        );
    }

    let topo = Topology::new()?;
    println!(
        "namespaces: client {}, gateway {}, server {}",
        topo.client.name, topo.gw.name, topo.server.name
    );
    let gw = Gateway::start_with(
        &topo,
        demo_config,
        &[TestUser {
            name: DEMO_USER,
            password: DEMO_PASSWORD,
            group_policy: None,
        }],
    )?;
    println!("vpnd is up; server certificate {}", gw.pin);
    let mut client = Client::start(&topo, &gw, DEMO_USER, DEMO_PASSWORD, &[])?;
    let env = client.wait_connected(Duration::from_secs(20))?;
    println!(
        "openconnect connected as {DEMO_USER}: tunnel address {}",
        env.get("INTERNAL_IP4_ADDRESS")
            .map(String::as_str)
            .unwrap_or("?")
    );
    let ping = topo.client.ping(SERVER, 3);
    println!(
        "ping {SERVER} (internal server) through the tunnel: {}",
        if ping { "ok" } else { "FAILED" }
    );
    println!("\n$ vpnctl sessions");
    let _ = Command::new(bin.join("vpnctl")).arg("sessions").status();
    println!(
        "\nTry, from another terminal:\n  {vpnctl} sessions\n  {vpnctl} stats\n  {vpnctl} policy show demo\n  bpftool map dump pinned /sys/fs/bpf/vpn/sessions\n  ip netns exec {c} ping {SERVER}\n  ip netns exec {c} iperf3 -c {SERVER}   (after: ip netns exec {s} iperf3 -s -D)\nThe demo user is {DEMO_USER} / {DEMO_PASSWORD}. Press Ctrl-C to stop and remove everything.",
        vpnctl = bin.join("vpnctl").display(),
        c = topo.client.name,
        s = topo.server.name,
    );
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping: openconnect, vpnd, namespaces");
    drop(client);
    drop(gw);
    drop(topo);
    Ok(())
}
