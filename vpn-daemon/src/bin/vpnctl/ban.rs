//! `vpnctl ban list|add|remove`.

use std::path::Path;

use anyhow::bail;
use vpn_daemon::api::{BanRow, Request, Response};

use crate::{args::BanCommand, sessions::call};

pub fn run(socket: &Path, cmd: BanCommand) -> anyhow::Result<()> {
    match cmd {
        BanCommand::List { json } => {
            let Response::Bans { bans } = call(socket, Request::Bans)? else {
                bail!("unexpected answer from vpnd");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&bans)?);
                return Ok(());
            }
            println!("{:<24} {:<21} {:>10}  REASON", "SOURCE", "SINCE", "LEFT");
            for b in &bans {
                println!(
                    "{:<24} {:<21} {:>10}  {}",
                    b.source,
                    b.since,
                    left(b),
                    b.reason
                );
            }
            if bans.is_empty() {
                println!("(no bans)");
            }
        }
        BanCommand::Add { source, time } => {
            let req = Request::Ban {
                source,
                secs: time.map(|t| t.as_secs().max(1)),
            };
            let Response::Banned { banned } = call(socket, req)? else {
                bail!("unexpected answer from vpnd");
            };
            println!("banned {} ({})", banned.source, left(&banned));
        }
        BanCommand::Remove { source } => {
            let Response::Unbanned { unbanned } = call(socket, Request::Unban { source })? else {
                bail!("unexpected answer from vpnd");
            };
            println!("ban of {} lifted ({})", unbanned.source, unbanned.reason);
        }
    }
    Ok(())
}

fn left(b: &BanRow) -> String {
    match b.secs_left {
        None => "until lifted".into(),
        Some(s) => humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    }
}
