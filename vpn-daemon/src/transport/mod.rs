//! The client transports, in the order a client meets them: TLS (`tls`,
//! with client certificates in `client_cert`, batched tunnel reads in
//! `read_batch` and buffers that exist only while busy in `io_buffer`), then DTLS (`dtls`), and the
//! packet workers that move packets between the tunnel device and the
//! DTLS channels (`workers`); rate-limited clients are paced on both
//! (`pacing`).

pub mod client_cert;
pub mod dtls;
pub mod io_buffer;
pub mod key_signer;
pub mod listener;
pub mod pacing;
pub mod read_batch;
pub mod tls;
pub mod tls_tunnel;
pub mod workers;
