//! The client profile: the `AnyConnectProfile` XML document Cisco clients
//! download at login and keep (protocol doc §2.13, §8). It tells them the
//! gateway's addresses (one host entry per uplink's public name, the other
//! uplinks and further gateways as backups), whether to connect by
//! themselves off the office network (trusted network detection), whether
//! to block the network while the VPN is down (always-on) and how a
//! hotspot's captive portal may still be reached.
//!
//! `[profile]` sets the options for every group, `[group.profile]`
//! overrides them for one. Each group gets its own file,
//! `/profiles/<group>.xml`, generated once per configuration: the same
//! configuration gives the same bytes, so a client that has the file
//! (same SHA-1 as the one announced) does not download it again.
//!
//! openconnect reads only `ServerList/HostEntry` (`-x FILE HOSTNAME` maps
//! the entry's name to its address and group); Cisco clients act on the
//! rest.

use std::{collections::BTreeMap, fmt::Write as _, net::IpAddr, sync::Arc};

use serde::Deserialize;

/// `[profile]` and `[group.profile]`: every option may be left out, a
/// group's own value wins over `[profile]`'s, which wins over the default.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProfileOptions {
    /// Announce and serve the profile. Default true.
    pub enabled: Option<bool>,
    /// The name of the host entries in the client's server menu. With
    /// several uplinks each entry is "NAME (UPLINK)". Default:
    /// `server.name`.
    pub host_name: Option<String>,
    /// Further gateways (`host` or `host:port`) the client tries when the
    /// one it chose and the other uplinks fail, in order. Default none.
    pub backup_servers: Option<Vec<String>>,
    /// Let the user accept local (LAN) access when `client_routing`
    /// offers it. Default false.
    pub local_lan_access: Option<bool>,
    /// Trusted network detection: DNS suffixes an interface has on the
    /// office network (`corp.example.com`, `*.corp.example.com`). With
    /// these or `trusted_dns_servers` set, the client connects and
    /// disconnects by itself. Default none.
    pub trusted_dns_domains: Option<Vec<String>>,
    /// Trusted network detection: DNS servers an interface has on the
    /// office network. Default none.
    pub trusted_dns_servers: Option<Vec<IpAddr>>,
    /// On the trusted network: `"disconnect"` (default), `"connect"`,
    /// `"pause"` or `"do-nothing"`.
    pub trusted_network_policy: Option<TrustedNetworkPolicy>,
    /// Off the trusted network: `"connect"` (default) or `"do-nothing"`.
    pub untrusted_network_policy: Option<UntrustedNetworkPolicy>,
    /// Always-on: off the trusted network, no traffic passes unless the
    /// VPN is up. Needs trusted network detection. Default false.
    pub always_on: Option<bool>,
    /// With always-on, when the VPN cannot be set up: `"closed"` (default;
    /// traffic stays blocked) or `"open"` (traffic passes).
    pub connect_failure_policy: Option<ConnectFailurePolicy>,
    /// With a closed failure policy, lift the block for a while so the
    /// user can log in to a hotel or airport captive portal. Default true.
    pub captive_portal_remediation: Option<bool>,
    /// How long the captive portal block is lifted, 1 to 100 minutes.
    /// Default 5.
    pub captive_portal_remediation_mins: Option<u32>,
    /// With a closed failure policy, keep the last session's local
    /// routes and firewall rules (local printing) while the VPN is down.
    /// Default false.
    pub apply_last_local_resource_rules: Option<bool>,
    /// With always-on, may the user disconnect. Default true.
    pub allow_vpn_disconnect: Option<bool>,
}

/// `trusted_network_policy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TrustedNetworkPolicy {
    #[default]
    Disconnect,
    Connect,
    Pause,
    DoNothing,
}

/// `untrusted_network_policy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UntrustedNetworkPolicy {
    #[default]
    Connect,
    DoNothing,
}

/// `connect_failure_policy`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ConnectFailurePolicy {
    #[default]
    Closed,
    Open,
}

