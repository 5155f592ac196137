//! Client certificates for the tests: two CAs (one the gateway trusts, one
//! it does not), certificates for users, and CRLs, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

/// A CA that issues client certificates.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    name: String,
    next_serial: u64,
}

/// A client certificate and its key, as files.
pub struct ClientCert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl ClientCert {
    /// openconnect's arguments to present it.
    pub fn args(&self) -> [String; 2] {
        [
            format!("--certificate={}", self.cert.display()),
            format!("--sslkey={}", self.key.display()),
        ]
    }
}

impl TestCa {
    /// A CA called `name` writing its files into `dir`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        Ok(TestCa {
            cert,
            key,
            dir: dir.to_owned(),
            name: name.to_owned(),
            next_serial: 100,
        })
    }

    /// Its certificate's file (the gateway's `tls.client_ca_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}.pem", self.name))
    }

    /// A client certificate with common name `cn`.
    pub fn issue(&mut self, cn: &str) -> anyhow::Result<ClientCert> {
        let serial = self.next_serial;
        self.next_serial += 1;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.serial_number = Some(SerialNumber::from(serial));
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        let base = format!("{}-{cn}-{serial}", self.name);
        let c = ClientCert {
            cert: self.dir.join(format!("{base}.pem")),
            key: self.dir.join(format!("{base}.key")),
            serial,
        };
        std::fs::write(&c.cert, cert.pem())?;
        std::fs::write(&c.key, key.serialize_pem())?;
        Ok(c)
    }

    /// A CRL revoking `revoked`, written to `file` in its directory.
    pub fn crl(&self, file: &str, revoked: &[&ClientCert]) -> anyhow::Result<PathBuf> {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        let p = CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|c| RevokedCertParams {
                    serial_number: SerialNumber::from(c.serial),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = p.signed_by(&self.cert, &self.key)?;
        let path = self.dir.join(file);
        std::fs::write(&path, crl.pem()?)?;
        Ok(path)
    }
}
