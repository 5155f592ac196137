//! vpn-gateway's daemon library: everything `vpnd` does lives here, the
//! binaries in `src/bin/` only parse arguments and dispatch.
pub mod bpf;
pub mod config;
pub mod control;
pub mod cstp;
pub mod csum;
pub mod dtls;
pub mod events;
pub mod flow_control;
pub mod gro;
pub mod gso;
pub mod http;
pub mod login;
pub mod mac;
pub mod netlink;
pub mod policies;
pub mod policy;
pub mod pool;
pub mod read_batch;
pub mod server;
pub mod session;
pub mod tls;
pub mod tun;
pub mod tunnel;
pub mod uplinks;
pub mod users;
pub mod xml;
