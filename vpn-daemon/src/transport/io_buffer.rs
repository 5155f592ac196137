//! Buffers under TLS that exist only while a connection is busy.
//!
//! rustls reads 4 KiB per call and writes a record per frame; under load a
//! 64 KiB buffer each way saves most system calls and TCP segments (the
//! tunnel benchmark measured it). But most of 10,000 sessions are idle
//! most of the time, and tokio's `BufStream` keeps both buffers for the
//! connection's life: 128 KiB allocated and several KiB resident per idle
//! session. [`AdaptiveStream`] takes them when traffic needs them and
//! lets them go when it stops:
//!
//! - Reads go straight into rustls's buffer while it is not filled; a read
//!   that fills it (more is waiting) switches to a 64 KiB buffer, which is
//!   freed once drained after a fill smaller than [`SMALL`].
//! - Writes gather in a buffer that grows as needed up to 64 KiB and reach
//!   the socket on flush; a flush of fewer than [`SMALL`] bytes frees it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// At most this much is read, or gathered for writing, per system call.
pub const CAPACITY: usize = 64 * 1024;
/// A fill or flush below this is "not busy": the buffer is freed after it.
pub const SMALL: usize = 4 * 1024;

pub struct AdaptiveStream<T> {
    inner: T,
    /// Read but not yet taken: `rbuf[rpos..]`. Capacity 0 while not busy.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Bytes of the last fill of `rbuf`.
    last_fill: usize,
    /// Gathered, not yet written: `wbuf[wpos..]`.
    wbuf: Vec<u8>,
    wpos: usize,
}

impl<T> AdaptiveStream<T> {
    pub fn new(inner: T) -> Self {
        AdaptiveStream {
            inner,
            rbuf: Vec::new(),
            rpos: 0,
            last_fill: 0,
            wbuf: Vec::new(),
            wpos: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes of buffer held now, both ways (for tests and stats).
    pub fn buffered_capacity(&self) -> usize {
        self.rbuf.capacity() + self.wbuf.capacity()
    }
}

impl<T: AsyncWrite + Unpin> AdaptiveStream<T> {
    /// Writes out everything gathered; frees the buffer after a small
    /// flush.
    fn poll_flush_buf(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let gathered = self.wbuf.len();
        while self.wpos < self.wbuf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.wbuf[self.wpos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wpos += n;
        }
        self.wpos = 0;
        if gathered < SMALL {
            self.wbuf = Vec::new();
        } else {
            self.wbuf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AdaptiveStream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.rpos == me.rbuf.len() {
            if me.rbuf.capacity() == 0 {
                // Not busy: straight into the caller's buffer.
                let before = buf.filled().len();
                ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
                let n = buf.filled().len() - before;
                if buf.remaining() == 0 && n >= SMALL {
                    me.rbuf = Vec::with_capacity(CAPACITY);
                }
                return Poll::Ready(Ok(()));
            }
            me.rbuf.clear();
            me.rpos = 0;
            let mut rb = ReadBuf::uninit(me.rbuf.spare_capacity_mut());
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            // SAFETY: `poll_read` initialised the first `n` bytes of the
            // spare capacity (ReadBuf tracks it).
            unsafe { me.rbuf.set_len(n) };
            me.last_fill = n;
        }
        let n = buf.remaining().min(me.rbuf.len() - me.rpos);
        buf.put_slice(&me.rbuf[me.rpos..me.rpos + n]);
        me.rpos += n;
        if me.rpos == me.rbuf.len() && me.last_fill < SMALL {
            me.rbuf = Vec::new();
            me.rpos = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AdaptiveStream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.wbuf.len() + data.len() > CAPACITY {
            ready!(me.poll_flush_buf(cx))?;
        }
        if data.len() >= CAPACITY {
            return Pin::new(&mut me.inner).poll_write(cx, data);
        }
        if me.wbuf.capacity() == 0 && data.len() >= SMALL {
            // Busy: take the whole buffer at once rather than growing.
            me.wbuf.reserve_exact(CAPACITY);
        }
        me.wbuf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_flush_buf(cx))?;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_flush_buf(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn buffers_come_with_bulk_traffic_and_go_when_it_stops() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut s = AdaptiveStream::new(a);
        let mut peer = b;
        // Idle: a small exchange holds no buffer afterwards.
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        peer.write_all(b"world").await.unwrap();
        let mut r = [0u8; 4096];
        assert_eq!(s.read(&mut r).await.unwrap(), 5);
        assert_eq!(s.buffered_capacity(), 0);

        // Bulk: 200 KiB each way, in rustls-sized pieces; every byte
        // arrives in order and the buffers are taken.
        let data: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).await.unwrap();
        let mut back = Vec::new();
        while back.len() < data.len() {
            let n = s.read(&mut r).await.unwrap();
            back.extend_from_slice(&r[..n]);
            if back.len() == 8192 {
                assert!(s.buffered_capacity() >= CAPACITY, "reading in bulk");
            }
        }
        assert_eq!(back, data);
        for chunk in data.chunks(1400) {
            s.write_all(chunk).await.unwrap();
        }
        assert!(s.buffered_capacity() >= CAPACITY, "gathering in bulk");
        s.flush().await.unwrap();
        let mut out = vec![0u8; data.len()];
        peer.read_exact(&mut out).await.unwrap();
        assert_eq!(out, data);

        // Quiet again: one small message each way frees both.
        s.write_all(b"ping").await.unwrap();
        s.flush().await.unwrap();
        peer.write_all(b"pong").await.unwrap();
        assert_eq!(s.read(&mut r).await.unwrap(), 4);
        assert_eq!(s.buffered_capacity(), 0);
    }
}
