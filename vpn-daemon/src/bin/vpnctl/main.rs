//! `vpnctl`: thin dispatch; each subcommand lives in its own module.

mod args;
mod ban;
mod policy;
mod sessions;
mod user;

use std::process::ExitCode;

use clap::Parser;

use args::{Args, Command};

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Command::Sessions { json } => sessions::list(&args.socket, json),
        Command::Disconnect { target } => sessions::disconnect(&args.socket, &target),
        Command::Stats { json } => sessions::stats(&args.socket, json),
        Command::Uplinks { json } => sessions::uplinks(&args.socket, json),
        Command::WebProxies { json } => sessions::web_proxies(&args.socket, json),
        Command::Show { target, json } => sessions::show(&args.socket, &target, json),
        Command::Events(a) => sessions::events(&args.socket, a),
        Command::User(cmd) => user::run(cmd),
        Command::Reload => policy::reload(&args.socket),
        Command::Policy(cmd) => policy::run(&args.socket, cmd),
        Command::Ban(cmd) => ban::run(&args.socket, cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpnctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
