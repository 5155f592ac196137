//! `vpnctl user ...`: edits the local user database file directly.

use std::io::{BufRead, IsTerminal};

use anyhow::{Context as _, bail};
use vpn_daemon::auth::users::UserFile;

use crate::args::UserCommand;

/// Reads a password without echo from the terminal (asking twice), or one
/// line from stdin when stdin is not a terminal. Never from the command line.
fn read_password(user: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        let p1 = rpassword::prompt_password(format!("Password for {user}: "))?;
        let p2 = rpassword::prompt_password("Again: ")?;
        if p1 != p2 {
            bail!("the passwords do not match");
        }
        Ok(p1)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

pub fn run(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add {
            name,
            group_policy,
            file,
        } => {
            vpn_daemon::auth::users::validate_name(&name)?;
            if UserFile::read(&file.path)?.find(&name).is_some() {
                return Err(vpn_daemon::auth::users::UserError::Exists(name).into());
            }
            let pw = read_password(&name)?;
            UserFile::edit(&file.path, |db| db.add(&name, &pw, group_policy))?;
            println!("added user {name} to {}", file.path.display());
        }
        UserCommand::Del { name, file } => {
            UserFile::edit(&file.path, |db| db.remove(&name))?;
            println!("removed user {name}");
        }
        UserCommand::Passwd { name, file } => {
            if UserFile::read(&file.path)?.find(&name).is_none() {
                bail!("no user '{name}' in {}", file.path.display());
            }
            let pw = read_password(&name)?;
            UserFile::edit(&file.path, |db| db.set_password(&name, &pw))?;
            println!("changed the password of {name}");
        }
        UserCommand::Import {
            from,
            groups_as_policies,
            file,
        } => {
            let text = std::fs::read_to_string(&from)
                .with_context(|| format!("reading {}", from.display()))?;
            let lines = vpn_daemon::auth::users::parse_password_file(&text);
            let (mut added, mut existing, mut refused) = (0, Vec::new(), 0);
            UserFile::edit(&file.path, |db| {
                for line in &lines {
                    match line {
                        Ok(u) if db.find(&u.name).is_some() => existing.push(u.name.clone()),
                        Ok(u) => {
                            let policy = u.group.clone().filter(|_| groups_as_policies);
                            db.add_hashed(&u.name, &u.hash, policy)?;
                            added += 1;
                        }
                        Err(why) => {
                            eprintln!("{}: {why}", from.display());
                            refused += 1;
                        }
                    }
                }
                Ok(())
            })?;
            if !existing.is_empty() {
                eprintln!(
                    "already in the database, left as they are: {}",
                    existing.join(", ")
                );
            }
            println!(
                "imported {added} users into {} ({} already there, {refused} refused)",
                file.path.display(),
                existing.len()
            );
            if added == 0 && refused > 0 {
                bail!("no user imported");
            }
        }
        UserCommand::List { file } => {
            let db = UserFile::read(&file.path)?;
            println!("{:<24} GROUP POLICY", "USER");
            for u in &db.users {
                println!(
                    "{:<24} {}",
                    u.name,
                    u.group_policy.as_deref().unwrap_or("(default)")
                );
            }
        }
    }
    Ok(())
}
