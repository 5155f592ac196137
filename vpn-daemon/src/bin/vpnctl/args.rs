//! Command-line types for `vpnctl`. Doc comments become `--help`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Administer a running vpn-gateway (vpnd) and its local users.
#[derive(Parser)]
#[command(version)]
pub struct Args {
    /// vpnd's control socket.
    #[arg(long, global = true, default_value = vpn_daemon::paths::CONTROL_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// List sessions: user, VPN address, public address, since, traffic, pseudo-MAC.
    Sessions {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End the sessions of a user, or the session holding a VPN address.
    Disconnect {
        /// User name or VPN address.
        target: String,
    },
    /// Gateway counters: sessions, pool use, packets dropped by the BPF programs.
    Stats {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Everything about the sessions of USER, or the session at ADDRESS:
    /// what the client was pushed, who authenticated it, its policy's
    /// rules and hits, counters, transport, and the time each timer has
    /// left.
    Show {
        /// A user name or a VPN address.
        target: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The event log (logins, failures, connects, disconnects with why,
    /// lock-outs, uplinks, reloads), oldest first.
    Events(EventsArgs),
    /// Uplinks: state (carrier and probe), active or standby, probe RTT and
    /// losses, interface bytes.
    Uplinks {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Web proxies (`[[web_proxy]]`): up or down, probes sent and failed,
    /// how long in that state.
    WebProxies {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-read the configuration: group policies apply live to every session;
    /// a file that does not validate is rejected and the running one stays.
    Reload,
    /// Inspect group policies and their rule hit counters.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Manage the local user database (no daemon needed).
    #[command(subcommand)]
    User(UserCommand),
    /// Banned sources: they open no new connections (dropped in XDP
    /// before any socket work); their tunnels already up stay up. Sources
    /// are banned by ban points (`[ban]`) or here.
    #[command(subcommand)]
    Ban(BanCommand),
}

#[derive(Subcommand)]
pub enum BanCommand {
    /// Bans in force: source, since, time left, reason.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Ban an address or a prefix (198.18.7.1, 198.18.7.0/24, fd00:7::/64).
    Add {
        source: String,
        /// For how long (`30m`, `2h`, `1day`); without it, until removed.
        #[arg(long = "for", value_name = "TIME", value_parser = humantime::parse_duration)]
        time: Option<std::time::Duration>,
    },
    /// Lift the ban of exactly that address or prefix.
    Remove { source: String },
}

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Installed policies: rules, sessions using them, switches.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One policy's rules with the packets each has matched.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Add a user; the password is read from the terminal, or from stdin when it is not a terminal.
    Add {
        name: String,
        /// Group policy applied to this user's sessions.
        #[arg(long)]
        group_policy: Option<String>,
        #[command(flatten)]
        file: UsersFile,
    },
    /// Remove a user.
    Del {
        name: String,
        #[command(flatten)]
        file: UsersFile,
    },
    /// Change a user's password (read like `add`).
    Passwd {
        name: String,
        #[command(flatten)]
        file: UsersFile,
    },
    /// List users and their group policies.
    List {
        #[command(flatten)]
        file: UsersFile,
    },
    /// Import users with their password hashes from an ocserv `ocpasswd`
    /// file (name:group:hash) or an /etc/shadow file: crypt SHA-512 ($6$)
    /// and SHA-256 ($5$) hashes are kept as they are, so passwords keep
    /// working (`vpnctl user passwd` later moves a user to argon2id).
    /// Users already in the database are left alone; each line that
    /// cannot be imported is reported with its reason.
    Import {
        /// The ocpasswd or shadow file.
        from: PathBuf,
        /// Take ocpasswd's group (not "*") as the user's group policy.
        #[arg(long)]
        groups_as_policies: bool,
        #[command(flatten)]
        file: UsersFile,
    },
}

#[derive(clap::Args)]
pub struct UsersFile {
    /// The user database (auth.users_file in the gateway's config).
    #[arg(long = "users", default_value = vpn_daemon::paths::USERS_FILE)]
    pub path: PathBuf,
}

/// `vpnctl events`.
#[derive(clap::Args, Debug)]
pub struct EventsArgs {
    /// Keep printing new events as they come (Ctrl-C ends).
    #[arg(long, short)]
    pub follow: bool,
    /// Only this user's events.
    #[arg(long)]
    pub user: Option<String>,
    /// Only events of this type (client_connected, authentication_failed,
    /// ...).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// Only events since this long ago (`10m`, `2h`, `1day`) or this RFC
    /// 3339 time.
    #[arg(long)]
    pub since: Option<String>,
    /// At most this many (the newest). Default 100.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
}
