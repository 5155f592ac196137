//! Empty library target: it lets `vpn-daemon` name this crate as a build
//! dependency, so cargo rebuilds the daemon (which embeds the BPF object)
//! whenever the programs change.
#![no_std]
