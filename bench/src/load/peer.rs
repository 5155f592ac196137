//! One simulated client: what openconnect does on the wire, minus the
//! tunnel device. TLS, the aggregate-auth exchange (any number of forms:
//! ocserv asks for the user name and the password in two), CONNECT, then
//! the CSTP tunnel: keepalives when idle, DPD requests answered, an
//! optional ICMP echo through the tunnel now and then, and a DISCONNECT
//! at the end, as `openconnect` sends on Ctrl-C. With DTLS (PSK-NEGOTIATE,
//! [`super::dtls`]) keepalives, DPD answers and echoes go over the UDP
//! channel, as openconnect's do once it is up.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_rustls::{TlsConnector, client::TlsStream};

/// Why a session did not get or keep its tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// TCP connect refused or timed out.
    Connect,
    /// The TLS handshake failed.
    Tls,
    /// The gateway refused the login (401, or a form with an error).
    AuthRefused,
    /// The gateway answered the login with another status (503: busy).
    AuthStatus,
    /// CONNECT was answered with something other than 200.
    ConnectRefused,
    /// The gateway closed the tunnel or sent garbage before the end.
    TunnelLost,
    /// The gateway sent DISCONNECT or TERMINATE before the end.
    Terminated,
    /// A step took longer than the step timeout.
    Timeout,
    /// The run's time bound came before the session was up.
    Deadline,
    /// Not started: the machine was short of memory (--min-available-mib).
    MemoryGuard,
    /// The generator itself ran out of descriptors (its RLIMIT_NOFILE):
    /// not the gateway's doing.
    GeneratorDescriptors,
    /// DTLS was asked for and the gateway offered none (no port, App-ID
    /// or PSK-NEGOTIATE in the CONNECT answer).
    DtlsNotOffered,
    /// The DTLS handshake failed.
    Dtls,
}

impl Failure {
    /// A socket call of ours failed: out of descriptors here, or else the
    /// connection failed.
    pub fn local(e: &std::io::Error) -> Failure {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => Failure::GeneratorDescriptors,
            _ => Failure::Connect,
        }
    }
}

/// What one login measured.
#[derive(Debug, Clone, Default)]
pub struct LoginTimes {
    pub tcp: Duration,
    pub tls: Duration,
    /// From the init POST to the first form.
    pub first_form: Duration,
    /// The round trips that carried the password (the gateway verifies it).
    pub password: Duration,
    /// From CONNECT sent to its answer.
    pub connect: Duration,
    /// The DTLS handshake, when asked for.
    pub dtls: Option<Duration>,
    pub total: Duration,
}

impl LoginTimes {
    /// The gateway's set-up work a client waits for, without the password
    /// check: TLS, the first form, CONNECT.
    pub fn setup(&self) -> Duration {
        self.tls + self.first_form + self.connect
    }
}

pub struct Target {
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub step_timeout: Duration,
    /// Open a DTLS channel too (PSK-NEGOTIATE).
    pub dtls: Option<Arc<super::dtls::Client>>,
}

/// Counters a tunnel adds to while it is held.
#[derive(Default)]
pub struct TunnelCounters {
    pub keepalives: std::sync::atomic::AtomicU64,
    /// Records received over DTLS (echo replies, DPD, keepalives).
    pub dtls_received: std::sync::atomic::AtomicU64,
    pub dpd_answered: std::sync::atomic::AtomicU64,
    pub echo_sent: std::sync::atomic::AtomicU64,
    pub echo_received: std::sync::atomic::AtomicU64,
}

pub struct Tunnel {
    tls: TlsStream<TcpStream>,
    dtls: Option<super::dtls::Channel>,
    pub address: Ipv4Addr,
    /// What the gateway asked for (X-CSTP-Keepalive), in seconds.
    pub keepalive: Option<u64>,
    buf: Vec<u8>,
}

async fn step<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(Failure::Timeout))
}

