//! The server certificate: loaded from PEM files, or generated once
//! (self-signed, rcgen) into the state directory. Clients pin it by its
//! `pin-sha256:` fingerprint, which we log at start. Its private key is
//! read, generated and used only by the key signer (`key_signer.rs`), a
//! process of its own: vpnd holds the certificate and asks the signer for
//! each handshake's signature.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::config::Settings;

pub const GENERATED_CERT: &str = "server-cert.pem";
pub const GENERATED_KEY: &str = "server-key.pem";

/// A certificate chain and the signer of its key, plus the leaf's pin.
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<super::key_signer::RemoteKey>,
    pub pin: String,
    pub cert_path: PathBuf,
}

/// `pin-sha256:` + base64(SHA-256(SubjectPublicKeyInfo)), as openconnect's
/// `--servercert` takes it.
pub fn pin_sha256(cert_der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| anyhow!("cannot parse certificate: {e}"))?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    Ok(format!(
        "pin-sha256:{}",
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(spki))
    ))
}

/// Reads the PEM certificate chain in `path`.
pub fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let chain = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(chain)
}

/// The configured certificate or the generated one (generated with its
/// key on first use, by the key signer), and the key signer started.
pub fn load_identity(s: &Settings) -> anyhow::Result<ServerIdentity> {
    let (spawn, cert_path) = signer_spawn(s);
    let key = super::key_signer::RemoteKey::start(spawn)?;
    let chain = read_chain(&cert_path)?;
    let pin = pin_sha256(&chain[0])?;
    tracing::info!(pid = key.pid(), "the private key is held by the key signer");
    Ok(ServerIdentity {
        chain,
        key,
        pin,
        cert_path,
    })
}

/// How to start the key signer for `s`, and the certificate's path.
pub fn signer_spawn(s: &Settings) -> (super::key_signer::Spawn, PathBuf) {
    use super::key_signer::Spawn;
    match (&s.tls.cert_file, &s.tls.key_file) {
        (Some(c), Some(k)) => (
            Spawn {
                key: k.clone(),
                generate: None,
            },
            c.clone(),
        ),
        _ => {
            let dir = &s.server.state_dir;
            let c = dir.join(GENERATED_CERT);
            (
                Spawn {
                    key: dir.join(GENERATED_KEY),
                    generate: Some((c.clone(), names(s))),
                },
                c,
            )
        }
    }
}

/// The names a generated certificate is for: `tls.hostnames` (or
/// "vpn-gateway") and the listening address.
fn names(s: &Settings) -> Vec<String> {
    let mut names = if s.tls.hostnames.is_empty() {
        vec!["vpn-gateway".to_owned()]
    } else {
        s.tls.hostnames.clone()
    };
    let ip = s.server.listen.ip();
    if !ip.is_unspecified() {
        names.push(ip.to_string());
    }
    names
}

/// Generates a key and a self-signed certificate for `names` (the key
/// signer does, before it reads the key).
pub(super) fn generate(names: &[String], cert: &Path, key: &Path) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    for n in names {
        params.subject_alt_names.push(match n.parse::<IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.clone().try_into()?),
        });
    }
    let first = names.first().map_or("vpn-gateway", String::as_str);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, first.to_owned());
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let c = params.self_signed(&kp)?;
    let dir = cert.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating state directory {}", dir.display()))?;
    let mut kf = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .with_context(|| format!("writing {}", key.display()))?;
    kf.write_all(kp.serialize_pem().as_bytes())?;
    std::fs::write(cert, c.pem()).with_context(|| format!("writing {}", cert.display()))?;
    eprintln!(
        "vpnd key signer: generated a self-signed server certificate in {}",
        cert.display()
    );
    Ok(())
}

/// The rustls server configuration: TLS 1.2 always, TLS 1.3 unless
/// disabled; client certificates asked for when `client_certs` is set.
pub fn server_config(
    id: &ServerIdentity,
    tls13: bool,
    client_certs: Option<Arc<super::client_cert::ClientVerifier>>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls13 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS12]
    };
    let builder =
        rustls::ServerConfig::builder_with_provider(provider).with_protocol_versions(versions)?;
    let builder = match client_certs {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let certified = rustls::sign::CertifiedKey::new(id.chain.clone(), id.key.clone());
    certified.keys_match().map_err(|e| {
        anyhow!(
            "{}: certificate and key do not match: {e}",
            id.cert_path.display()
        )
    })?;
    let cfg = builder.with_cert_resolver(Arc::new(OneCert(Arc::new(certified))));
    Ok(Arc::new(cfg))
}

/// The one certificate, for every client.
#[derive(Debug)]
struct OneCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A client's TLS connection, buffered both ways under TLS while busy
/// ([`super::io_buffer`]):
/// - Output collects in a buffer and reaches the socket on `flush` (or when
///   64 KiB are waiting): every CSTP frame is its own TLS record
///   (openconnect reads one frame per record), and without the buffer every
///   record would be a `write` and a TCP segment of its own. Every write
///   path flushes when it is done.
/// - rustls reads at most 4 KiB per call; under load the read buffer takes
///   up to 64 KiB from the socket per system call instead.
///
/// Boxed: the stream (1.3 KiB) is handed down through the connection's
/// async functions (login, CONNECT, the tunnel), and each keeps its own
/// copy of an argument it took by value in its state, so by value it was
/// in a session's task four times over; boxed, each holds a pointer.
pub type ClientTls =
    Box<tokio_rustls::server::TlsStream<super::io_buffer::AdaptiveStream<tokio::net::TcpStream>>>;
