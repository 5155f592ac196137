//! The identity feed (`[identity_feed]`): who holds which VPN address,
//! over HTTPS for web proxies and other consumers, as Cisco's ASA tells
//! its WSA web proxy. The wire format is `proto::identity`'s, the journal
//! the changes come from `session::journal`'s.
//!
//! - `GET /v1/mappings`: every mapping now, with the position it is at.
//! - `GET /v1/mappings/<address>`: the holder of one address, or 404.
//! - `GET /v1/changes`: server-sent events. With a position it still has
//!   (`Last-Event-ID: EPOCH-SEQ`, or `?since=EPOCH-SEQ`), the changes
//!   after it; otherwise a `snapshot` event first. Then each change as it
//!   happens, and a comment every `KEEPALIVE` so both ends notice a dead
//!   connection.
//!
//! Every request carries the shared secret (bearer token or basic
//! authentication password); anything else gets 401. A consumer that
//! stops reading is dropped after `WRITE_TIMEOUT`.
//!
//! [`consumer`] is the other end: a client that keeps every mapping
//! current from the stream, resuming where it left off (the Squid helper,
//! `vpn-identity-helper`, answers from it).

pub mod consumer;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    config::IdentityFeedConfig,
    proto::{
        http::{self, Request, Response},
        identity::{Position, authorized, sse_event},
    },
    session::journal::Journal,
};

/// A comment on an idle stream this often.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// A consumer that takes longer than this to take a write is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake and request head, at most.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections that are not (yet) streams, at most: each holds a
/// descriptor of vpnd's for up to `REQUEST_TIMEOUT`, and the descriptors
/// are the VPN's too.
const MAX_REQUESTS: usize = 64;

/// The feed's state.
pub struct Feed {
    journal: Arc<Journal>,
    secret: String,
    max_consumers: usize,
    consumers: AtomicUsize,
    /// Connections open now, streams included.
    open: AtomicUsize,
}

impl Feed {
    pub fn new(cfg: &IdentityFeedConfig, journal: Arc<Journal>) -> Arc<Self> {
        Arc::new(Feed {
            journal,
            secret: cfg.secret.clone(),
            max_consumers: cfg.max_consumers,
            consumers: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
        })
    }
}

/// Binds `identity_feed.listen`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("identity_feed.listen: cannot listen on {addr}: {e}"))
}

/// Serves the feed over TLS with `tls` until the daemon ends.
pub async fn serve(feed: Arc<Feed>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("identity feed: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if feed.open.fetch_add(1, Ordering::Relaxed) >= feed.max_consumers + MAX_REQUESTS {
            feed.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%peer, "identity feed: too many connections; closed at once");
            continue;
        }
        let (feed, acceptor) = (feed.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _open = Consumer(&feed.open);
            if let Err(e) = connection(&feed, &acceptor, tcp, peer).await {
                tracing::debug!(%peer, "identity feed: {e}");
            }
        });
    }
}

/// Counts a consumer (or a connection) for as long as it lives.
struct Consumer<'a>(&'a AtomicUsize);

