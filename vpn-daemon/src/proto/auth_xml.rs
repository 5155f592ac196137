//! The XML "aggregate auth" messages: parsing what clients send and writing
//! the forms and the completion message.
//!
//! Parsing goes by element name with a real XML parser and ignores unknown
//! elements, as both openconnect and Cisco clients add elements freely.

use quick_xml::{Reader, escape::escape, events::Event};

/// What a client's `<config-auth>` request says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ClientAuth {
    /// `init`, `auth-reply`, `logout`, ...
    pub kind: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// The answer to a challenge form ([`challenge_form`]).
    pub answer: Option<String>,
    pub group_select: Option<String>,
    /// Our `aggauth-handle`, echoed back from the `<opaque>` block.
    pub handle: Option<String>,
    /// The session token, in a Cisco `logout` request.
    pub session_token: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XmlError {
    #[error("malformed XML at byte {pos}: {msg}")]
    Malformed { pos: u64, msg: String },
    #[error("the request is not a <config-auth> document")]
    NotConfigAuth,
}

/// Parses a client's `config-auth` document.
pub fn parse_client_auth(body: &str) -> Result<ClientAuth, XmlError> {
    let mut reader = Reader::from_str(body);
    reader.config_mut().trim_text(true);
    let mut out = ClientAuth::default();
    let mut path: Vec<String> = Vec::new();
    let mut seen_root = false;
    loop {
        let ev = reader.read_event().map_err(|e| XmlError::Malformed {
            pos: reader.buffer_position(),
            msg: e.to_string(),
        })?;
        match ev {
            Event::Start(e) => {
                if path.is_empty() {
                    read_root(&e, &mut seen_root, &mut out)?;
                }
                path.push(String::from_utf8_lossy(e.name().as_ref()).into_owned());
            }
            Event::Empty(e) if path.is_empty() => {
                read_root(&e, &mut seen_root, &mut out)?;
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => {
                let text = t
                    .unescape()
                    .map_err(|e| XmlError::Malformed {
                        pos: reader.buffer_position(),
                        msg: e.to_string(),
                    })?
                    .into_owned();
                let names: Vec<&str> = path.iter().map(String::as_str).collect();
                match names.as_slice() {
                    ["config-auth", "auth", "username"] => out.username = Some(text),
                    ["config-auth", "auth", "password"] => out.password = Some(text),
                    ["config-auth", "auth", CHALLENGE_FIELD] => out.answer = Some(text),
                    ["config-auth", "group-select"] => out.group_select = Some(text),
                    ["config-auth", "opaque", "aggauth-handle"] => out.handle = Some(text),
                    ["config-auth", "session-token"] => out.session_token = Some(text),
                    _ => {}
                }
            }
            Event::CData(t) => {
                let text = String::from_utf8_lossy(&t).into_owned();
                let names: Vec<&str> = path.iter().map(String::as_str).collect();
                match names.as_slice() {
                    ["config-auth", "auth", "username"] => out.username = Some(text),
                    ["config-auth", "auth", "password"] => out.password = Some(text),
                    ["config-auth", "auth", CHALLENGE_FIELD] => out.answer = Some(text),
                    _ => {}
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !seen_root {
        return Err(XmlError::NotConfigAuth);
    }
    if !path.is_empty() {
        return Err(XmlError::Malformed {
            pos: reader.buffer_position(),
            msg: format!("document ends inside <{}>", path.last().unwrap()),
        });
    }
    Ok(out)
}

/// Checks the document element and reads its `type` attribute.
fn read_root(
    e: &quick_xml::events::BytesStart<'_>,
    seen_root: &mut bool,
    out: &mut ClientAuth,
) -> Result<(), XmlError> {
    if *seen_root || e.name().as_ref() != b"config-auth" {
        return Err(XmlError::NotConfigAuth);
    }
    *seen_root = true;
    for a in e.attributes() {
        let a = a.map_err(|e| XmlError::Malformed {
            pos: 0,
            msg: e.to_string(),
        })?;
        if a.key.as_ref() == b"type" {
            out.kind = a
                .unescape_value()
                .map_err(|e| XmlError::Malformed {
                    pos: 0,
                    msg: e.to_string(),
                })?
                .into_owned();
        }
    }
    Ok(())
}

/// A group offered in the login form.
pub struct GroupOption<'a> {
    pub name: &'a str,
    pub label: &'a str,
}

/// Everything that goes into an `auth-request` form.
pub struct LoginForm<'a> {
    pub handle: &'a str,
    pub title: &'a str,
    pub message: &'a str,
    pub error: Option<&'a str>,
    pub groups: &'a [GroupOption<'a>],
    pub selected_group: &'a str,
    /// The group is the one the URL named (a group URL, as a profile's
    /// host entry makes): no selector, and the form posts back there.
    pub locked: bool,
}

fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s)
}

