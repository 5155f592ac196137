//! The kernel side of the data path: the BPF programs and their pinned
//! maps (`bpf`), and the multi-queue TUN device (`tun`).

pub mod bpf;
pub mod tun;