impl Drop for Consumer<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(
    feed: &Feed,
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut io = tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))??;
    let mut buf = BytesMut::with_capacity(1024);
    let req = match http::read_request(&mut io, &mut buf, &http::Limits::default(), REQUEST_TIMEOUT)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            if let Some((code, reason)) = e.status() {
                Response::text(code, reason, format!("{e}\n"))
                    .closing()
                    .write_to(&mut io)
                    .await?;
            }
            return Ok(());
        }
    };
    if !authorized(req.header("authorization"), &feed.secret) {
        tracing::warn!(%peer, "identity feed: request without the secret refused");
        return Response::text(
            401,
            "Unauthorized",
            "the identity feed's secret is required\n",
        )
        .header(
            "WWW-Authenticate",
            "Basic realm=\"vpn-gateway identity feed\"",
        )
        .closing()
        .write_to(&mut io)
        .await;
    }
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    match (req.method.as_str(), path) {
        ("GET", "/v1/changes") => {
            if feed.consumers.fetch_add(1, Ordering::Relaxed) >= feed.max_consumers {
                feed.consumers.fetch_sub(1, Ordering::Relaxed);
                return Response::text(
                    503,
                    "Service Unavailable",
                    "identity_feed.max_consumers are connected; try again later\n",
                )
                .header("Retry-After", "5")
                .closing()
                .write_to(&mut io)
                .await;
            }
            let _counted = Consumer(&feed.consumers);
            let from = resume_position(&req, query);
            tracing::info!(%peer, from = ?from.as_ref().map(Position::to_string), "identity feed: consumer connected");
            let r = stream(&mut io, &feed.journal, from).await;
            tracing::info!(%peer, "identity feed: consumer gone");
            r
        }
        ("GET", "/v1/mappings") => json(&feed.journal.snapshot()).write_to(&mut io).await,
        ("GET", p) if p.starts_with("/v1/mappings/") => {
            let a = &p["/v1/mappings/".len()..];
            match a.parse() {
                Ok(ip) => match feed.journal.lookup(ip) {
                    Some(m) => json(&m).write_to(&mut io).await,
                    None => {
                        Response::text(404, "Not Found", format!("no session holds {ip}\n"))
                            .closing()
                            .write_to(&mut io)
                            .await
                    }
                },
                Err(_) => {
                    Response::text(
                        400,
                        "Bad Request",
                        format!(
                            "'{}' is not an IP address\n",
                            crate::proto::client_string(a)
                        ),
                    )
                    .closing()
                    .write_to(&mut io)
                    .await
                }
            }
        }
        ("GET", _) => {
            Response::text(
                404,
                "Not Found",
                "the identity feed has /v1/mappings, /v1/mappings/<address> and /v1/changes\n",
            )
            .closing()
            .write_to(&mut io)
            .await
        }
        _ => {
            Response::text(405, "Method Not Allowed", "GET only\n")
                .header("Allow", "GET")
                .closing()
                .write_to(&mut io)
                .await
        }
    }
}

/// Where a consumer resumes: `Last-Event-ID`, else `?since=`.
fn resume_position(req: &Request, query: &str) -> Option<Position> {
    req.header("last-event-id")
        .and_then(Position::parse)
        .or_else(|| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("since="))
                .and_then(Position::parse)
        })
}

fn json(v: &impl serde::Serialize) -> Response {
    let mut r = Response::new(200, "OK")
        .header("Content-Type", "application/json")
        .header("Cache-Control", "no-store")
        .closing();
    r.body = serde_json::to_vec(v).unwrap_or_default();
    r.body.push(b'\n');
    r
}

async fn write<S: AsyncWrite + Unpin>(io: &mut S, text: &str) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, async {
        io.write_all(text.as_bytes()).await?;
        io.flush().await
    })
    .await
    .map_err(|_| std::io::Error::other("the consumer stopped reading"))?
}

/// The event stream: from `from` when the journal still has what follows
/// it, else from a snapshot; until the consumer goes or the daemon ends.
async fn stream<S: AsyncWrite + Unpin>(
    io: &mut S,
    journal: &Journal,
    from: Option<Position>,
) -> std::io::Result<()> {
    write(
        io,
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\nConnection: close\r\n\r\nretry: 5000\n\n",
    )
    .await?;
    // Subscribed before the first read: a change in between wakes us.
    let mut wake = journal.subscribe();
    let epoch = journal.epoch().to_owned();
    let position = |seq| Position {
        epoch: epoch.clone(),
        seq,
    };
    let mut seq = from.filter(|p| p.epoch == epoch).map(|p| p.seq);
    loop {
        let mut out = String::new();
        match seq.and_then(|s| journal.after(s)) {
            Some(changes) => {
                for c in changes {
                    out.push_str(&sse_event(&position(c.seq), c.op.name(), &c));
                    seq = Some(c.seq);
                }
            }
            None => {
                // No position, one from another run, or one the journal
                // no longer reaches back to.
                let snap = journal.snapshot();
                out.push_str(&sse_event(&position(snap.seq), "snapshot", &snap));
                seq = Some(snap.seq);
            }
        }
        if !out.is_empty() {
            write(io, &out).await?;
        }
        tokio::select! {
            changed = wake.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep(KEEPALIVE) => write(io, ": keepalive\n\n").await?,
        }
    }
}
