//! `vpn-identity-helper`: a Squid `external_acl_type` helper that tells
//! Squid which VPN user holds a client address, from vpnd's identity feed
//! (`[identity_feed]`), so Squid can log and authorize by VPN user:
//!
//! ```text
//! external_acl_type vpn_user ttl=10 negative_ttl=2 children-max=1 concurrency=100 %SRC \
//!     /usr/local/bin/vpn-identity-helper --feed https://198.18.2.1:9443 \
//!     --pin pin-sha256:... --secret-file /etc/squid/vpn-feed.secret
//! acl vpn_users external vpn_user
//! http_access allow vpn_users
//! ```
//!
//! It follows the feed's change stream into memory (one connection, for
//! every lookup) and resumes it from the last change it saw after any
//! break. Each request line is `[CHANNEL] ADDRESS`; the answer is
//! `[CHANNEL] OK user=NAME group=GROUP` (Squid logs the user, `%un` in
//! its default log format) or `[CHANNEL] ERR` for an address no session
//! holds.

use std::{
    io::{BufRead, Write},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser;
use vpn_daemon::identity::consumer::{FeedClient, Mappings, squid_answer};

#[derive(Parser)]
#[command(
    version,
    about = "Squid external ACL helper: the VPN user of a client address"
)]
struct Args {
    /// The identity feed, `https://ADDRESS:PORT` (`identity_feed.listen`).
    #[arg(long)]
    feed: String,
    /// The feed certificate's `pin-sha256:` (vpnd logs it at start).
    #[arg(long)]
    pin: String,
    /// A file holding `identity_feed.secret` (kept off the command line,
    /// which every local user can read).
    #[arg(long)]
    secret_file: PathBuf,
    /// How long a lookup waits for the first state of the feed at start.
    #[arg(long, default_value_t = 5)]
    wait_secs: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = std::fs::read_to_string(&args.secret_file)
        .with_context(|| format!("reading --secret-file {}", args.secret_file.display()))?
        .trim()
        .to_owned();
    let client = FeedClient::new(&args.feed, secret, args.pin)?;
    let maps = Arc::new(Mappings::default());
    {
        let maps = maps.clone();
        std::thread::spawn(move || client.follow(&maps));
    }
    let wait = Duration::from_secs(args.wait_secs);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line?;
        let reply = squid_answer(&maps, &line, wait);
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}
