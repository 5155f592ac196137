//! `vpn-bench`: benchmarks and load generation (see bench/README.md).
//!
//! The first benchmarks (DTLS/TLS throughput and CPU per GB against ocserv,
//! classifier cost over rule count) arrive with the DTLS and policy work;
//! until then this binary only says so.

fn main() {
    eprintln!("vpn-bench: no benchmark is implemented yet; see bench/README.md");
    std::process::exit(2);
}