/// Logs in as `user` from `source` and opens the tunnel.
pub async fn login(
    target: &Target,
    source: IpAddr,
    user: &str,
    password: &str,
) -> Result<(Tunnel, LoginTimes), Failure> {
    let mut t = LoginTimes::default();
    let start = Instant::now();
    let limit = target.step_timeout;
    let tcp = step(limit, async {
        let s = if source.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| Failure::local(&e))?;
        s.bind(SocketAddr::new(source, 0))
            .map_err(|e| Failure::local(&e))?;
        s.connect(target.addr).await.map_err(|e| Failure::local(&e))
    })
    .await?;
    let _ = tcp.set_nodelay(true);
    t.tcp = start.elapsed();
    let mark = Instant::now();
    let name = rustls::pki_types::ServerName::IpAddress(target.addr.ip().into());
    let mut tls = step(limit, async {
        TlsConnector::from(target.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|_| Failure::Tls)
    })
    .await?;
    t.tls = mark.elapsed();

    let host = target.addr.ip().to_string();
    let mut http = Http::default();
    let mark = Instant::now();
    let mut resp = step(limit, http.post(&mut tls, &host, "/", INIT)).await?;
    t.first_form = mark.elapsed();
    let mark = Instant::now();
    let mut token = None;
    let debug = std::env::var_os("VPN_LOAD_DEBUG").is_some();
    for _ in 0..4 {
        if debug {
            eprintln!("{} {}\n{:?}", resp.status, resp.body, http.cookies);
        }
        if resp.status != 200 {
            return Err(if resp.status == 401 {
                Failure::AuthRefused
            } else {
                Failure::AuthStatus
            });
        }
        if resp.body.contains("type=\"complete\"") {
            // ocserv sends the cookie only as Set-Cookie: webvpn.
            token = resp.session_token().or_else(|| http.cookie("webvpn"));
            break;
        }
        let Some(form) = Form::parse(&resp.body) else {
            return Err(Failure::AuthRefused);
        };
        if form.error {
            return Err(Failure::AuthRefused);
        }
        let reply = form.reply(user, password);
        resp = step(limit, http.post(&mut tls, &host, &form.action, &reply)).await?;
    }
    let token = token.ok_or(Failure::AuthRefused)?;
    t.password = mark.elapsed();

    let mark = Instant::now();
    // openconnect's DTLS offer: a legacy master secret it would use for
    // Cisco's mode, and PSK-NEGOTIATE (the only mode here).
    let dtls_offer = if target.dtls.is_some() {
        let secret: String = (0..48)
            .map(|i| format!("{:02X}", (i * 37 + 11) as u8))
            .collect();
        format!("X-DTLS-Master-Secret: {secret}\r\nX-DTLS-CipherSuite: PSK-NEGOTIATE\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "CONNECT /CSCOSSLC/tunnel HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Open AnyConnect VPN Agent v9.01-3\r\n\
         Cookie: webvpn={token}\r\nX-CSTP-Version: 1\r\nX-CSTP-Hostname: load\r\nX-CSTP-Base-MTU: 1500\r\n\
         X-CSTP-Address-Type: IPv4\r\n{dtls_offer}\r\n"
    );
    let head = step(limit, async {
        tls.write_all(req.as_bytes())
            .await
            .map_err(|_| Failure::TunnelLost)?;
        read_head(&mut tls, &mut http.buf).await
    })
    .await?;
    t.connect = mark.elapsed();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(Failure::ConnectRefused);
    }
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let address = header("X-CSTP-Address")
        .and_then(|a| a.parse().ok())
        .ok_or(Failure::ConnectRefused)?;
    let keepalive = header("X-CSTP-Keepalive").and_then(|k| k.parse().ok());
    let dtls = match &target.dtls {
        None => None,
        Some(client) => {
            if debug {
                eprintln!("{head}");
            }
            let port: u16 = header("X-DTLS-Port")
                .and_then(|p| p.parse().ok())
                .ok_or(Failure::DtlsNotOffered)?;
            let app_id: [u8; 32] = header("X-DTLS-App-ID")
                .filter(|_| header("X-DTLS-CipherSuite") == Some("PSK-NEGOTIATE"))
                .and_then(hex32)
                .ok_or(Failure::DtlsNotOffered)?;
            let mut psk = [0u8; 32];
            tls.get_ref()
                .1
                .export_keying_material(&mut psk, b"EXPORTER-openconnect-psk", None)
                .map_err(|e| {
                    if debug {
                        eprintln!("exporter: {e}");
                    }
                    Failure::Dtls
                })?;
            let mark = Instant::now();
            let server = SocketAddr::new(target.addr.ip(), port);
            let ch = client.connect(source, server, &app_id, psk, limit).await?;
            t.dtls = Some(mark.elapsed());
            Some(ch)
        }
    };
    t.total = start.elapsed();
    Ok((
        Tunnel {
            tls,
            dtls,
            address,
            keepalive,
            buf: std::mem::take(&mut http.buf),
        },
        t,
    ))
}