/// The `auth-request` document: username and password fields, and a group
/// selector when there is more than one group.
pub fn login_form(f: &LoginForm<'_>) -> String {
    let mut x = String::with_capacity(1024);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str("<config-auth client=\"vpn\" type=\"auth-request\" aggregate-auth-version=\"2\">\n");
    x.push_str("<version who=\"sg\">vpn-gateway</version>\n");
    x.push_str(&format!(
        "<opaque is-for=\"sg\"><tunnel-group>{g}</tunnel-group><group-alias>{g}</group-alias><aggauth-handle>{h}</aggauth-handle><config-hash>1</config-hash></opaque>\n",
        g = esc(f.selected_group),
        h = esc(f.handle)
    ));
    x.push_str("<auth id=\"main\">\n");
    x.push_str(&format!("<title>{}</title>\n", esc(f.title)));
    x.push_str(&format!("<message>{}</message>\n", esc(f.message)));
    if let Some(e) = f.error {
        x.push_str(&format!(
            "<error id=\"88\" param1=\"{}\" param2=\"\">Login failed: %s</error>\n",
            esc(e)
        ));
    }
    if f.locked {
        x.push_str(&format!(
            "<form method=\"post\" action=\"/{}\">\n",
            esc(f.selected_group)
        ));
    } else {
        x.push_str("<form method=\"post\" action=\"/auth\">\n");
    }
    x.push_str("<input type=\"text\" name=\"username\" label=\"Username:\"/>\n");
    x.push_str("<input type=\"password\" name=\"password\" label=\"Password:\"/>\n");
    if f.groups.len() > 1 && !f.locked {
        x.push_str("<select name=\"group_list\" label=\"GROUP:\">\n");
        // The selected group goes first, as ocserv does: some clients take
        // the first option regardless of `selected`.
        let ordered = f
            .groups
            .iter()
            .filter(|g| g.name == f.selected_group)
            .chain(f.groups.iter().filter(|g| g.name != f.selected_group));
        for g in ordered {
            let sel = if g.name == f.selected_group {
                " selected=\"true\""
            } else {
                ""
            };
            x.push_str(&format!(
                "<option value=\"{}\"{sel}>{}</option>\n",
                esc(g.name),
                esc(g.label)
            ));
        }
        x.push_str("</select>\n");
    }
    x.push_str("</form>\n</auth>\n</config-auth>\n");
    x
}

/// The field a challenge form asks for: openconnect's name for a second
/// password, which its `--token-mode` fills in too.
pub const CHALLENGE_FIELD: &str = "secondary_password";

/// A challenge form (a second factor: RADIUS Access-Challenge): the
/// server's `prompt` and one hidden input, in login `handle`. The auth id
/// `challenge` is what openconnect's `--form-entry challenge:...` and
/// `--token-mode` key on.
pub fn challenge_form(
    handle: &str,
    title: &str,
    group: &str,
    prompt: &str,
    error: Option<&str>,
) -> String {
    let mut x = String::with_capacity(768);
    x.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x.push_str("<config-auth client=\"vpn\" type=\"auth-request\" aggregate-auth-version=\"2\">\n");
    x.push_str("<version who=\"sg\">vpn-gateway</version>\n");
    x.push_str(&format!(
        "<opaque is-for=\"sg\"><tunnel-group>{g}</tunnel-group><group-alias>{g}</group-alias><aggauth-handle>{h}</aggauth-handle><config-hash>1</config-hash></opaque>\n",
        g = esc(group),
        h = esc(handle)
    ));
    x.push_str("<auth id=\"challenge\">\n");
    x.push_str(&format!("<title>{}</title>\n", esc(title)));
    x.push_str(&format!("<message>{}</message>\n", esc(prompt)));
    if let Some(e) = error {
        x.push_str(&format!(
            "<error id=\"88\" param1=\"{}\" param2=\"\">Login failed: %s</error>\n",
            esc(e)
        ));
    }
    x.push_str("<form method=\"post\" action=\"/auth\">\n");
    x.push_str(&format!(
        "<input type=\"password\" name=\"{CHALLENGE_FIELD}\" label=\"Code:\"/>\n"
    ));
    x.push_str("</form>\n</auth>\n</config-auth>\n");
    x
}

