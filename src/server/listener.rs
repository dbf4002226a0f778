//! TLS accept loop: rustls (TLS 1.2 and 1.3 only, the serving state from
//! `crate::tls`), HTTP/1.1 and h2, handshake/header/idle timeouts, a
//! connection cap, graceful shutdown.

use super::PeerAddr;
use crate::tls::{TlsKeySource, TlsState, ACME_TLS_ALPN};
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

#[derive(Clone)]
pub struct ServeOptions {
    pub cert: PathBuf,
    pub key: Option<TlsKeySource>,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/2 PINGs and other control frames do not count as requests).
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_h2_streams: u32,
    /// Per-address connection cap (and the counters of what it refused).
    pub shield: Arc<super::shield::Shield>,
    /// Re-read `cert`/`key` on SIGHUP (files mode; ACME swaps certificates itself).
    pub reload_on_hup: bool,
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds since the connection's start.
    last_ms: std::sync::atomic::AtomicU64,
    start: std::time::Instant,
    /// A response carried a secret: the connection's idle time becomes
    /// [`SECRET_IDLE`].
    secret: std::sync::atomic::AtomicBool,
}

/// How long a connection that carried a secret may stay quiet (no request
/// in flight) before the server closes it: short, so an idle client's
/// connection buffers do not hold the secret; long enough that a client
/// sending request after request keeps its connection (and its TLS
/// session) instead of a handshake per request.
pub const SECRET_IDLE: Duration = Duration::from_secs(1);

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    /// When the connection becomes idle if nothing else happens (None:
    /// a request is in flight): `idle` after the last request, or
    /// [`SECRET_IDLE`] once an answer carried a secret.
    fn idle_at(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let idle = if self.secret.load(Ordering::Acquire) {
            idle.min(SECRET_IDLE)
        } else {
            idle
        };
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(Instant::from_std(self.start + last + idle))
    }
}

/// Counts a request in flight until dropped (the service future ends).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(a: &Arc<Activity>) -> Self {
        a.in_flight.fetch_add(1, Ordering::AcqRel);
        a.touch();
        InFlight(a.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves until `shutdown` resolves, then drains connections (at most 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<TlsState>,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    if let (true, Some(key)) = (opts.reload_on_hup, opts.key.clone()) {
        crate::tls::spawn_reloader(tls.clone(), opts.cert.clone(), key);
    }
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    // Connection tasks hold a sender each: when all are gone, all are done.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(opts.max_h2_streams);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let peer = crate::netaddr::canonical_socket(peer);
        // One address may not hold every slot: over its cap, the
        // connection is closed before the handshake.
        let Some(slot) = opts.shield.connection(peer.ip()) else {
            tracing::debug!(peer = %peer, "connection refused: per-address cap");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Some(cfg) = tls.config() else { continue };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let app = app.clone();
        let builder = builder.clone();
        let opts2 = opts.clone();
        let done = done_tx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _slot = slot;
            let _done = done;
            let tls =
                match tokio::time::timeout(opts2.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %peer, "TLS handshake timed out");
                        return;
                    }
                };
            if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the handshake was the answer.
                tracing::info!(peer = %peer, "answered a TLS-ALPN-01 validation handshake");
                return;
            }
            let activity = Arc::new(Activity {
                in_flight: std::sync::atomic::AtomicUsize::new(0),
                last_ms: std::sync::atomic::AtomicU64::new(0),
                start: std::time::Instant::now(),
                secret: std::sync::atomic::AtomicBool::new(false),
            });
            let act = activity.clone();
            // Below hyper, a connection with no bytes in either direction
            // for the idle time fails (a client that stops reading).
            let io = TokioIo::new(IdleTimeout::new(tls, opts2.idle_timeout));
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let guard = InFlight::new(&act);
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut()
                    .insert(super::auth::Arrived(std::time::Instant::now()));
                let fut = app.clone().oneshot(req);
                async move {
                    let r = fut.await;
                    if let Ok(resp) = &r {
                        if resp.extensions().get::<super::CarriedSecret>().is_some() {
                            guard.0.secret.store(true, Ordering::Release);
                        }
                    }
                    drop(guard);
                    r
                }
            });
            let conn = builder.serve_connection(io, svc).into_owned();
            tokio::pin!(conn);
            let mut closing = false;
            loop {
                // Idle means no request in flight, whatever control frames
                // (HTTP/2 PINGs, SETTINGS, WINDOW_UPDATE) keep arriving.
                let idle_at = activity
                    .idle_at(opts2.idle_timeout)
                    .unwrap_or_else(|| Instant::now() + opts2.idle_timeout);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(peer = %peer, error = %e, "connection ended with error");
                        }
                        break;
                    }
                    _ = stop.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = tokio::time::sleep_until(idle_at), if !closing => {
                        if activity
                            .idle_at(opts2.idle_timeout)
                            .is_some_and(|t| t <= Instant::now())
                        {
                            // Quiet for its idle time (a short one after a
                            // secret): closed gracefully, so an HTTP/2
                            // client's new stream after the GOAWAY is
                            // refused unprocessed, never run and lost.
                            opts2.shield.count(super::shield::Event::IdleClosed);
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    drop(done_tx);
    tracing::info!("shutting down: draining connections");
    let _ = stop_tx.send(true);
    if tokio::time::timeout(Duration::from_secs(10), done_rx.recv())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing");
    }
}

/// Closes a connection with no traffic in either direction for `idle`.
struct IdleTimeout<S> {
    inner: S,
    idle: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl<S> IdleTimeout<S> {
    fn new(inner: S, idle: Duration) -> Self {
        IdleTimeout {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
        }
    }
    fn touch(&mut self) {
        self.sleep.as_mut().reset(Instant::now() + self.idle);
    }
    /// Traffic resets the clock; waiting past it fails the connection.
    fn after<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.touch();
                Poll::Ready(r)
            }
            Poll::Pending if self.sleep.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for IdleTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.after(cx, r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for IdleTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.after(cx, r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