/// 64 hex digits as 32 bytes.
fn hex32(h: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if h.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

const INIT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="init" aggregate-auth-version="2"><version who="vpn">v9.01-3</version><device-id>linux-64</device-id><group-access>https://gateway/</group-access></config-auth>"#;

/// CSTP frame types (../shared/protocol/anyconnect.md §4.2).
const DATA: u8 = 0;
const DPD_REQ: u8 = 3;
const DPD_RESP: u8 = 4;
const DISCONNECT: u8 = 5;
const KEEPALIVE: u8 = 7;
const TERMINATE: u8 = 9;

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + payload.len());
    f.extend_from_slice(b"STF\x01");
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[kind, 0]);
    f.extend_from_slice(payload);
    f
}

/// An ICMP echo request from `src` to `dst`, with its checksums.
fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16) -> Vec<u8> {
    let mut p = vec![0u8; 28 + 16];
    p[0] = 0x45;
    let len = p.len() as u16;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 1;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p[..20]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p[20] = 8;
    p[24..26].copy_from_slice(&id.to_be_bytes());
    p[26..28].copy_from_slice(&seq.to_be_bytes());
    p[28..].copy_from_slice(b"vpn-bench-load..");
    let c = checksum(&p[20..]);
    p[22..24].copy_from_slice(&c.to_be_bytes());
    p
}

fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// How a held tunnel behaves.
pub struct Hold {
    /// Until when to hold it, then DISCONNECT.
    pub until: tokio::time::Instant,
    /// Keepalive interval when the gateway gives none.
    pub keepalive: Duration,
    /// An ICMP echo to this address every `echo_every`, if set.
    pub echo: Option<(Ipv4Addr, Duration)>,
    /// At `until`, vanish (close the connection without a DISCONNECT, as
    /// a client that lost its network) instead of saying goodbye.
    pub vanish: bool,
}

