//! Connections as a bounded resource, for both listeners.
//!
//! Every accepted connection takes a permit from its listener's cap; beyond the cap a new
//! connection is closed at once (and counted), so idle sockets can never use up the process's
//! file descriptors and starve health checks, metrics and the database. A connection that sends
//! nothing within the handshake timeout, or then reads nothing for the idle timeout, is closed
//! (HTTP/2 keepalive pings count as traffic, so a live client is never cut off). Accept errors
//! (such as "too many open files") back off instead of spinning.
//!
//! At start, [`raise_file_limit`] raises the soft limit on open files to the hard limit and
//! reports it, so the caps can be checked against it.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

use crate::ops::metrics::Metrics;

/// The limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Which listener, for metrics and logs: `grpc` or `ops`.
    pub listener: &'static str,
    /// Open connections at most.
    pub max_connections: usize,
    /// A new connection must send its first bytes within this.
    pub handshake_timeout: Duration,
    /// An established connection that reads nothing for this long is closed.
    pub idle_timeout: Duration,
}

/// Open files the daemon keeps for itself beyond its connection caps: the database and its
/// WAL, the lock and key files, the upstream connection pool, logs.
pub const RESERVED_FILES: u64 = 128;

/// Raises the soft limit on open files to the hard limit; returns the limit now in force.
pub fn raise_file_limit() -> io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Accepts connections on `listener` within `limits` until `stop`, handing each admitted one to
/// the returned channel (for the gRPC server, or the ops server's loop).
pub fn accept(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> (
    mpsc::Receiver<io::Result<Guarded>>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (sender, receiver) = mpsc::channel(64);
    let task = async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut backoff = Duration::ZERO;
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                _ = sender.closed() => return,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => {
                    backoff = Duration::ZERO;
                    stream
                }
                Err(error) => {
                    // Usually "too many open files": wait for descriptors to free up rather
                    // than spin on the error.
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    tracing::warn!(listener = limits.listener, %error, backoff_ms = backoff.as_millis() as u64,
                        "accept failed; backing off");
                    metrics.connection_event(limits.listener, "accept_error");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                // Over the cap: close at once, so the socket's descriptor is freed.
                metrics.connection_event(limits.listener, "refused_over_cap");
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let guarded = Guarded::new(stream, permit, limits, Arc::clone(&metrics));
            if sender.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    };
    (receiver, task)
}

/// An accepted connection holding its slot, with the handshake and idle timeouts.
#[derive(Debug)]
pub struct Guarded {
    stream: TcpStream,
    /// The listener's slot, released when the connection is dropped.
    _permit: OwnedSemaphorePermit,
    /// When the connection is closed unless it reads something first.
    deadline: Pin<Box<Sleep>>,
    /// Whether any byte has been read (after which the idle timeout applies).
    greeted: bool,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
}

impl Guarded {
    fn new(
        stream: TcpStream,
        permit: OwnedSemaphorePermit,
        limits: ConnectionLimits,
        metrics: Arc<Metrics>,
    ) -> Guarded {
        Guarded {
            stream,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.handshake_timeout)),
            greeted: false,
            limits,
            metrics,
        }
    }
}

impl Guarded {
    /// The TCP stream underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.greeted = true;
                    let next = Instant::now() + this.limits.idle_timeout;
                    // Moving the timer on every read would cost a timer update per read; a
                    // second of slack is plenty for a timeout of minutes.
                    if next > this.deadline.deadline() + Duration::from_secs(1) {
                        this.deadline.as_mut().reset(next);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let reason = if this.greeted {
                        "closed_idle"
                    } else {
                        "closed_handshake_timeout"
                    };
                    this.metrics.connection_event(this.limits.listener, reason);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection closed: nothing received in time",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Serves HTTP/1.1 with `service` on the connections `accepted` delivers, until `stop`: the one
/// accept-and-serve loop of the plain HTTP listeners (the ops endpoints and the fake
/// upstream). hyper is given a timer, so `header_timeout` applies to every request's headers.
pub async fn serve_http1<S>(
    mut accepted: mpsc::Receiver<io::Result<Guarded>>,
    service: S,
    header_timeout: Duration,
    stop: CancellationToken,
) where
    S: hyper::service::HttpService<hyper::body::Incoming> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            next = accepted.recv() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                // The accept loop ended: only at shutdown.
                None => return stop.cancelled().await,
            },
        };
        let service = service.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = connection => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}
