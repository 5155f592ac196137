//! The kernel side of the data path: the BPF programs and their pinned
//! maps (`bpf`), the multi-queue TUN device (`tun`), and which kernel
//! offloads they use (`offloads`).

pub mod bpf;
pub mod offloads;
pub mod tun;