/// A profile option that does not validate: the key and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: String) -> Invalid {
    Invalid { key, message }
}

/// One address clients reach the gateway at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    /// The uplink it is reached through, when there are several.
    pub via: Option<String>,
    /// `host` or `host:port`.
    pub address: String,
}

/// The group a profile is for, with its overrides.
pub struct GroupProfile<'a> {
    pub group: &'a str,
    pub options: Option<&'a ProfileOptions>,
}

/// A generated profile file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The path clients fetch it at: `/profiles/<group>.xml`.
    pub uri: String,
    pub bytes: Arc<[u8]>,
    /// SHA-1 of `bytes`, upper-case hex: what the manifest announces and
    /// clients compare with the file they have.
    pub sha1: String,
}

/// The profiles of every group that has one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profiles {
    by_group: BTreeMap<String, Profile>,
}

impl Profiles {
    /// The profiles of `groups`, with `global`'s options under each
    /// group's own. `servers`: the gateway's addresses, preferred first
    /// (at least one). `display`: the default host entry name.
    pub fn build(
        global: &ProfileOptions,
        groups: &[GroupProfile<'_>],
        servers: &[Server],
        display: &str,
    ) -> Result<Profiles, Invalid> {
        validate(global, "profile")?;
        let mut by_group = BTreeMap::new();
        for g in groups {
            let own = g.options.cloned().unwrap_or_default();
            validate(&own, "group.profile")?;
            let o = own.over(global);
            if !o.enabled.unwrap_or(true) {
                continue;
            }
            let has_tnd = o
                .trusted_dns_domains
                .as_ref()
                .is_some_and(|v| !v.is_empty())
                || o.trusted_dns_servers
                    .as_ref()
                    .is_some_and(|v| !v.is_empty());
            if o.always_on == Some(true) && !has_tnd {
                return Err(invalid(
                    "profile.always_on",
                    format!(
                        "group '{}': always-on needs trusted network detection, so the client knows when it is on the office network: set trusted_dns_domains or trusted_dns_servers",
                        g.group
                    ),
                ));
            }
            let xml = render(&o, g.group, servers, display);
            let sha1 = hex::encode_upper(
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, xml.as_bytes())
                    .as_ref(),
            );
            by_group.insert(
                g.group.to_owned(),
                Profile {
                    uri: format!("/profiles/{}.xml", g.group),
                    bytes: Arc::from(xml.into_bytes()),
                    sha1,
                },
            );
        }
        Ok(Profiles { by_group })
    }

    /// The profile of `group`, when it has one.
    pub fn of_group(&self, group: &str) -> Option<&Profile> {
        self.by_group.get(group)
    }

    /// The group whose profile is at request path `path`. openconnect 9.01
    /// appends the server's port to the path when it is not 443
    /// (`/profiles/x.xml:8443`): that suffix is ignored.
    pub fn group_at(&self, path: &str) -> Option<&str> {
        let path = match path.rsplit_once(':') {
            Some((p, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => p,
            _ => path,
        };
        let name = path.strip_prefix("/profiles/")?.strip_suffix(".xml")?;
        self.by_group.get_key_value(name).map(|(k, _)| k.as_str())
    }
}

impl ProfileOptions {
    /// `self`'s values, `base`'s where `self` has none.
    fn over(self, base: &ProfileOptions) -> ProfileOptions {
        let b = base.clone();
        ProfileOptions {
            enabled: self.enabled.or(b.enabled),
            host_name: self.host_name.or(b.host_name),
            backup_servers: self.backup_servers.or(b.backup_servers),
            local_lan_access: self.local_lan_access.or(b.local_lan_access),
            trusted_dns_domains: self.trusted_dns_domains.or(b.trusted_dns_domains),
            trusted_dns_servers: self.trusted_dns_servers.or(b.trusted_dns_servers),
            trusted_network_policy: self.trusted_network_policy.or(b.trusted_network_policy),
            untrusted_network_policy: self.untrusted_network_policy.or(b.untrusted_network_policy),
            always_on: self.always_on.or(b.always_on),
            connect_failure_policy: self.connect_failure_policy.or(b.connect_failure_policy),
            captive_portal_remediation: self
                .captive_portal_remediation
                .or(b.captive_portal_remediation),
            captive_portal_remediation_mins: self
                .captive_portal_remediation_mins
                .or(b.captive_portal_remediation_mins),
            apply_last_local_resource_rules: self
                .apply_last_local_resource_rules
                .or(b.apply_last_local_resource_rules),
            allow_vpn_disconnect: self.allow_vpn_disconnect.or(b.allow_vpn_disconnect),
        }
    }
}

/// Whether `s` is a host name, an IPv4 address or a bracketed IPv6
/// address, with an optional `:port`.
pub fn is_host_address(s: &str) -> bool {
    let (host, port) = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) => {
                if v6.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match after {
                    "" => return true,
                    a => ("x", a.strip_prefix(':').unwrap_or("")),
                }
            }
            None => return false,
        },
        None => match s.split_once(':') {
            Some((h, p)) => (h, p),
            None => (s, "443"),
        },
    };
    dns_name(host, false) && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Whether `s` is a DNS name (labels of letters, digits and '-'), with a
