//! The RADIUS client: asks the `[radius]` servers whether a password (or
//! a second factor's code) is right, in order, the next when one does not
//! answer, and turns the answer into a [`Verdict`] for the login flow.
//!
//! Each request has its own UDP socket, connected to the server, so a
//! reply can only come from it, ICMP "port unreachable" ends the wait at
//! once, and identifiers never collide. Tries of one server repeat the
//! same packet (RFC 5080 §2.2.1); a reply that fails the checks of
//! [`radius::verify_reply`] is logged and ignored, so a forged packet
//! cannot end the wait for the real one.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use rand::RngCore as _;
use tokio::net::UdpSocket;

use crate::{
    auth::{Grant, login::Verdict},
    config::{RadiusServer, RadiusSettings},
    proto::radius::{self, Code, EncodeError, Packet, ReplyError, attr},
};

/// What a user asks: a password for `user`, or, with `state`, the answer
/// to the server's challenge.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub state: Option<&'a [u8]>,
    /// The client's public address (Calling-Station-Id).
    pub client: IpAddr,
}

/// Why one server gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "no answer to {tries} tries of {timeout:?} each (down, unreachable, or the shared secret differs: servers drop requests whose Message-Authenticator does not verify)"
    )]
    NoAnswer { tries: u32, timeout: Duration },
    #[error("nothing listens there (ICMP port unreachable)")]
    Refused,
    /// Only replies that failed the checks came back; the last one's fault.
    #[error("{0}")]
    BadReply(ReplyError),
    #[error("it answered {0}, which is no answer to an Access-Request")]
    UnexpectedCode(Code),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("the request cannot be encoded: {0}")]
    Encode(#[from] EncodeError),
}

/// No server could answer.
pub type Unavailable = crate::auth::Unavailable<ServerError>;

/// The client of `[radius]`.
pub struct RadiusClient {
    settings: RadiusSettings,
    /// The server that answered last: asked first next time, so a dead
    /// first server costs its timeouts once, not on every login.
    preferred: AtomicUsize,
}

impl RadiusClient {
    pub fn new(settings: RadiusSettings) -> Self {
        RadiusClient {
            settings,
            preferred: AtomicUsize::new(0),
        }
    }

    /// Asks the servers about `req`; the verdict of the first that
    /// answers, else each one's failure.
    pub async fn access(&self, req: &AccessRequest<'_>) -> Result<Verdict, Unavailable> {
        let n = self.settings.servers.len();
        let first = self.preferred.load(Ordering::Relaxed) % n.max(1);
        let mut failures = Vec::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let server = &self.settings.servers[idx];
            let reply = self.exchange(server, req).await.and_then(|p| match p.code {
                Code::AccessAccept | Code::AccessReject | Code::AccessChallenge => Ok(p),
                other => Err(ServerError::UnexpectedCode(other)),
            });
            match reply {
                Ok(p) => {
                    if idx != first {
                        tracing::warn!(
                            server = %server.address,
                            "RADIUS: now asking {} first (the servers before it failed)",
                            server.address
                        );
                    }
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok(verdict(&p));
                }
                Err(e) => {
                    tracing::warn!(server = %server.address, "RADIUS server failed: {e}");
                    failures.push((server.address.to_string(), e));
                }
            }
        }
        Err(Unavailable {
            service: "RADIUS",
            failures,
        })
    }

    /// The Access-Request for `req` to `server` with identifier `id`.
    fn request(
        &self,
        server: &RadiusServer,
        req: &AccessRequest<'_>,
        id: u8,
        auth: [u8; 16],
    ) -> Result<Vec<u8>, EncodeError> {
        let calling = req.client.to_string();
        let nas_port_type = radius::NAS_PORT_TYPE_VIRTUAL.to_be_bytes();
        let service = radius::SERVICE_TYPE_FRAMED.to_be_bytes();
        let mut attrs: Vec<(u8, &[u8])> = vec![
            (attr::USER_NAME, req.user.as_bytes()),
            (
                attr::NAS_IDENTIFIER,
                self.settings.nas_identifier.as_bytes(),
            ),
            (attr::NAS_PORT_TYPE, &nas_port_type),
            (attr::SERVICE_TYPE, &service),
            (attr::CALLING_STATION_ID, calling.as_bytes()),
        ];
        if let Some(state) = req.state {
            attrs.push((attr::STATE, state));
        }
        radius::access_request(
            id,
            auth,
            server.secret.as_bytes(),
            Some(req.password.as_bytes()),
            &attrs,
        )
    }

    /// One request to one server.
    async fn exchange(
        &self,
        server: &RadiusServer,
        req: &AccessRequest<'_>,
    ) -> Result<Packet, ServerError> {
        let mut auth = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut auth);
        let id = auth[0];
        let packet = self.request(server, req, id, auth)?;
        let to = Exchange {
            to: server.address,
            secret: server.secret.as_bytes(),
            require_message_authenticator: server.require_message_authenticator,
            tries: self.settings.tries,
            timeout: self.settings.timeout,
        };
        to.run(&packet, id, &auth).await
    }
}

