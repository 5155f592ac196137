//! The TLS listener: accepts connections within the limits before
//! authentication, runs the HTTP exchange (the login portal answers it)
//! until a `CONNECT` hands the connection to the tunnel service.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use bytes::BytesMut;
use tokio::{
    io::AsyncWriteExt,
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::{
    auth::{
        admission::{self, ConnectionRefused, ConnectionSlot, Connections},
        bans::{Bans, Offence},
    },
    config::Settings,
    login::LoginService,
    proto::http::{self, Request, Response},
    resources::{GivenUp, SpareDescriptor, out_of_descriptors},
    transport::{io_buffer::AdaptiveStream, tls::ClientTls, tls_tunnel::TunnelService},
};

/// The listener's service: what serving a connection takes.
pub struct Listener {
    connections: Arc<Connections>,
    /// Connection refusals and closings (`vpnctl stats`).
    counters: Arc<admission::Counters>,
    http: http::Limits,
    max_requests: u32,
    lifetime: Duration,
    login: Arc<LoginService>,
    tunnels: Arc<TunnelService>,
    /// Where a client certificate's user name comes from.
    cert_name: crate::config::CertName,
    latencies: Arc<crate::telemetry::Latencies>,
    /// Accepts one connection at a time at the descriptor limit, to tell
    /// it so.
    spare: Arc<SpareDescriptor>,
    /// Banned sources are closed at accept; failed handshakes and
    /// malformed requests score.
    bans: Arc<Bans>,
}

impl Listener {
    pub fn new(
        settings: &Settings,
        connections: Arc<Connections>,
        counters: Arc<admission::Counters>,
        login: Arc<LoginService>,
        tunnels: Arc<TunnelService>,
        latencies: Arc<crate::telemetry::Latencies>,
        bans: Arc<Bans>,
    ) -> Arc<Self> {
        let l = &settings.limits;
        Arc::new(Listener {
            connections,
            counters,
            http: settings.http.clone(),
            max_requests: l.max_requests_per_connection,
            lifetime: Duration::from_secs(l.max_connection_secs),
            login,
            tunnels,
            cert_name: settings.tls.client_username,
            latencies,
            spare: SpareDescriptor::new(),
            bans,
        })
    }

    /// Accepts TLS connections for the daemon's life (a failed accept
    /// backs off and goes on).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: TlsAcceptor,
    ) -> std::convert::Infallible {
        let mut warned: Option<tokio::time::Instant> = None;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => {
                    self.spare.restore();
                    x
                }
                Err(e) => {
                    // Linux takes the descriptor before it looks for a
                    // connection, so at the limit accept fails whether one
                    // waits or not: with the spare given up it waits for
                    // one (and the next comes without delay).
                    if out_of_descriptors(&e)
                        && let Some(spare) = self.spare.give_up()
                        && let Ok((tcp, peer)) = listener.accept().await
                    {
                        if spare.take_back() {
                            // Descriptors were freed meanwhile.
                            (tcp, peer)
                        } else {
                            self.counters
                                .connections_refused_descriptors
                                .fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(self.clone().refuse(tcp, peer, acceptor.clone(), spare));
                            continue;
                        }
                    } else {
                        // Back off instead of spinning; say so every 10 s.
                        if warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(10)) {
                            let hint = if out_of_descriptors(&e) {
                                "; at the descriptor limit new logins are told so, one at a time \
                                 (raise LimitNOFILE or lower server.max_sessions)"
                            } else {
                                ""
                            };
                            tracing::warn!("accept failed: {e}{hint}");
                            warned = Some(tokio::time::Instant::now());
                        }
                        // The next try when the connection on the spare
                        // has been answered, or after 100 ms.
                        let _ = tokio::time::timeout(
                            Duration::from_millis(100),
                            self.spare.returned.notified(),
                        )
                        .await;
                        continue;
                    }
                }
            };
            // What the XDP guard did not drop (no guard on that uplink,
            // IPv4 options, a connection begun just before the ban).
            if self.bans.is_banned(peer.ip()) {
                tracing::debug!(%peer, "connection closed: the source is banned");
                continue;
            }
            let slot = match self.connections.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    let c = &self.counters;
                    match refused {
                        ConnectionRefused::Total => &c.connections_refused_total,
                        ConnectionRefused::Source => &c.connections_refused_source,
                    }
                    .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "connection refused: {refused:?} limit reached");
                    continue;
                }
            };
            let gw = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Err(e) = gw.handle_connection(tcp, peer, acceptor, slot).await {
                    tracing::debug!(%peer, "connection ended: {e}");
                }
            });
        }
    }

    async fn handle_connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        slot: ConnectionSlot,
    ) -> Result<(), ConnectionError> {
        let _ = tcp.set_nodelay(true);
        let (max_requests, lifetime) = (self.max_requests, self.lifetime);
        let opened = tokio::time::Instant::now();
        let timeout = Duration::from_secs(self.http.request_timeout_secs);
        let tcp = AdaptiveStream::new(tcp);
        let handshake = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Err(_) => Err(ConnectionError::HandshakeTimeout(timeout)),
            Ok(r) => r.map_err(ConnectionError::Handshake),
        };
        let mut tls: ClientTls = Box::new(
            handshake.inspect_err(|_| self.bans.offence(peer.ip(), Offence::FailedHandshake))?,
        );
        self.latencies
            .tls_handshake
            .observe(opened.elapsed().as_secs_f64());
        // Each CSTP frame must go out as exactly one TLS record: with no
        // buffer limit, rustls takes every write whole and seals it as one
        // record (frames are smaller than the record size limit).
        tls.get_mut().1.set_buffer_limit(None);
        // Verified by the handshake, if the client sent one.
        let cert_user = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| super::client_cert::user_name(c, self.cert_name));
        let limits = &self.http;
        let keepalive = Duration::from_secs(limits.keepalive_timeout_secs);
        let mut buf = BytesMut::with_capacity(4096);
        let mut requests = 0u32;
        loop {
            let left = lifetime.saturating_sub(opened.elapsed());
            if left.is_zero() {
                self.counters
                    .connections_closed_lifetime
                    .fetch_add(1, Ordering::Relaxed);
                let _ = tls.shutdown().await;
                return Ok(());
            }
            let idle = if requests == 0 { timeout } else { keepalive }.min(left);
            let req = match http::read_request(&mut tls, &mut buf, limits, idle).await {
                Ok(r) => r,
                Err(e) => {
                    if let Some((code, reason)) = e.status() {
                        tracing::info!(%peer, "bad request: {e}");
                        // A slow request is not a malformed one.
                        if code != 408 {
                            self.bans.offence(peer.ip(), Offence::MalformedRequest);
                        }
                        let _ = Response::text(code, reason, format!("{e}\n"))
                            .closing()
                            .write_to(&mut tls)
                            .await;
                        let _ = tls.shutdown().await;
                    }
                    return Ok(());
                }
            };
            requests += 1;
            if req.method == "CONNECT" {
                return Ok(self
                    .tunnels
                    .clone()
                    .connect(tls, buf, req, peer, slot)
                    .await?);
            }
            // Boxed: the login's state (6 KiB, LDAP and RADIUS clients
            // in it) is needed for a moment, and inline it would size the
            // task of every session for as long as its tunnel runs.
            let mut resp = Box::pin(self.login.route(&req, peer, cert_user.as_deref())).await;
            if requests >= max_requests && !resp.close {
                self.counters
                    .connections_closed_requests
                    .fetch_add(1, Ordering::Relaxed);
                resp = resp.closing();
            }
            resp.write_to(&mut tls).await?;
            if resp.close || req.wants_close() {
                let _ = tls.shutdown().await;
                return Ok(());
            }
        }
    }
}