/// leading `*.` when `wildcard`.
fn dns_name(s: &str, wildcard: bool) -> bool {
    let s = if wildcard {
        s.strip_prefix("*.").unwrap_or(s)
    } else {
        s
    };
    !s.is_empty()
        && s.len() <= 253
        && s.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn validate(o: &ProfileOptions, section: &'static str) -> Result<(), Invalid> {
    let key = |k: &'static str, g: &'static str| if section == "profile" { k } else { g };
    if let Some(name) = &o.host_name
        && (name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control))
    {
        return Err(invalid(
            key("profile.host_name", "group.profile.host_name"),
            format!("'{name}' is not a usable name: 1 to 64 printable characters"),
        ));
    }
    for s in o.backup_servers.iter().flatten() {
        if !is_host_address(s) {
            return Err(invalid(
                key("profile.backup_servers", "group.profile.backup_servers"),
                format!(
                    "'{s}' is not a server address: use host, host:port, an IP address or [IPv6]:port"
                ),
            ));
        }
    }
    for d in o.trusted_dns_domains.iter().flatten() {
        if !dns_name(d, true) {
            return Err(invalid(
                key(
                    "profile.trusted_dns_domains",
                    "group.profile.trusted_dns_domains",
                ),
                format!("'{d}' is not a DNS suffix: use e.g. corp.example.com or *.example.com"),
            ));
        }
    }
    if let Some(m) = o.captive_portal_remediation_mins
        && !(1..=100).contains(&m)
    {
        return Err(invalid(
            key(
                "profile.captive_portal_remediation_mins",
                "group.profile.captive_portal_remediation_mins",
            ),
            format!("{m} is out of range: use 1 to 100 minutes"),
        ));
    }
    Ok(())
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(s)
}

