//! The HTTP/1.1 exchange before the tunnel starts.
//!
//! Request heads are parsed by `httparse` (the parser hyper uses). We keep
//! the connection loop ourselves because the CONNECT response must be
//! written byte-exact: openconnect matches `X-CSTP-*` header names
//! case-sensitively and then reads CSTP frames from the same stream, which
//! general-purpose servers do not allow.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const MAX_HEADERS: usize = 64;

/// `[http]`: limits on the HTTP exchange before the tunnel starts.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request head (request line and headers) in bytes. Larger
    /// requests get `431`. Default 16384.
    pub max_header_bytes: usize,
    /// Largest request body in bytes. Larger bodies get `413`. Default 65536.
    pub max_body_bytes: usize,
    /// Seconds a client has to complete the TLS handshake and then each
    /// request (head and body) once it has started sending it — the
    /// slowloris guard. Default 10.
    pub request_timeout_secs: u64,
    /// Seconds an idle keep-alive connection may wait for its next request.
    /// Default 60.
    pub keepalive_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_body_bytes: 64 * 1024,
            request_timeout_secs: 10,
            keepalive_timeout_secs: 60,
        }
    }
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All values of header `name`.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The value of cookie `name` from the `Cookie` header(s).
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.headers_named("cookie")
            .flat_map(|h| h.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// Whether the client asked to close the connection after this request.
    pub fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Why reading a request failed. Each maps to a status (or a silent close).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("connection closed")]
    Closed,
    #[error("timed out waiting for the request")]
    Timeout,
    #[error("request head exceeds {0} bytes")]
    HeadTooLarge(usize),
    #[error("request body of {0} bytes exceeds the limit of {1} bytes")]
    BodyTooLarge(usize, usize),
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("chunked request bodies are not supported; send Content-Length")]
    Chunked,
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ReadError {
    /// The status line to answer with, or `None` to just close.
    pub fn status(&self) -> Option<(u16, &'static str)> {
        match self {
            ReadError::Closed | ReadError::Io(_) => None,
            ReadError::Timeout => Some((408, "Request Timeout")),
            ReadError::HeadTooLarge(_) => Some((431, "Request Header Fields Too Large")),
            ReadError::BodyTooLarge(..) => Some((413, "Content Too Large")),
            ReadError::Malformed(_) => Some((400, "Bad Request")),
            ReadError::Chunked => Some((411, "Length Required")),
        }
    }
}

/// Reads one request from `io`, using and refilling `buf` (bytes after the
/// request stay in `buf` for the next one). The first byte may take up to
/// `idle` to arrive; once it has, the whole request must arrive within
/// `limits.request_timeout_secs`.
pub async fn read_request<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    limits: &Limits,
    idle: Duration,
) -> Result<Request, ReadError> {
    if buf.is_empty() {
        match tokio::time::timeout(idle, io.read_buf(buf)).await {
            Err(_) => return Err(ReadError::Closed),
            Ok(Ok(0)) => return Err(ReadError::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    let deadline = Duration::from_secs(limits.request_timeout_secs);
    match tokio::time::timeout(deadline, read_rest(io, buf, limits)).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::Timeout),
    }
}

async fn read_rest<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Request, ReadError> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                if head_len > limits.max_header_bytes {
                    return Err(ReadError::HeadTooLarge(limits.max_header_bytes));
                }
                let method = req.method.unwrap_or_default().to_owned();
                let path = req.path.unwrap_or_default().to_owned();
                let mut hs = Vec::with_capacity(req.headers.len());
                for h in req.headers.iter() {
                    let v = std::str::from_utf8(h.value).map_err(|_| {
                        ReadError::Malformed(format!("header {} is not UTF-8", h.name))
                    })?;
                    hs.push((h.name.to_owned(), v.trim().to_owned()));
                }
                let mut r = Request {
                    method,
                    path,
                    headers: hs,
                    body: Vec::new(),
                };
                if r.header("transfer-encoding").is_some() {
                    return Err(ReadError::Chunked);
                }
                // Several Content-Length headers must agree (RFC 9112
                // §6.3): a proxy in front might frame by another one.
                let mut len = None;
                for v in r.headers_named("content-length") {
                    let n = v.trim().parse::<usize>().map_err(|_| {
                        ReadError::Malformed(format!(
                            "bad Content-Length '{}'",
                            super::client_string(v)
                        ))
                    })?;
                    if len.is_some_and(|l| l != n) {
                        return Err(ReadError::Malformed(
                            "Content-Length headers that disagree".into(),
                        ));
                    }
                    len = Some(n);
                }
                let len = len.unwrap_or(0);
                if len > limits.max_body_bytes {
                    return Err(ReadError::BodyTooLarge(len, limits.max_body_bytes));
                }
                let _ = buf.split_to(head_len);
                while buf.len() < len {
                    if io.read_buf(buf).await? == 0 {
                        return Err(ReadError::Closed);
                    }
                }
                r.body = buf.split_to(len).to_vec();
                return Ok(r);
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > limits.max_header_bytes {
                    return Err(ReadError::HeadTooLarge(limits.max_header_bytes));
                }
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ReadError::HeadTooLarge(limits.max_header_bytes));
            }
            Err(e) => return Err(ReadError::Malformed(e.to_string())),
        }
        if io.read_buf(buf).await? == 0 {
            return Err(ReadError::Closed);
        }
    }
}

