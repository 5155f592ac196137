//! Latency histograms the services fill in as things happen and the
//! metrics endpoint (`metrics.rs`) reads: plain prometheus-client
//! metrics, nothing from the crate.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Seconds buckets from 0.5 ms to about 8 s, doubling.
fn buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 15)
}

/// How long the steps a client waits for take.
#[derive(Debug)]
pub struct Latencies {
    /// TCP accepted to TLS established.
    pub tls_handshake: Histogram,
    /// An `auth-reply` arrived to its answer (the password check, a
    /// RADIUS or LDAP exchange, the session's creation).
    pub login: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            tls_handshake: Histogram::new(buckets()),
            login: Histogram::new(buckets()),
        }
    }
}