impl Tunnel {
    /// Holds the tunnel until `hold.until`: answers DPD, sends keepalives
    /// and echoes (over DTLS when it is up); then says goodbye.
    pub async fn hold(self, hold: &Hold, c: &TunnelCounters) -> Result<(), Failure> {
        use std::sync::atomic::Ordering::Relaxed;
        let Tunnel {
            mut tls,
            mut dtls,
            address,
            keepalive,
            mut buf,
        } = self;
        let keepalive = keepalive
            .map(Duration::from_secs)
            .unwrap_or(hold.keepalive)
            .min(hold.keepalive);
        let mut next_keepalive = tokio::time::Instant::now() + keepalive;
        let mut next_echo = hold
            .echo
            .map(|(_, every)| tokio::time::Instant::now() + every / 2);
        // openconnect probes the path MTU with DPD requests as soon as
        // DTLS is up (the gateway echoes them); one small probe here.
        if let Some(d) = dtls.as_mut() {
            d.send(DPD_REQ, &[0u8; 64]).await?;
        }
        let mut seq = 0u16;
        let mut chunk = vec![0u8; 4096];
        let is_echo_reply = |p: &[u8]| p.len() >= 20 && p[9] == 1 && p.get(20) == Some(&0);
        loop {
            let wake = [Some(hold.until), Some(next_keepalive), next_echo]
                .into_iter()
                .flatten()
                .min()
                .expect("at least one");
            // Complete frames already buffered first.
            while let Some((kind, payload)) = take_frame(&mut buf)? {
                match kind {
                    DPD_REQ => {
                        // openconnect answers with an empty DPD-RESP.
                        tls.write_all(&frame(DPD_RESP, &[]))
                            .await
                            .map_err(|_| Failure::TunnelLost)?;
                        c.dpd_answered.fetch_add(1, Relaxed);
                    }
                    DATA if is_echo_reply(&payload) => {
                        c.echo_received.fetch_add(1, Relaxed);
                    }
                    DISCONNECT | TERMINATE => return Err(Failure::Terminated),
                    _ => {}
                }
            }
            let udp = async {
                match dtls.as_mut() {
                    Some(d) => d.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tls.read(&mut chunk) => match r {
                    Ok(0) | Err(_) => return Err(Failure::TunnelLost),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                r = udp => {
                    let (kind, payload) = r?;
                    c.dtls_received.fetch_add(1, Relaxed);
                    let d = dtls.as_mut().expect("a record came over DTLS");
                    match kind {
                        DPD_REQ => {
                            d.send(DPD_RESP, &[]).await?;
                            c.dpd_answered.fetch_add(1, Relaxed);
                        }
                        DATA if is_echo_reply(&payload) => {
                            c.echo_received.fetch_add(1, Relaxed);
                        }
                        DISCONNECT | TERMINATE => return Err(Failure::Terminated),
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = tokio::time::Instant::now();
                    if now >= hold.until && hold.vanish {
                        return Ok(());
                    }
                    if now >= hold.until {
                        let mut bye = vec![0xb0];
                        bye.extend_from_slice(b"Aborted by caller");
                        let _ = tls.write_all(&frame(DISCONNECT, &bye)).await;
                        let _ = tls.shutdown().await;
                        return Ok(());
                    }
                    if now >= next_keepalive {
                        // Both channels are kept alive, as openconnect does.
                        tls.write_all(&frame(KEEPALIVE, &[])).await.map_err(|_| Failure::TunnelLost)?;
                        if let Some(d) = dtls.as_mut() {
                            d.send(KEEPALIVE, &[]).await?;
                        }
                        c.keepalives.fetch_add(1, Relaxed);
                        next_keepalive = now + keepalive;
                    }
                    if let (Some(at), Some((dst, every))) = (next_echo, hold.echo) && now >= at {
                        seq = seq.wrapping_add(1);
                        let p = echo_request(address, dst, 0x4c44, seq);
                        match dtls.as_mut() {
                            Some(d) => d.send(DATA, &p).await?,
                            None => tls.write_all(&frame(DATA, &p)).await.map_err(|_| Failure::TunnelLost)?,
                        }
                        c.echo_sent.fetch_add(1, Relaxed);
                        next_echo = Some(now + every);
                        if dtls.is_none() {
                            // The echo kept the only channel alive.
                            next_keepalive = now + keepalive;
                        }
                    }
                }
            }
        }
    }
}

/// The next whole CSTP frame in `buf`, removed from it.
fn take_frame(buf: &mut Vec<u8>) -> Result<Option<(u8, Vec<u8>)>, Failure> {
    if buf.len() < 8 {
        return Ok(None);
    }
    if &buf[..4] != b"STF\x01" {
        return Err(Failure::TunnelLost);
    }
    let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let kind = buf[6];
    let payload = buf[8..8 + len].to_vec();
    buf.drain(..8 + len);
    Ok(Some((kind, payload)))
}

/// A login form: where to post and what it asks.
struct Form {
    action: String,
    /// (name, type) of each input.
    inputs: Vec<(String, String, String)>,
    opaque: Option<String>,
    error: bool,
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let end = at + tag[at..].find('"')?;
    Some(&tag[at..end])
}

impl Form {
    fn parse(body: &str) -> Option<Form> {
        let f = body.find("<form")?;
        let tag_end = f + body[f..].find('>')?;
        let action = attr(&body[f..tag_end], "action").unwrap_or("/").to_owned();
        let mut inputs = Vec::new();
        let mut rest = &body[f..];
        while let Some(i) = rest.find("<input") {
            let end = i + rest[i..].find('>')?;
            let tag = &rest[i..end];
            if let Some(name) = attr(tag, "name") {
                inputs.push((
                    name.to_owned(),
                    attr(tag, "type").unwrap_or("text").to_owned(),
                    attr(tag, "value").unwrap_or("").to_owned(),
                ));
            }
            rest = &rest[end..];
        }
        let opaque = body.find("<opaque").and_then(|s| {
            let e = s + body[s..].find("</opaque>")? + "</opaque>".len();
            Some(body[s..e].to_owned())
        });
        let error = body.contains("<error") && !body.contains("<error></error>");
        Some(Form {
            action,
            inputs,
            opaque,
            error,
        })
    }

    /// The auth-reply openconnect would send.
    fn reply(&self, user: &str, password: &str) -> String {
        let mut fields = String::new();
        for (name, kind, value) in &self.inputs {
            let v = match kind.as_str() {
                "password" => password,
                "hidden" => value,
                "text" if name.starts_with("user") || name.starts_with("uname") => user,
                _ => continue,
            };
            fields.push_str(&format!("<{name}>{v}</{name}>"));
        }
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<config-auth client="vpn" type="auth-reply" aggregate-auth-version="2"><version who="vpn">v9.01-3</version><device-id>linux-64</device-id>{}<auth>{fields}</auth></config-auth>"#,
            self.opaque.as_deref().unwrap_or("")
        )
    }
}

/// The little HTTP/1.1 a login needs, keeping the connection and cookies.
#[derive(Default)]
struct Http {
    cookies: Vec<(String, String)>,
    buf: Vec<u8>,
}

struct Response {
    status: u16,
    body: String,
}

impl Response {
    fn session_token(&self) -> Option<String> {
        let s = self.body.find("<session-token>")? + "<session-token>".len();
        let e = s + self.body[s..].find("</session-token>")?;
        Some(self.body[s..e].to_owned())
    }
}

impl Http {
    fn cookie(&self, name: &str) -> Option<String> {
        self.cookies
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    async fn post(
        &mut self,
        tls: &mut TlsStream<TcpStream>,
        host: &str,
        path: &str,
        body: &str,
    ) -> Result<Response, Failure> {
        let cookies: Vec<String> = self
            .cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let cookie = if cookies.is_empty() {
            String::new()
        } else {
            format!("Cookie: {}\r\n", cookies.join("; "))
        };
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Open AnyConnect VPN Agent v9.01-3\r\n\
             Accept: */*\r\nX-Transcend-Version: 1\r\nX-Aggregate-Auth: 1\r\nX-Support-HTTP-Auth: true\r\n\
             {cookie}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes())
            .await
            .map_err(|_| Failure::AuthStatus)?;
        let head = read_head(tls, &mut self.buf).await?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut len = 0usize;
        for line in head.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("set-cookie")
                && let Some((n, v)) = value.split(';').next().and_then(|c| c.split_once('='))
            {
                self.cookies.retain(|(k, _)| k != n);
                if !v.is_empty() {
                    self.cookies.push((n.to_owned(), v.to_owned()));
                }
            }
        }
        let mut chunk = [0u8; 4096];
        while self.buf.len() < len {
            let n = tls
                .read(&mut chunk)
                .await
                .map_err(|_| Failure::AuthStatus)?;
            if n == 0 {
                return Err(if status == 401 {
                    Failure::AuthRefused
                } else {
                    Failure::AuthStatus
                });
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8_lossy(&self.buf[..len]).into_owned();
        self.buf.drain(..len);
        Ok(Response { status, body })
    }
}

/// Reads up to the end of an HTTP head; what follows stays in `buf`.
async fn read_head(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> Result<String, Failure> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(head);
        }
        if buf.len() > 64 * 1024 {
            return Err(Failure::AuthStatus);
        }
        let n = tls
            .read(&mut chunk)
            .await
            .map_err(|_| Failure::AuthStatus)?;
        if n == 0 {
            return Err(Failure::AuthStatus);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_ocservs_two_forms_and_ours() {
        let user_form = r#"<config-auth client="vpn" type="auth-request"><auth id="main"><message>Please enter your username.</message><form method="post" action="/auth"><input type="text" name="username" label="Username:" /></form></auth></config-auth>"#;
        let f = Form::parse(user_form).unwrap();
        assert_eq!(f.action, "/auth");
        assert!(!f.error);
        assert!(
            f.reply("u1", "pw")
                .contains("<auth><username>u1</username></auth>")
        );
        let ours = r#"<config-auth><opaque is-for="sg"><aggauth-handle>abc</aggauth-handle></opaque><auth id="main"><form method="post" action="/"><input type="text" name="username" label="Username:"/><input type="password" name="password" label="Password:"/></form></auth></config-auth>"#;
        let r = Form::parse(ours).unwrap().reply("u1", "pw");
        assert!(r.contains(r#"<opaque is-for="sg"><aggauth-handle>abc</aggauth-handle></opaque>"#));
        assert!(r.contains("<username>u1</username><password>pw</password>"));
    }

    #[test]
    fn frames_round_trip_and_echoes_have_valid_checksums() {
        let mut buf = frame(DPD_REQ, &[]);
        buf.extend(frame(DATA, &[1, 2, 3]));
        buf.extend_from_slice(b"STF\x01\x00");
        assert_eq!(take_frame(&mut buf).unwrap(), Some((DPD_REQ, vec![])));
        assert_eq!(take_frame(&mut buf).unwrap(), Some((DATA, vec![1, 2, 3])));
        assert_eq!(take_frame(&mut buf).unwrap(), None);
        let p = echo_request(
            "198.19.0.2".parse().unwrap(),
            "198.19.0.1".parse().unwrap(),
            1,
            1,
        );
        assert_eq!(checksum(&p[..20]), 0);
        assert_eq!(checksum(&p[20..]), 0);
    }
}
