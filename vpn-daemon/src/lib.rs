//! vpn-gateway's daemon library: everything `vpnd` does lives here, the
//! binaries in `src/bin/` only parse arguments and dispatch.
//!
//! # Layout, in the order a client and its packets meet it
//!
//! - [`daemon::run`] starts everything; [`gateway`] wires the services
//!   together and reloads.
//! - [`transport::listener`] accepts TLS within the limits of
//!   [`auth::admission`]; [`login`] answers the login portal with the pure
//!   flow of [`auth::login`]; [`session::manager`] gives a login its
//!   session (address from [`session::pool`], entries in [`datapath::bpf`],
//!   its policy from [`policies`]).
//! - [`transport::tls_tunnel`] runs the CONNECT ([`proto::connect`]) and
//!   the CSTP tunnel; [`transport::dtls`] the UDP channel; the packet
//!   workers ([`transport::workers`]) move packets between the tunnel
//!   device ([`datapath::tun`]) and the DTLS channels, with the packet
//!   surgery of [`packet`].
//! - [`net::uplinks`] routes the clients' traffic out, [`net::web_proxy`]
//!   routes a policy's web traffic to its proxy, [`control`] answers
//!   `vpnctl` (the messages and figures are [`api`]'s, plain data),
//!   [`events`] writes the event log.
//! - [`profile`] generates the client profile the login announces;
//!   [`identity`] serves who holds which address (the journal of
//!   [`session::journal`]) to web proxies and their helper.
//!
//! # Errors
//!
//! Typed (`thiserror`) at each boundary, with the facts in the variants:
//! the bad value and what would be valid for config and policies, the map
//! write the kernel refused, why a login earns no session or a tunnel
//! ended. Event reasons have one `Display` each. `anyhow` is for start-up
//! (loading BPF, binding sockets, reading certificates) and the binaries.
//!
//! # Lock policy
//!
//! Every lock is `parking_lot`'s (`clippy.toml` forbids the std ones). They
//! do not poison: a panic in one request's critical section must never
//! turn into a failure of every later request that takes the lock (with
//! std locks and `.lock().unwrap()`, one panicking login used to disable
//! all logins until a restart). In return each critical section keeps its
//! data consistent at every step, holds no `.await`, and contains nothing
//! that panics on input from the network: a lookup that can miss is an
//! `Option` handled there, never an `expect`.
pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod events;
pub mod files;
pub mod gateway;
#[cfg(test)]
mod hostile_input_tests;
pub mod identity;
#[cfg(test)]
mod layering_tests;
pub mod login;
pub mod mac;
pub mod metrics;
pub mod net;
pub mod packet;
pub mod paths;
pub mod policies;
pub mod policy;
pub mod privileges;
pub mod profile;
pub mod proto;
pub mod resources;
pub mod session;
pub mod telemetry;
pub mod transport;
pub mod unix_users;

pub use daemon::run;