/// Where and how one request goes: to one server, `tries` times, each
/// waiting `timeout` for a reply that passes the checks.
pub(crate) struct Exchange<'a> {
    pub to: SocketAddr,
    pub secret: &'a [u8],
    pub require_message_authenticator: bool,
    pub tries: u32,
    pub timeout: Duration,
}

impl Exchange<'_> {
    /// Sends `packet` (identifier `id`, Request Authenticator `auth`) and
    /// returns the first reply that passes [`radius::verify_reply`].
    pub(crate) async fn run(
        &self,
        packet: &[u8],
        id: u8,
        auth: &[u8; 16],
    ) -> Result<Packet, ServerError> {
        let local: SocketAddr = if self.to.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(self.to).await?;
        let mut last_bad = None;
        let mut buf = vec![0u8; radius::MAX_PACKET];
        for _ in 0..self.tries {
            match sock.send(packet).await {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err(ServerError::Refused);
                }
                r => r?,
            };
            let deadline = tokio::time::Instant::now() + self.timeout;
            loop {
                let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        return Err(ServerError::Refused);
                    }
                    Ok(r) => r?,
                };
                match radius::verify_reply(
                    &buf[..n],
                    id,
                    auth,
                    self.secret,
                    self.require_message_authenticator,
                ) {
                    Ok(p) => return Ok(p),
                    Err(e) => {
                        tracing::warn!(server = %self.to, "RADIUS: ignored a reply: {e}");
                        last_bad = Some(e);
                    }
                }
            }
        }
        Err(match last_bad {
            Some(e) => ServerError::BadReply(e),
            None => ServerError::NoAnswer {
                tries: self.tries,
                timeout: self.timeout,
            },
        })
    }
}

/// What an Access-Accept, -Reject or -Challenge means for the login.
fn verdict(p: &Packet) -> Verdict {
    let message = p.joined_text(attr::REPLY_MESSAGE);
    match p.code {
        Code::AccessAccept => Verdict::Accept(grant(p)),
        Code::AccessChallenge => Verdict::Challenge {
            prompt: message.unwrap_or_else(|| "Enter the code:".into()),
            state: p.attr(attr::STATE).unwrap_or_default().to_vec(),
        },
        _ => Verdict::Rejected { message },
    }
}

