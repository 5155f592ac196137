//! A real FreeRADIUS (Debian's `freeradius` 3.2) for the tests: its own
//! configuration in a scratch directory, run in the foreground in a
//! namespace, stopped by PID on drop.
//!
//! The users it knows, and the second factor it asks `mfa` for:
//!
//! | user | password | reply |
//! |---|---|---|
//! | alice | alice-pw | Filter-Id "engineering", Framed-IP-Address 198.19.0.77, Session-Timeout 3600, Idle-Timeout 900, Class "acct-class-1" |
//! | bob | bob-pw | nothing (the default policy applies) |
//! | mfa | mfa-pw | Access-Challenge "Enter the code from your token"; then code 123456 |
//! | ghost | ghost-pw | Filter-Id "no-such-policy" |
//! | carol | 654321 ([`CAROL_OTP`]: an OTP server's view of her) | nothing |

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Child, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::{Netns, TempDir, stop_child, wait_for};

/// The shared secret the gateway (198.18.2.1) has with the server.
pub const SECRET: &str = "radius-test-secret";
/// The code `mfa`'s challenge wants.
pub const MFA_CODE: &str = "123456";
/// The one-time code the server takes for carol (a second factor after
/// her LDAP password).
pub const CAROL_OTP: &str = "654321";
/// The address alice's Access-Accept assigns.
pub const ALICE_FRAMED_IP: &str = "198.19.0.77";

const USERS: &str = r#"alice Cleartext-Password := "alice-pw"
      Filter-Id = "engineering",
      Framed-IP-Address = 198.19.0.77,
      Session-Timeout = 3600,
      Idle-Timeout = 900,
      Class = "acct-class-1"

bob Cleartext-Password := "bob-pw"

mfa Cleartext-Password := "mfa-pw"

ghost Cleartext-Password := "ghost-pw"
      Filter-Id = "no-such-policy"

carol Cleartext-Password := "654321"
"#;

/// A FreeRADIUS server listening on `address` (auth; accounting on the
/// next port) in a namespace.
pub struct FreeRadius {
    child: Option<Child>,
    pub dir: TempDir,
}

impl FreeRadius {
    /// Starts FreeRADIUS in `ns` on `address` (an address of `ns`), with
    /// the gateway at `client` as its client, and waits until it serves.
    pub fn start(ns: &Netns, address: &str, client: &str) -> anyhow::Result<Self> {
        let dir = TempDir::new("radius")?;
        let d = dir.path().display().to_string();
        std::fs::write(dir.path().join("users"), USERS)?;
        // radiusd reads a local dictionary from its directory.
        std::fs::write(dir.path().join("dictionary"), "")?;
        std::fs::write(dir.path().join("radiusd.conf"), config(&d, address, client))?;
        let log = std::fs::File::create(dir.path().join("radiusd.log"))?;
        let child = ns
            .cmd("freeradius")
            .args(["-f", "-l", "stdout", "-d"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting freeradius (cargo xtask setup installs it)")?;
        let mut s = FreeRadius {
            child: Some(child),
            dir,
        };
        let ready = wait_for(Duration::from_secs(15), || {
            if let Some(Ok(Some(_))) = s.child.as_mut().map(|c| c.try_wait()) {
                return Some(false);
            }
            s.log()
                .contains("Ready to process requests")
                .then_some(true)
        });
        if ready != Some(true) {
            bail!("freeradius did not start:\n{}", s.log());
        }
        Ok(s)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("radiusd.log")).unwrap_or_default()
    }

    /// The accounting requests it received, as FreeRADIUS's `detail`
    /// module wrote them.
    pub fn detail(&self) -> String {
        std::fs::read_to_string(self.detail_path()).unwrap_or_default()
    }

    fn detail_path(&self) -> PathBuf {
        self.dir.path().join("detail")
    }

    /// The accounting records received, each as its attributes (name to
    /// value as FreeRADIUS prints them, quotes removed).
    pub fn accounting(&self) -> Vec<HashMap<String, String>> {
        self.detail()
            .split("\n\n")
            .filter(|r| !r.trim().is_empty())
            .map(|r| {
                r.lines()
                    .filter_map(|l| l.trim().split_once(" = "))
                    .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
                    .collect()
            })
            .collect()
    }
}

impl Drop for FreeRadius {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// radiusd.conf: everything in one file, nothing from /etc.
fn config(dir: &str, address: &str, client: &str) -> String {
    format!(
        r#"prefix = /usr
exec_prefix = /usr
sysconfdir = /etc
localstatedir = /var
sbindir = /usr/sbin
raddbdir = {dir}
confdir = {dir}
modconfdir = {dir}
logdir = {dir}
run_dir = {dir}
db_dir = {dir}
libdir = /usr/lib/freeradius
dictdir = /usr/share/freeradius
pidfile = {dir}/radiusd.pid
name = radiusd
max_request_time = 30
cleanup_delay = 0
max_requests = 1024
hostname_lookups = no
log {{
  destination = stdout
  auth = yes
}}
security {{
  allow_core_dumps = no
  max_attributes = 200
  reject_delay = 0
  status_server = no
}}
thread pool {{
  start_servers = 2
  max_servers = 4
  min_spare_servers = 1
  max_spare_servers = 2
}}
client gateway {{
  ipaddr = {client}
  secret = {SECRET}
  require_message_authenticator = yes
}}
modules {{
  pap {{
    normalise = yes
  }}
  files {{
    filename = {dir}/users
  }}
  always reject {{
    rcode = reject
  }}
  detail {{
    filename = {dir}/detail
    permissions = 0600
    header = "%t"
  }}
}}
server default {{
  listen {{
    type = auth
    ipaddr = {address}
    port = 1812
  }}
  listen {{
    type = acct
    ipaddr = {address}
    port = 1813
  }}
  authorize {{
    # The second round of mfa's login: the State of the challenge.
    if (&State == 0x6d66612d636f6465) {{
      if (&User-Name == "mfa" && &User-Password == "{MFA_CODE}") {{
        update control {{
          &Auth-Type := Accept
        }}
      }}
      else {{
        update reply {{
          &Reply-Message := "Wrong code"
        }}
        reject
      }}
    }}
    else {{
      files
      pap
    }}
  }}
  authenticate {{
    Auth-Type PAP {{
      pap
      if (ok && &User-Name == "mfa") {{
        update reply {{
          &Reply-Message := "Enter the code from your token"
          &State := 0x6d66612d636f6465
        }}
        update control {{
          &Response-Packet-Type := Access-Challenge
        }}
      }}
    }}
  }}
  preacct {{
  }}
  accounting {{
    detail
  }}
  # FreeRADIUS before 3.2.5 signs replies only when told to.
  post-auth {{
    update reply {{
      &Message-Authenticator := 0x00
    }}
    Post-Auth-Type REJECT {{
      update reply {{
        &Message-Authenticator := 0x00
      }}
    }}
    Post-Auth-Type Challenge {{
      update reply {{
        &Message-Authenticator := 0x00
      }}
    }}
  }}
}}
"#
    )
}