impl Listener {
    /// Tells a connection accepted on the spare descriptor that the
    /// gateway is at its limit: TLS, one request, the answer, closed
    /// (the spare is taken back then). Bounded in time, as a slow client
    /// holds the only spare.
    async fn refuse(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        acceptor: TlsAcceptor,
        spare: GivenUp,
    ) {
        const BOUND: Duration = Duration::from_secs(5);
        let answered = tokio::time::timeout(BOUND, async {
            let mut tls = acceptor.accept(tcp).await.ok()?;
            let mut buf = BytesMut::with_capacity(4096);
            let req: Request = http::read_request(&mut tls, &mut buf, &self.http, BOUND)
                .await
                .ok()?;
            let resp = self.login.unavailable(&req, "connection slots");
            resp.write_to(&mut tls).await.ok()?;
            let _ = tls.shutdown().await;
            Some(())
        })
        .await;
        tracing::debug!(%peer, answered = answered.ok().flatten().is_some(), "refused at the descriptor limit");
        drop(spare);
    }
}

/// Why a client's connection ended early (logged at debug: clients hang
/// up, scanners fail handshakes).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("TLS handshake timed out after {} s", .0.as_secs())]
    HandshakeTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The listener and TLS acceptor for the configured address.
pub async fn bind(
    settings: &Settings,
    tls: Arc<rustls::ServerConfig>,
) -> anyhow::Result<(TcpListener, TlsAcceptor)> {
    let addr = settings.server.listen;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (server.listen)"))?;
    Ok((listener, TlsAcceptor::from(tls)))
}
