//! `vpnctl reload` and `vpnctl policy list|show`.

use std::path::Path;

use anyhow::bail;
use vpn_daemon::api::{Request, Response};

use crate::{args::PolicyCommand, sessions::call};

pub fn reload(socket: &Path) -> anyhow::Result<()> {
    let Response::Reloaded { reloaded } = call(socket, Request::Reload)? else {
        bail!("unexpected answer from vpnd");
    };
    println!("{reloaded}");
    Ok(())
}

pub fn run(socket: &Path, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::List { json } => {
            let Response::Policies { policies } = call(socket, Request::Policies)? else {
                bail!("unexpected answer from vpnd");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&policies)?);
                return Ok(());
            }
            println!(
                "{:<20} {:>6} {:>6} {:>9} {:>8} {:>10} {:>10} {:>9}  DEFAULT",
                "NAME", "ID", "RULES", "SESSIONS", "ISOLATE", "UP KBPS", "DOWN KBPS", "ENTRIES"
            );
            for p in &policies {
                println!(
                    "{:<20} {:>6} {:>6} {:>9} {:>8} {:>10} {:>10} {:>9}  {}",
                    p.name,
                    p.id,
                    p.rules,
                    p.sessions,
                    if p.client_isolation { "yes" } else { "no" },
                    if p.bandwidth_up_kbps == 0 {
                        "-".to_string()
                    } else {
                        p.bandwidth_up_kbps.to_string()
                    },
                    if p.bandwidth_down_kbps == 0 {
                        "-".to_string()
                    } else {
                        p.bandwidth_down_kbps.to_string()
                    },
                    p.map_entries,
                    if p.default { "yes" } else { "" }
                );
            }
            if policies.is_empty() {
                println!("(no group policies configured)");
            }
        }
        PolicyCommand::Show { name, json } => {
            let Response::Policy { policy, rules } = call(socket, Request::Policy { name })? else {
                bail!("unexpected answer from vpnd");
            };
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({ "policy": policy, "rules": rules })
                    )?
                );
                return Ok(());
            }
            println!(
                "policy {} (id {}): {} sessions, client isolation {}, split enforcement {}",
                policy.name,
                policy.id,
                policy.sessions,
                if policy.client_isolation { "on" } else { "off" },
                if policy.split_enforcement {
                    "on"
                } else {
                    "off"
                }
            );
            println!("{:>4}  {:<48} {:>12}  COMMENT", "#", "RULE", "HITS");
            for r in &rules {
                println!(
                    "{:>4}  {:<48} {:>12}  {}",
                    r.index,
                    r.rule,
                    r.hits,
                    r.comment.as_deref().unwrap_or("")
                );
            }
            println!(
                "{:>4}  {:<48} {:>12}",
                "-", "allow (default: no rule matched)", ""
            );
        }
    }
    Ok(())
}