/// A response to write.
pub struct Response {
    pub status: u16,
    pub reason: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
    pub close: bool,
}

impl Response {
    pub fn new(status: u16, reason: &'static str) -> Self {
        Response {
            status,
            reason,
            headers: Vec::new(),
            body: Vec::new(),
            close: false,
        }
    }

    pub fn xml(body: String) -> Self {
        let mut r = Response::new(200, "OK");
        r.headers.push(("Content-Type", "text/xml".into()));
        r.body = body.into_bytes();
        r
    }

    pub fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Self {
        let mut r = Response::new(status, reason);
        r.headers
            .push(("Content-Type", "text/plain; charset=utf-8".into()));
        r.body = body.into().into_bytes();
        r
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn with_body(mut self, body: &str) -> Self {
        self.body = body.as_bytes().to_vec();
        self
    }

    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Serialises the response with `Content-Length` and `X-Transcend-Version`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, self.reason);
        for (n, v) in &self.headers {
            out.push_str(n);
            out.push_str(": ");
            out.push_str(v);
            out.push_str("\r\n");
        }
        out.push_str("X-Transcend-Version: 1\r\n");
        out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        out.push_str(if self.close {
            "Connection: close\r\n\r\n"
        } else {
            "Connection: keep-alive\r\n\r\n"
        });
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    pub async fn write_to<S: AsyncWrite + Unpin>(&self, io: &mut S) -> std::io::Result<()> {
        io.write_all(&self.to_bytes()).await?;
        io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 1024,
            max_body_bytes: 64,
            request_timeout_secs: 1,
            keepalive_timeout_secs: 1,
        }
    }

    async fn read(input: &[u8]) -> (Result<Request, ReadError>, BytesMut) {
        let mut io = input;
        let mut buf = BytesMut::new();
        let r = read_request(&mut io, &mut buf, &limits(), Duration::from_secs(1)).await;
        (r, buf)
    }

    #[tokio::test]
    async fn parses_post_with_body_and_keeps_the_rest() {
        let (r, rest) = read(
            b"POST / HTTP/1.1\r\nHost: x\r\nCookie: a=1; webvpn=abc\r\nContent-Length: 5\r\n\r\nhelloCONNECT",
        )
        .await;
        let r = r.unwrap();
        assert_eq!(r.method, "POST");
        assert_eq!(r.body, b"hello");
        assert_eq!(r.cookie("webvpn"), Some("abc"));
        assert_eq!(r.cookie("a"), Some("1"));
        assert_eq!(r.cookie("b"), None);
        assert_eq!(&rest[..], b"CONNECT");
    }

    #[tokio::test]
    async fn oversized_head_is_431() {
        let mut req = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            req.extend_from_slice(format!("X-Filler-{i}: aaaaaaaaaaaaaaaaaaaa\r\n").as_bytes());
        }
        req.extend_from_slice(b"\r\n");
        let e = read(&req).await.0.unwrap_err();
        assert_eq!(e.status(), Some((431, "Request Header Fields Too Large")));
    }

    #[tokio::test]
    async fn disagreeing_content_lengths_are_400() {
        let e = read(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .0
            .unwrap_err();
        assert_eq!(e.status().unwrap().0, 400, "{e}");
        // Agreeing duplicates are one length.
        let (r, _) =
            read(b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab").await;
        assert_eq!(r.unwrap().body, b"ab");
    }

    #[tokio::test]
    async fn oversized_body_is_413() {
        let e = read(b"POST / HTTP/1.1\r\nContent-Length: 65\r\n\r\n")
            .await
            .0
            .unwrap_err();
        assert_eq!(e.status().unwrap().0, 413);
    }

    #[tokio::test]
    async fn garbage_is_400() {
        let e = read(b"\x16\x03\x01 not http\r\n\r\n").await.0.unwrap_err();
        assert_eq!(e.status().unwrap().0, 400);
    }

    #[tokio::test]
    async fn chunked_is_refused() {
        let e = read(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .0
            .unwrap_err();
        assert_eq!(e.status().unwrap().0, 411);
    }

    #[tokio::test]
    async fn stalled_request_times_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"POST / HTTP/1.1\r\nHost:")
            .await
            .unwrap();
        let mut buf = BytesMut::new();
        let e = read_request(&mut server, &mut buf, &limits(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, ReadError::Timeout), "{e:?}");
        drop(client);
    }

    #[test]
    fn response_bytes() {
        let r = Response::text(401, "Unauthorized", "no").closing();
        let s = String::from_utf8(r.to_bytes()).unwrap();
        assert!(s.starts_with("HTTP/1.1 401 Unauthorized\r\n"));
        assert!(s.contains("Content-Length: 2\r\n"));
        assert!(s.contains("Connection: close\r\n\r\nno"));
    }
}
