//! Who may log in, and how much a stranger may make the gateway do before
//! that: the local user database (`users`) and the limits before
//! authentication (`admission`).

pub mod admission;
pub mod login;
pub mod users;
