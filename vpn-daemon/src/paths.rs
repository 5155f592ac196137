//! Where the daemon keeps its files by default, in one place (each can be
//! changed in the config).

/// The control socket `vpnctl` talks to (`server.control_socket`).
pub const CONTROL_SOCKET: &str = "/run/vpn-gateway/vpnd.sock";
/// Generated state, such as the self-signed certificate (`server.state_dir`).
pub const STATE_DIR: &str = "/var/lib/vpn-gateway";
/// The local user database (`auth.users_file`).
pub const USERS_FILE: &str = "/etc/vpn-gateway/users.toml";
/// The bpffs directory the BPF maps are pinned under (`server.bpf_pin_dir`).
pub const BPF_PIN_DIR: &str = vpn_common::DEFAULT_PIN_DIR;
