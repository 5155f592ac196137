//! Client certificates: the verifier the TLS server asks (the CAs of
//! `tls.client_ca_file`, the CRLs of `tls.client_crl_file`, re-read on
//! reload), and the user name a verified certificate carries
//! (`tls.client_username`).
//!
//! A client without a certificate still completes the handshake (the
//! password groups need none); a certificate that does not chain to the
//! CAs, has expired or is revoked fails the handshake, so a login never
//! sees it.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use parking_lot::RwLock;
use rustls::{
    DigitallySignedStruct, DistinguishedName, Error, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, CertificateRevocationListDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use crate::config::{CertName, TlsSettings};

/// The verifier with its CRLs swappable: the CA bundle is fixed at start,
/// the revocation list follows reloads.
#[derive(Debug)]
pub struct ClientVerifier {
    roots: Arc<rustls::RootCertStore>,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
    /// The CAs' names, offered to clients (fixed with the roots).
    hints: Vec<DistinguishedName>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_crls(path: Option<&Path>) -> anyhow::Result<Vec<CertificateRevocationListDer<'static>>> {
    let Some(path) = path else {
        return Ok(Vec::new());
    };
    let pem = crate::files::read(path)
        .with_context(|| format!("tls.client_crl_file {}", path.display()))?;
    let crls = rustls_pemfile::crls(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.client_crl_file {}: not PEM CRLs", path.display()))?;
    if crls.is_empty() {
        anyhow::bail!(
            "tls.client_crl_file {} holds no CRL (expected -----BEGIN X509 CRL-----)",
            path.display()
        );
    }
    Ok(crls)
}

fn build(
    roots: &Arc<rustls::RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .with_crls(crls)
        .allow_unauthenticated()
        .build()
        .context("building the client certificate verifier")
}

impl ClientVerifier {
    /// The verifier `tls` configures, if it asks for client certificates.
    pub fn from_settings(tls: &TlsSettings) -> anyhow::Result<Option<Arc<Self>>> {
        let Some(ca) = &tls.client_ca_file else {
            return Ok(None);
        };
        let pem =
            std::fs::read(ca).with_context(|| format!("tls.client_ca_file {}", ca.display()))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots
                .add(cert.context("tls.client_ca_file: a certificate that does not parse")?)
                .context("tls.client_ca_file: a certificate rustls does not take as a CA")?;
        }
        if roots.is_empty() {
            anyhow::bail!("tls.client_ca_file {} holds no certificate", ca.display());
        }
        let roots = Arc::new(roots);
        let inner = build(&roots, read_crls(tls.client_crl_file.as_deref())?)?;
        let hints = inner.root_hint_subjects().to_vec();
        Ok(Some(Arc::new(ClientVerifier {
            roots,
            inner: RwLock::new(inner),
            hints,
        })))
    }

    /// A verifier with the CRLs of `path` read anew, for [`Self::install`]
    /// (two steps, so a reload can fail before anything changed).
    pub fn prepare(&self, path: Option<&Path>) -> anyhow::Result<Arc<dyn ClientCertVerifier>> {
        build(&self.roots, read_crls(path)?)
    }

    /// Makes `v` the verifier of new handshakes.
    pub fn install(&self, v: Arc<dyn ClientCertVerifier>) {
        *self.inner.write() = v;
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        self.inner.read().clone()
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// The OID of Microsoft's userPrincipalName (a SAN otherName).
const UPN_OID: &str = "1.3.6.1.4.1.311.20.2.3";

/// The user name of a (verified) certificate, from `field`; `None` when
/// it has none.
pub fn user_name(cert: &[u8], field: CertName) -> Option<String> {
    use x509_parser::{extensions::GeneralName, prelude::*};
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let san = || {
        cert.subject_alternative_name()
            .ok()
            .flatten()
            .map(|s| s.value.general_names.clone())
            .unwrap_or_default()
    };
    let name = match field {
        CertName::Cn => cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|a| a.as_str().ok())
            .map(str::to_owned),
        CertName::Email => san()
            .into_iter()
            .find_map(|g| match g {
                GeneralName::RFC822Name(e) => Some(e.to_owned()),
                _ => None,
            })
            .or_else(|| {
                cert.subject()
                    .iter_email()
                    .next()
                    .and_then(|a| a.as_str().ok())
                    .map(str::to_owned)
            }),
        CertName::Upn => san().into_iter().find_map(|g| match g {
            GeneralName::OtherName(oid, value) if oid.to_id_string() == UPN_OID => upn_value(value),
            _ => None,
        }),
    };
    name.filter(|n| !n.is_empty())
}

/// The UTF8String inside an otherName's `[0] EXPLICIT` value.
fn upn_value(value: &[u8]) -> Option<String> {
    use x509_parser::der_parser::ber::parse_ber_any_r;
    // The value is the explicit [0] wrapper's content or the wrapper
    // itself, depending on the parser; take the innermost string.
    let mut bytes = value;
    for _ in 0..3 {
        let (_, any) = parse_ber_any_r(bytes, 4).ok()?;
        match any.as_str() {
            Ok(s) => return Some(s.to_owned()),
            Err(_) => {
                bytes = any.as_slice().ok()?;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(params: rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn user_names_from_cn_email_and_upn() {
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "carol");
        p.subject_alt_names = vec![rcgen::SanType::Rfc822Name(
            "carol@example.org".try_into().unwrap(),
        )];
        let c = cert(p);
        assert_eq!(user_name(&c, CertName::Cn).as_deref(), Some("carol"));
        assert_eq!(
            user_name(&c, CertName::Email).as_deref(),
            Some("carol@example.org")
        );
        assert_eq!(user_name(&c, CertName::Upn), None);
        // A Microsoft PKI's user certificate: the UPN as a SAN otherName.
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "Carol C");
        p.subject_alt_names = vec![rcgen::SanType::OtherName((
            vec![1, 3, 6, 1, 4, 1, 311, 20, 2, 3],
            rcgen::OtherNameValue::Utf8String("carol@corp.example".into()),
        ))];
        let c = cert(p);
        assert_eq!(
            user_name(&c, CertName::Upn).as_deref(),
            Some("carol@corp.example")
        );
        assert_eq!(user_name(&c, CertName::Cn).as_deref(), Some("Carol C"));
        let bare = cert(rcgen::CertificateParams::new(vec![]).unwrap());
        assert_eq!(user_name(&bare, CertName::Email), None);
        assert_eq!(user_name(b"not a certificate", CertName::Cn), None);
    }
}
