//! Packet surgery shared by both transports, without I/O: IP checks,
//! checksums, receive offload (merging a client's TCP segments, `gro`) and
//! segmentation of the large packets the tunnel device hands out (`gso`).
//! Nothing here imports from the rest of the crate.

pub mod csum;
pub mod gro;
pub mod gso;
pub mod ip;