/// What an Access-Accept grants.
fn grant(p: &Packet) -> Grant {
    let secs = |t| {
        p.u32(t)
            .filter(|s| *s > 0)
            .map(|s| Duration::from_secs(s.into()))
    };
    Grant {
        source: crate::auth::AuthSource::Radius,
        own_policy: p.text(attr::FILTER_ID),
        // 255.255.255.255 (the user chooses) and 255.255.255.254 (the
        // NAS chooses) mean "from the pool" (RFC 2865 §5.8).
        framed_v4: p
            .ipv4(attr::FRAMED_IP_ADDRESS)
            .filter(|a| u32::from(*a) < 0xffff_fffe),
        session_timeout: secs(attr::SESSION_TIMEOUT),
        idle_timeout: secs(attr::IDLE_TIMEOUT),
        class: p.all(attr::CLASS).map(<[u8]>::to_vec).collect(),
        groups: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(servers: Vec<RadiusServer>) -> RadiusSettings {
        RadiusSettings {
            servers,
            timeout: Duration::from_millis(200),
            tries: 2,
            nas_identifier: "vpn-gateway".into(),
            interim: None,
            accounting: false,
            dynamic_authorization: None,
        }
    }

    fn server(address: SocketAddr, secret: &str) -> RadiusServer {
        RadiusServer {
            address,
            secret: secret.into(),
            require_message_authenticator: true,
            accounting: None,
        }
    }

    /// A server on a local socket answering each request with what
    /// `answer` builds from it (None: silence).
    async fn fake_server(
        answer: impl Fn(&Packet) -> Option<Vec<u8>> + Send + 'static,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<Packet>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok(Ok((n, from))) =
                tokio::time::timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await
            {
                let p = radius::decode(&buf[..n]).unwrap();
                if let Some(reply) = answer(&p) {
                    sock.send_to(&reply, from).await.unwrap();
                }
                seen.push(p);
            }
            seen
        });
        (addr, task)
    }

    fn req() -> AccessRequest<'static> {
        AccessRequest {
            user: "alice",
            password: "pw",
            state: None,
            client: "198.18.1.2".parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn accept_carries_the_grant_and_the_request_the_nas_attributes() {
        let (addr, seen) = fake_server(|p| {
            radius::response(
                Code::AccessAccept,
                p.id,
                &p.authenticator,
                b"s3cret",
                &[
                    (attr::FILTER_ID, b"engineering"),
                    (attr::FRAMED_IP_ADDRESS, &[198, 19, 0, 9]),
                    (attr::SESSION_TIMEOUT, &60u32.to_be_bytes()),
                    (attr::CLASS, b"c1"),
                ],
                true,
            )
            .ok()
        })
        .await;
        let c = RadiusClient::new(settings(vec![server(addr, "s3cret")]));
        let v = c.access(&req()).await.unwrap();
        assert_eq!(
            v,
            Verdict::Accept(Grant {
                source: crate::auth::AuthSource::Radius,
                own_policy: Some("engineering".into()),
                framed_v4: Some(Ipv4Addr::new(198, 19, 0, 9)),
                session_timeout: Some(Duration::from_secs(60)),
                idle_timeout: None,
                class: vec![b"c1".to_vec()],
                groups: vec![],
            })
        );
        let seen = seen.await.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].text(attr::USER_NAME).as_deref(), Some("alice"));
        assert_eq!(
            seen[0].text(attr::CALLING_STATION_ID).as_deref(),
            Some("198.18.1.2")
        );
        assert_eq!(
            seen[0].u32(attr::NAS_PORT_TYPE),
            Some(radius::NAS_PORT_TYPE_VIRTUAL)
        );
        assert_eq!(seen[0].attrs[0].0, attr::MESSAGE_AUTHENTICATOR);
    }

    #[tokio::test]
    async fn a_silent_server_is_retried_then_the_next_one_asked_and_preferred() {
        let (dead, dead_seen) = fake_server(|_| None).await;
        let (live, live_seen) = fake_server(|p| {
            radius::response(Code::AccessReject, p.id, &p.authenticator, b"s", &[], true).ok()
        })
        .await;
        let c = RadiusClient::new(settings(vec![server(dead, "s"), server(live, "s")]));
        assert_eq!(
            c.access(&req()).await.unwrap(),
            Verdict::Rejected { message: None }
        );
        // The next login goes to the live server straight away.
        assert!(c.access(&req()).await.is_ok());
        assert_eq!(dead_seen.await.unwrap().len(), 2, "two tries, then next");
        assert_eq!(live_seen.await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn forged_and_wrongly_signed_replies_are_ignored_and_reported() {
        // Signed with another secret: every reply fails, the failure says why.
        let (addr, _seen) = fake_server(|p| {
            radius::response(
                Code::AccessAccept,
                p.id,
                &p.authenticator,
                b"other",
                &[],
                true,
            )
            .ok()
        })
        .await;
        let c = RadiusClient::new(settings(vec![server(addr, "s")]));
        let e = c.access(&req()).await.unwrap_err();
        assert!(
            matches!(
                e.failures[0].1,
                ServerError::BadReply(ReplyError::ResponseAuthenticator)
            ),
            "{e}"
        );
        assert!(e.to_string().contains("shared secret"), "{e}");
        // A reply without Message-Authenticator (an old server, or a
        // Blast-RADIUS forgery): refused.
        let (addr, _seen) = fake_server(|p| {
            radius::response(Code::AccessAccept, p.id, &p.authenticator, b"s", &[], false).ok()
        })
        .await;
        let c = RadiusClient::new(settings(vec![server(addr, "s")]));
        let e = c.access(&req()).await.unwrap_err();
        assert!(matches!(
            e.failures[0].1,
            ServerError::BadReply(ReplyError::NoMessageAuthenticator)
        ));
    }

    #[tokio::test]
    async fn challenge_gives_prompt_and_state_and_closed_ports_fail_fast() {
        let (addr, seen) = fake_server(|p| {
            let code = if p.attr(attr::STATE).is_some() {
                Code::AccessAccept
            } else {
                Code::AccessChallenge
            };
            radius::response(
                code,
                p.id,
                &p.authenticator,
                b"s",
                &[
                    (attr::REPLY_MESSAGE, b"Enter "),
                    (attr::REPLY_MESSAGE, b"the code"),
                    (attr::STATE, b"round1"),
                ],
                true,
            )
            .ok()
        })
        .await;
        let c = RadiusClient::new(settings(vec![server(addr, "s")]));
        let v = c.access(&req()).await.unwrap();
        assert_eq!(
            v,
            Verdict::Challenge {
                prompt: "Enter the code".into(),
                state: b"round1".to_vec()
            }
        );
        let answer = AccessRequest {
            password: "123456",
            state: Some(b"round1"),
            ..req()
        };
        assert!(matches!(
            c.access(&answer).await.unwrap(),
            Verdict::Accept(_)
        ));
        let seen = seen.await.unwrap();
        assert_eq!(seen[1].attr(attr::STATE), Some(&b"round1"[..]));

        // A port nothing listens on: refused at once, not after timeouts.
        let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        // (Waiting out the tries would give NoAnswer instead.)
        let c = RadiusClient::new(settings(vec![server(addr, "s")]));
        let e = c.access(&req()).await.unwrap_err();
        assert!(matches!(e.failures[0].1, ServerError::Refused), "{e}");
    }
}
