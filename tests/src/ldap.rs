//! A real OpenLDAP `slapd` (Debian's 2.5) for the tests: its own
//! configuration, database and certificates in a scratch directory, run in
//! the foreground in a namespace, stopped by PID on drop.
//!
//! The directory (`dc=example,dc=org`):
//!
//! | entry | password | groups (`ou=groups`) |
//! |---|---|---|
//! | uid=carol,ou=people | carol-pw | vpn-eng |
//! | uid=dave,ou=people | dave-pw | vpn-staff |
//! | uid=erin,ou=people | erin-pw | vpn-interns, itself a member of vpn-eng |
//! | uid=frank,ou=people | frank-pw | none |
//! | cn=vpn-search (the service account) | search-pw | |
//!
//! It listens on `ldap://ADDRESS:389` (StartTLS) and `ldaps://ADDRESS:636`
//! with a certificate for ADDRESS from a CA of its own ([`Slapd::ca_file`]).

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{Netns, TempDir, sh, stop_child, wait_for};

pub const BASE: &str = "dc=example,dc=org";
pub const SERVICE_DN: &str = "cn=vpn-search,dc=example,dc=org";
pub const SERVICE_PASSWORD: &str = "search-pw";

const DATA: &str = r#"dn: dc=example,dc=org
objectClass: top
objectClass: dcObject
objectClass: organization
o: Example
dc: example

dn: ou=people,dc=example,dc=org
objectClass: organizationalUnit
ou: people

dn: ou=groups,dc=example,dc=org
objectClass: organizationalUnit
ou: groups

dn: cn=vpn-search,dc=example,dc=org
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: vpn-search
userPassword: search-pw

dn: uid=carol,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: carol
cn: Carol
sn: C
userPassword: carol-pw

dn: uid=dave,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: dave
cn: Dave
sn: D
userPassword: dave-pw

dn: uid=erin,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: erin
cn: Erin
sn: E
userPassword: erin-pw

dn: uid=frank,ou=people,dc=example,dc=org
objectClass: inetOrgPerson
uid: frank
cn: Frank
sn: F
userPassword: frank-pw

dn: cn=vpn-interns,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: vpn-interns
member: uid=erin,ou=people,dc=example,dc=org

dn: cn=vpn-eng,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: vpn-eng
member: uid=carol,ou=people,dc=example,dc=org
member: cn=vpn-interns,ou=groups,dc=example,dc=org

dn: cn=vpn-staff,ou=groups,dc=example,dc=org
objectClass: groupOfNames
cn: vpn-staff
member: uid=dave,ou=people,dc=example,dc=org
"#;

/// A running slapd.
pub struct Slapd {
    child: Option<Child>,
    pub dir: TempDir,
}

impl Slapd {
    /// Starts slapd in `ns` on `address` (an address of `ns`) and waits
    /// until it answers.
    pub fn start(ns: &Netns, address: &str) -> anyhow::Result<Self> {
        let dir = TempDir::new("slapd")?;
        let d = dir.path();
        write_certs(d, address)?;
        std::fs::create_dir_all(d.join("db"))?;
        std::fs::write(d.join("data.ldif"), DATA)?;
        std::fs::write(d.join("slapd.conf"), config(&d.display().to_string()))?;
        sh(std::process::Command::new("slapadd")
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-l")
            .arg(d.join("data.ldif")))
        .context("loading the directory (cargo xtask setup installs slapd)")?;
        let log = std::fs::File::create(d.join("slapd.log"))?;
        let child = ns
            .cmd("slapd")
            .arg("-f")
            .arg(d.join("slapd.conf"))
            .arg("-h")
            .arg(format!("ldap://{address}:389/ ldaps://{address}:636/"))
            .args(["-d", "stats"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting slapd")?;
        let mut s = Slapd {
            child: Some(child),
            dir,
        };
        let ready = wait_for(Duration::from_secs(15), || {
            if let Some(Ok(Some(_))) = s.child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            s.log().contains("slapd starting").then_some(true)
        });
        if ready != Some(true) {
            bail!("slapd did not start:\n{}", s.log());
        }
        Ok(s)
    }

    /// The CA certificate the server's certificate chains to.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default()
    }

    /// Stops it (to see what the gateway does without it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A CA, and a server certificate for `address` it signed.
fn write_certs(dir: &std::path::Path, address: &str) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vpn-gateway test LDAP CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec![address.to_owned()])?;
    server.distinguished_name.push(DnType::CommonName, address);
    let cert = server.signed_by(&key, &ca_cert, &ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    std::fs::write(dir.join("cert.pem"), cert.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    Ok(())
}

fn config(dir: &str) -> String {
    format!(
        r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
TLSCACertificateFile {dir}/ca.pem
TLSCertificateFile {dir}/cert.pem
TLSCertificateKeyFile {dir}/key.pem
database mdb
suffix "{BASE}"
rootdn "cn=admin,{BASE}"
rootpw admin-pw-not-used
directory {dir}/db
maxsize 10485760
access to attrs=userPassword by anonymous auth by self read by * none
access to * by users read by * none
"#
    )
}
