//! vpn-gateway's daemon library: everything `vpnd` does lives here, the
//! binaries in `src/bin/` only parse arguments and dispatch.
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
pub mod auth;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod events;
pub mod gateway;
#[cfg(test)]
mod hostile_input_tests;
#[cfg(test)]
mod layering_tests;
pub mod login;
pub mod mac;
pub mod net;
pub mod packet;
pub mod paths;
pub mod policies;
pub mod policy;
pub mod proto;
pub mod session;
pub mod transport;
pub mod unix_users;

pub use daemon::run;