/// A form with only an error and no inputs: openconnect treats it as a
/// final failure (used when the server refuses a login outright, such as
/// when the session limit is reached).
pub fn fatal_error(title: &str, error: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config-auth client=\"vpn\" type=\"auth-request\" aggregate-auth-version=\"2\">\n<version who=\"sg\">vpn-gateway</version>\n<auth id=\"main\">\n<title>{}</title>\n<error id=\"89\" param1=\"{}\" param2=\"\">%s</error>\n</auth>\n</config-auth>\n",
        esc(title),
        esc(error)
    )
}

/// A client profile to announce: where it is and its SHA-1 (hex).
pub struct ProfileRef<'a> {
    pub uri: &'a str,
    pub sha1: &'a str,
}

/// The `complete` document carrying the session cookie, and the client
/// profile's manifest when there is one (§2.13: clients compare the hash
/// with the file they have and fetch it at `uri` when it differs).
pub fn complete(
    session_id: u64,
    token: &str,
    banner: Option<&str>,
    profile: Option<ProfileRef<'_>>,
) -> String {
    let config = profile.map_or(String::new(), |p| {
        format!(
            "<config client=\"vpn\" type=\"private\">\n<vpn-profile-manifest>\n<vpn rev=\"1.0\">\n<file type=\"profile\" service-type=\"user\">\n<uri>{}</uri>\n<hash type=\"sha1\">{}</hash>\n</file>\n</vpn>\n</vpn-profile-manifest>\n</config>\n",
            esc(p.uri),
            esc(p.sha1)
        )
    });
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<config-auth client=\"vpn\" type=\"complete\" aggregate-auth-version=\"2\">\n<version who=\"sg\">vpn-gateway</version>\n<session-id>{session_id}</session-id>\n<session-token>{}</session-token>\n<auth id=\"success\">\n<title>SSL VPN Service</title>\n<message id=\"0\" param1=\"\" param2=\"\"></message>\n<banner>{}</banner>\n</auth>\n<capabilities><crypto-supported>ssl-dhe</crypto-supported></capabilities>\n{config}</config-auth>\n",
        esc(token),
        esc(banner.unwrap_or(""))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="init" aggregate-auth-version="2"><version who="vpn">v9.01-3</version><device-id>linux-64</device-id><capabilities><auth-method>single-sign-on-v2</auth-method><auth-method>single-sign-on-external-browser</auth-method></capabilities><group-access>https://vpn.example.com/</group-access></config-auth>"#;

    const REPLY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2"><version who="vpn">v9.01-3</version><device-id>linux-64</device-id><opaque is-for="sg"><tunnel-group>Eng</tunnel-group><aggauth-handle>7f3a9c1e</aggauth-handle></opaque><auth><username>alice</username><password>p&amp;ss&lt;word</password></auth><group-select>Eng</group-select></config-auth>"#;

    #[test]
    fn parses_openconnect_init() {
        let a = parse_client_auth(INIT).unwrap();
        assert_eq!(a.kind, "init");
        assert_eq!(a.username, None);
    }

    #[test]
    fn parses_auth_reply_with_escapes() {
        let a = parse_client_auth(REPLY).unwrap();
        assert_eq!(a.kind, "auth-reply");
        assert_eq!(a.username.as_deref(), Some("alice"));
        assert_eq!(a.password.as_deref(), Some("p&ss<word"));
        assert_eq!(a.group_select.as_deref(), Some("Eng"));
        assert_eq!(a.handle.as_deref(), Some("7f3a9c1e"));
    }

    #[test]
    fn rejects_truncated_document() {
        let e = parse_client_auth(&REPLY[..REPLY.len() - 20]).unwrap_err();
        assert!(matches!(e, XmlError::Malformed { .. }), "{e:?}");
    }

    #[test]
    fn rejects_mismatched_tags() {
        let e = parse_client_auth("<config-auth type=\"init\"><auth></config-auth>").unwrap_err();
        assert!(matches!(e, XmlError::Malformed { .. }), "{e:?}");
    }

    #[test]
    fn rejects_other_documents() {
        assert_eq!(
            parse_client_auth("<html></html>"),
            Err(XmlError::NotConfigAuth)
        );
        assert_eq!(parse_client_auth(""), Err(XmlError::NotConfigAuth));
        assert_eq!(parse_client_auth("just text"), Err(XmlError::NotConfigAuth));
    }

    #[test]
    fn complete_announces_the_profile_where_openconnect_looks() {
        let x = complete(
            7,
            "tok",
            None,
            Some(ProfileRef {
                uri: "/profiles/staff.xml",
                sha1: "7C508348F4F5BDB5F42CCB99398D9E9F644C6487",
            }),
        );
        // config/vpn-profile-manifest/vpn[@rev="1.0"]/file[@type="profile"][@service-type="user"]
        let at = x.find("<config client=\"vpn\" type=\"private\">\n<vpn-profile-manifest>\n<vpn rev=\"1.0\">\n<file type=\"profile\" service-type=\"user\">\n<uri>/profiles/staff.xml</uri>\n<hash type=\"sha1\">7C508348F4F5BDB5F42CCB99398D9E9F644C6487</hash>");
        assert!(at.is_some(), "{x}");
        assert!(x.ends_with("</config>\n</config-auth>\n"));
        assert!(!complete(7, "tok", None, None).contains("<config client"));
    }

    #[test]
    fn cisco_logout() {
        let a = parse_client_auth(
            "<config-auth client=\"vpn\" type=\"logout\"><session-token>abc</session-token></config-auth>",
        )
        .unwrap();
        assert_eq!(a.kind, "logout");
        assert_eq!(a.session_token.as_deref(), Some("abc"));
    }

    #[test]
    fn form_escapes_and_orders_groups() {
        let groups = [
            GroupOption {
                name: "eng",
                label: "Engineering",
            },
            GroupOption {
                name: "sales",
                label: "Sales & <Marketing>",
            },
        ];
        let x = login_form(&LoginForm {
            handle: "h1",
            title: "Login",
            message: "Hi",
            error: Some("bad <password>"),
            groups: &groups,
            selected_group: "sales",
            locked: false,
        });
        assert!(x.contains("Sales &amp; &lt;Marketing&gt;"));
        assert!(x.contains("param1=\"bad &lt;password&gt;\""));
        let sales = x.find("value=\"sales\" selected=\"true\"").unwrap();
        let eng = x.find("value=\"eng\"").unwrap();
        assert!(sales < eng);
        assert!(x.contains("action=\"/auth\""));
        // Reached by its group URL: no selector, and back to that URL.
        let locked = login_form(&LoginForm {
            handle: "h1",
            title: "Login",
            message: "Hi",
            error: None,
            groups: &groups,
            selected_group: "sales",
            locked: true,
        });
        assert!(!locked.contains("group_list"), "{locked}");
        assert!(locked.contains("<form method=\"post\" action=\"/sales\">"));
        // The form we write is itself parseable.
        let mut r = Reader::from_str(&x);
        loop {
            if r.read_event().unwrap() == Event::Eof {
                break;
            }
        }
    }

    #[test]
    fn single_group_has_no_selector() {
        let groups = [GroupOption {
            name: "default",
            label: "default",
        }];
        let x = login_form(&LoginForm {
            handle: "h",
            title: "t",
            message: "m",
            error: None,
            groups: &groups,
            selected_group: "default",
            locked: false,
        });
        assert!(!x.contains("group_list"));
        assert!(!x.contains("<error"));
    }

    #[test]
    fn challenge_form_and_its_answer() {
        let form = challenge_form("h1", "VPN", "default", "Enter <code>", Some("Wrong"));
        assert!(form.contains("<auth id=\"challenge\">"));
        assert!(form.contains("<message>Enter &lt;code&gt;</message>"));
        assert!(form.contains("name=\"secondary_password\""));
        assert!(form.contains("<aggauth-handle>h1</aggauth-handle>"));
        // What openconnect sends back (see ../shared/protocol/anyconnect.md §2.7).
        let reply = parse_client_auth(
            "<?xml version=\"1.0\"?><config-auth client=\"vpn\" type=\"auth-reply\"><opaque is-for=\"sg\"><aggauth-handle>h1</aggauth-handle></opaque><auth><secondary_password>123456</secondary_password></auth></config-auth>",
        )
        .unwrap();
        assert_eq!(reply.answer.as_deref(), Some("123456"));
        assert_eq!(reply.handle.as_deref(), Some("h1"));
        assert_eq!(reply.password, None);
    }
}