fn flag(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

/// The document for `group`, from resolved options `o`.
fn render(o: &ProfileOptions, group: &str, servers: &[Server], display: &str) -> String {
    let mut x = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <AnyConnectProfile xmlns=\"http://schemas.xmlsoap.org/encoding/\" \
         xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
         xsi:schemaLocation=\"http://schemas.xmlsoap.org/encoding/ AnyConnectProfile.xsd\">\n\
         \t<ClientInitialization>\n\
         \t\t<UseStartBeforeLogon UserControllable=\"true\">false</UseStartBeforeLogon>\n\
         \t\t<StrictCertificateTrust>false</StrictCertificateTrust>\n\
         \t\t<RestrictPreferenceCaching>false</RestrictPreferenceCaching>\n\
         \t\t<BypassDownloader>true</BypassDownloader>\n\
         \t\t<AutoReconnect UserControllable=\"false\">true\
         <AutoReconnectBehavior UserControllable=\"false\">ReconnectAfterResume</AutoReconnectBehavior>\
         </AutoReconnect>\n",
    );
    let _ = writeln!(
        x,
        "\t\t<LocalLanAccess UserControllable=\"true\">{}</LocalLanAccess>",
        flag(o.local_lan_access.unwrap_or(false))
    );
    let domains = o.trusted_dns_domains.clone().unwrap_or_default();
    let dns_servers = o.trusted_dns_servers.clone().unwrap_or_default();
    if domains.is_empty() && dns_servers.is_empty() {
        x.push_str("\t\t<AutomaticVPNPolicy>false</AutomaticVPNPolicy>\n");
    } else {
        x.push_str("\t\t<AutomaticVPNPolicy>true\n");
        if !domains.is_empty() {
            let _ = writeln!(
                x,
                "\t\t\t<TrustedDNSDomains>{}</TrustedDNSDomains>",
                esc(&domains.join(","))
            );
        }
        if !dns_servers.is_empty() {
            let list: Vec<String> = dns_servers.iter().map(IpAddr::to_string).collect();
            let _ = writeln!(
                x,
                "\t\t\t<TrustedDNSServers>{}</TrustedDNSServers>",
                list.join(",")
            );
        }
        let trusted = match o.trusted_network_policy.unwrap_or_default() {
            TrustedNetworkPolicy::Disconnect => "Disconnect",
            TrustedNetworkPolicy::Connect => "Connect",
            TrustedNetworkPolicy::Pause => "Pause",
            TrustedNetworkPolicy::DoNothing => "DoNothing",
        };
        let untrusted = match o.untrusted_network_policy.unwrap_or_default() {
            UntrustedNetworkPolicy::Connect => "Connect",
            UntrustedNetworkPolicy::DoNothing => "DoNothing",
        };
        let _ = writeln!(
            x,
            "\t\t\t<TrustedNetworkPolicy>{trusted}</TrustedNetworkPolicy>\n\
             \t\t\t<UntrustedNetworkPolicy>{untrusted}</UntrustedNetworkPolicy>"
        );
        if o.always_on == Some(true) {
            let closed =
                o.connect_failure_policy.unwrap_or_default() == ConnectFailurePolicy::Closed;
            let _ = write!(
                x,
                "\t\t\t<AlwaysOn>true\n\t\t\t\t<ConnectFailurePolicy>{}",
                if closed { "Closed" } else { "Open" }
            );
            if closed {
                let remediation = o.captive_portal_remediation.unwrap_or(true);
                let _ = write!(
                    x,
                    "\n\t\t\t\t\t<AllowCaptivePortalRemediation>{}\
                     <CaptivePortalRemediationTimeout>{}</CaptivePortalRemediationTimeout>\
                     </AllowCaptivePortalRemediation>\n\
                     \t\t\t\t\t<ApplyLastVPNLocalResourceRules>{}</ApplyLastVPNLocalResourceRules>\n\t\t\t\t",
                    flag(remediation),
                    o.captive_portal_remediation_mins.unwrap_or(5),
                    flag(o.apply_last_local_resource_rules.unwrap_or(false))
                );
            }
            let _ = writeln!(
                x,
                "</ConnectFailurePolicy>\n\
                 \t\t\t\t<AllowVPNDisconnect>{}</AllowVPNDisconnect>\n\
                 \t\t\t</AlwaysOn>",
                flag(o.allow_vpn_disconnect.unwrap_or(true))
            );
        } else {
            x.push_str("\t\t\t<AlwaysOn>false</AlwaysOn>\n");
        }
        x.push_str("\t\t</AutomaticVPNPolicy>\n");
    }
    let backups = o.backup_servers.clone().unwrap_or_default();
    if !backups.is_empty() {
        x.push_str("\t\t<BackupServerList>\n");
        for b in &backups {
            let _ = writeln!(x, "\t\t\t<HostAddress>{}</HostAddress>", esc(b));
        }
        x.push_str("\t\t</BackupServerList>\n");
    }
    x.push_str("\t</ClientInitialization>\n\t<ServerList>\n");
    let name = o.host_name.as_deref().unwrap_or(display);
    for (i, s) in servers.iter().enumerate() {
        let entry = match (&s.via, servers.len()) {
            (Some(via), 2..) => format!("{name} ({via})"),
            (None, 2..) => format!("{name} ({})", s.address),
            _ => name.to_owned(),
        };
        let _ = write!(
            x,
            "\t\t<HostEntry>\n\
             \t\t\t<HostName>{}</HostName>\n\
             \t\t\t<HostAddress>{}</HostAddress>\n\
             \t\t\t<UserGroup>{}</UserGroup>\n",
            esc(&entry),
            esc(&s.address),
            esc(group)
        );
        // The other addresses, preferred first, then the other gateways.
        let others: Vec<&str> = servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, o)| o.address.as_str())
            .chain(backups.iter().map(String::as_str))
            .collect();
        if !others.is_empty() {
            x.push_str("\t\t\t<BackupServerList>\n");
            for b in others {
                let _ = writeln!(x, "\t\t\t\t<HostAddress>{}</HostAddress>", esc(b));
            }
            x.push_str("\t\t\t</BackupServerList>\n");
        }
        x.push_str("\t\t</HostEntry>\n");
    }
    x.push_str("\t</ServerList>\n</AnyConnectProfile>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers() -> Vec<Server> {
        vec![
            Server {
                via: Some("isp1".into()),
                address: "vpn1.example.com".into(),
            },
            Server {
                via: Some("isp2".into()),
                address: "vpn2.example.com:8443".into(),
            },
        ]
    }

    fn build(global: &ProfileOptions, own: Option<&ProfileOptions>) -> Result<Profiles, Invalid> {
        Profiles::build(
            global,
            &[
                GroupProfile {
                    group: "staff",
                    options: own,
                },
                GroupProfile {
                    group: "guests",
                    options: None,
                },
            ],
            &servers(),
            "Corp VPN",
        )
    }

    fn text(p: &Profiles, g: &str) -> String {
        String::from_utf8(p.of_group(g).unwrap().bytes.to_vec()).unwrap()
    }

    /// The element texts at `path` (tag names from the root's child
    /// down), read back with an XML parser.
    fn values(xml: &str, path: &[&str]) -> Vec<String> {
        let mut r = quick_xml::Reader::from_str(xml);
        let (mut stack, mut out) = (Vec::<String>::new(), Vec::new());
        loop {
            match r.read_event().expect("well-formed XML") {
                quick_xml::events::Event::Start(e) => {
                    stack.push(String::from_utf8(e.name().as_ref().to_vec()).unwrap())
                }
                quick_xml::events::Event::End(_) => {
                    stack.pop();
                }
                quick_xml::events::Event::Text(t) if stack.len() > 1 && stack[1..] == *path => {
                    let t = t.unescape().unwrap().trim().to_owned();
                    if !t.is_empty() {
                        out.push(t);
                    }
                }
                quick_xml::events::Event::Eof => return out,
                _ => {}
            }
        }
    }

    #[test]
    fn a_host_entry_per_server_with_the_others_as_backups() {
        let p = build(
            &ProfileOptions {
                backup_servers: Some(vec!["dr.example.com".into()]),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let x = text(&p, "staff");
        let entry = ["ServerList", "HostEntry"];
        assert_eq!(
            values(&x, &[entry[0], entry[1], "HostName"]),
            ["Corp VPN (isp1)", "Corp VPN (isp2)"]
        );
        assert_eq!(
            values(&x, &[entry[0], entry[1], "HostAddress"]),
            ["vpn1.example.com", "vpn2.example.com:8443"]
        );
        assert_eq!(
            values(&x, &[entry[0], entry[1], "UserGroup"]),
            ["staff", "staff"]
        );
        assert_eq!(
            values(&x, &[entry[0], entry[1], "BackupServerList", "HostAddress"]),
            [
                "vpn2.example.com:8443",
                "dr.example.com",
                "vpn1.example.com",
                "dr.example.com"
            ]
        );
        assert_eq!(
            values(
                &x,
                &["ClientInitialization", "BackupServerList", "HostAddress"]
            ),
            ["dr.example.com"]
        );
        assert_eq!(
            values(&x, &["ClientInitialization", "AutomaticVPNPolicy"]),
            ["false"]
        );
        assert_eq!(text(&p, "guests").matches("<UserGroup>guests<").count(), 2);
    }

    #[test]
    fn always_on_with_trusted_network_detection_and_captive_portal() {
        let global = ProfileOptions {
            trusted_dns_domains: Some(vec!["corp.example.com".into(), "*.lab.example".into()]),
            trusted_dns_servers: Some(vec!["198.18.0.53".parse().unwrap()]),
            ..Default::default()
        };
        let own = ProfileOptions {
            always_on: Some(true),
            captive_portal_remediation_mins: Some(10),
            host_name: Some("Staff <&> VPN".into()),
            ..Default::default()
        };
        let p = build(&global, Some(&own)).unwrap();
        let x = text(&p, "staff");
        let auto = ["ClientInitialization", "AutomaticVPNPolicy"];
        assert_eq!(values(&x, &auto), ["true"]);
        let at = |rest: &[&str]| values(&x, &[auto.as_slice(), rest].concat());
        assert_eq!(
            at(&["TrustedDNSDomains"]),
            ["corp.example.com,*.lab.example"]
        );
        assert_eq!(at(&["TrustedDNSServers"]), ["198.18.0.53"]);
        assert_eq!(at(&["TrustedNetworkPolicy"]), ["Disconnect"]);
        assert_eq!(at(&["UntrustedNetworkPolicy"]), ["Connect"]);
        assert_eq!(at(&["AlwaysOn"]), ["true"]);
        assert_eq!(at(&["AlwaysOn", "ConnectFailurePolicy"]), ["Closed"]);
        let remedy = [
            "AlwaysOn",
            "ConnectFailurePolicy",
            "AllowCaptivePortalRemediation",
        ];
        assert_eq!(at(&remedy), ["true"]);
        assert_eq!(
            at(&[remedy.as_slice(), &["CaptivePortalRemediationTimeout"]].concat()),
            ["10"]
        );
        assert_eq!(at(&["AlwaysOn", "AllowVPNDisconnect"]), ["true"]);
        // Escaped, and read back as written.
        assert_eq!(
            values(&x, &["ServerList", "HostEntry", "HostName"])[0],
            "Staff <&> VPN (isp1)"
        );
        // The guests group has detection but not always-on.
        let g = text(&p, "guests");
        assert_eq!(
            values(&g, &[auto.as_slice(), &["AlwaysOn"]].concat()),
            ["false"]
        );
    }

    #[test]
    fn open_failure_policy_has_no_captive_portal_settings() {
        let o = ProfileOptions {
            trusted_dns_servers: Some(vec!["198.18.0.53".parse().unwrap()]),
            always_on: Some(true),
            connect_failure_policy: Some(ConnectFailurePolicy::Open),
            allow_vpn_disconnect: Some(false),
            ..Default::default()
        };
        let x = text(&build(&o, None).unwrap(), "staff");
        assert!(x.contains("<ConnectFailurePolicy>Open</ConnectFailurePolicy>"));
        assert!(!x.contains("CaptivePortal"));
        assert!(x.contains("<AllowVPNDisconnect>false</AllowVPNDisconnect>"));
    }

    #[test]
    fn same_options_same_bytes_and_hash_and_a_change_changes_the_hash() {
        let o = ProfileOptions::default();
        let (a, b) = (build(&o, None).unwrap(), build(&o, None).unwrap());
        assert_eq!(a, b);
        let s = a.of_group("staff").unwrap();
        assert_eq!(s.sha1.len(), 40);
        assert_eq!(
            s.sha1,
            hex::encode_upper(
                ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &s.bytes).as_ref()
            )
        );
        let c = build(
            &ProfileOptions {
                local_lan_access: Some(true),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_ne!(c.of_group("staff").unwrap().sha1, s.sha1);
        // The other group's file is its own.
        assert_ne!(a.of_group("guests").unwrap().sha1, s.sha1);
    }

    #[test]
    fn a_group_can_go_without_and_one_server_needs_no_suffix() {
        let off = ProfileOptions {
            enabled: Some(false),
            ..Default::default()
        };
        let p = Profiles::build(
            &ProfileOptions::default(),
            &[
                GroupProfile {
                    group: "staff",
                    options: Some(&off),
                },
                GroupProfile {
                    group: "guests",
                    options: None,
                },
            ],
            &servers()[..1],
            "Corp VPN",
        )
        .unwrap();
        assert!(p.of_group("staff").is_none());
        let x = text(&p, "guests");
        assert_eq!(
            values(&x, &["ServerList", "HostEntry", "HostName"]),
            ["Corp VPN"]
        );
        assert!(!x.contains("<BackupServerList>"));
    }

    #[test]
    fn paths_with_openconnects_port_suffix_find_the_group() {
        let p = build(&ProfileOptions::default(), None).unwrap();
        assert_eq!(p.group_at("/profiles/staff.xml"), Some("staff"));
        assert_eq!(p.group_at("/profiles/staff.xml:8443"), Some("staff"));
        assert_eq!(p.group_at("/profiles/guests.xml:443"), Some("guests"));
        for bad in [
            "/profiles/nobody.xml",
            "/profiles/staff.xml:",
            "/profiles/staff.xml:84x",
            "/profiles/staff",
            "/profiles/../staff.xml",
            "/staff.xml",
        ] {
            assert_eq!(p.group_at(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_options_name_the_value_and_what_is_valid() {
        let cases: [(ProfileOptions, &str, &str); 5] = [
            (
                ProfileOptions {
                    always_on: Some(true),
                    ..Default::default()
                },
                "profile.always_on",
                "trusted_dns_domains",
            ),
            (
                ProfileOptions {
                    backup_servers: Some(vec!["vpn example".into()]),
                    ..Default::default()
                },
                "profile.backup_servers",
                "'vpn example'",
            ),
            (
                ProfileOptions {
                    trusted_dns_domains: Some(vec!["corp..example".into()]),
                    ..Default::default()
                },
                "profile.trusted_dns_domains",
                "'corp..example'",
            ),
            (
                ProfileOptions {
                    captive_portal_remediation_mins: Some(0),
                    ..Default::default()
                },
                "profile.captive_portal_remediation_mins",
                "1 to 100",
            ),
            (
                ProfileOptions {
                    host_name: Some(" ".into()),
                    ..Default::default()
                },
                "profile.host_name",
                "1 to 64",
            ),
        ];
        for (o, key, says) in cases {
            let e = build(&o, None).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.message.contains(says), "{}", e.message);
        }
        // A group's own bad value names the group section.
        let e = build(
            &ProfileOptions::default(),
            Some(&ProfileOptions {
                backup_servers: Some(vec!["a:0".into()]),
                ..Default::default()
            }),
        )
        .unwrap_err();
        assert_eq!(e.key, "group.profile.backup_servers");
    }

    #[test]
    fn host_addresses() {
        for ok in [
            "vpn.example.com",
            "vpn.example.com:8443",
            "198.18.10.1",
            "198.18.10.1:443",
            "[fd00::1]",
            "[fd00::1]:8443",
            "vpn-1",
        ] {
            assert!(is_host_address(ok), "{ok}");
        }
        for bad in [
            "",
            "vpn example",
            "vpn.example.com:",
            "vpn.example.com:0",
            "vpn.example.com:70000",
            "[fd00::1",
            "[nope]:443",
            "fd00::1",
            "a/b",
            "<x>",
        ] {
            assert!(!is_host_address(bad), "{bad}");
        }
    }
}
