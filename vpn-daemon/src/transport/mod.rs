//! The client transports, in the order a client meets them: TLS (`tls`,
//! with client certificates in `client_cert` and batched tunnel reads in
//! `read_batch`), then DTLS (`dtls`), and the
//! packet workers that move packets between the tunnel device and the
//! DTLS channels (`workers`); rate-limited clients are paced on both
//! (`pacing`).

pub mod client_cert;
pub mod dtls;
pub mod listener;
pub mod pacing;
pub mod read_batch;
pub mod tls;
pub mod tls_tunnel;
pub mod workers;
