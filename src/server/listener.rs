//! TLS accept loop: rustls (TLS 1.2 and 1.3 only), HTTP/1.1 and h2,
//! handshake/header/idle timeouts, a connection cap, certificate reload on
//! SIGHUP without dropping connections, graceful shutdown.

use super::PeerAddr;
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("{0}: no certificate found")]
    NoCert(PathBuf),
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}: the certificate's public key is not the HSM's TLS key (tokenvault-tls)")]
    Mismatch(PathBuf),
}

/// Where the certificate's private key is.
#[derive(Debug, Clone)]
pub enum TlsKeySource {
    /// A PEM file (read at start and on SIGHUP, zeroized after parsing).
    File(PathBuf),
    /// The PKCS#11 token: every handshake signature is made there.
    Hsm(Arc<crate::keys::pkcs11::tls::HsmTlsKey>),
}

/// One certificate with a key that is not a rustls-loadable private key.
#[derive(Debug)]
struct FixedCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for FixedCert {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

pub fn load_tls(cert: &Path, key: &TlsKeySource) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_pem = std::fs::read(cert).map_err(|e| TlsError::Read(cert.into(), e))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read(cert.into(), e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.into()));
    }
    let builder =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth();
    let mut cfg = match key {
        TlsKeySource::File(key) => {
            let key_pem = zeroize::Zeroizing::new(
                std::fs::read(key).map_err(|e| TlsError::Read(key.clone(), e))?,
            );
            let key_der: PrivateKeyDer<'static> =
                rustls_pemfile::private_key(&mut key_pem.as_slice())
                    .map_err(|e| TlsError::Read(key.clone(), e))?
                    .ok_or_else(|| TlsError::NoKey(key.clone()))?;
            builder.with_single_cert(certs, key_der)?
        }
        TlsKeySource::Hsm(k) => {
            let signing = crate::keys::pkcs11::tls::HsmSigningKey(k.clone());
            let certified = rustls::sign::CertifiedKey::new(certs, Arc::new(signing));
            certified
                .keys_match()
                .map_err(|_| TlsError::Mismatch(cert.into()))?;
            builder.with_cert_resolver(Arc::new(FixedCert(Arc::new(certified))))
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub cert: PathBuf,
    pub key: TlsKeySource,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves until `shutdown` resolves, then drains connections (at most 10 s).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let current = Arc::new(RwLock::new(tls));
    spawn_reloader(current.clone(), opts.clone());
    let limit = Arc::new(tokio::sync::Semaphore::new(opts.max_connections));
    let graceful = GracefulShutdown::new();
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
        .max_concurrent_streams(256);
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
        let _ = tcp.set_nodelay(true);
        let cfg = current.read().map(|g| g.clone());
        let Ok(cfg) = cfg else { continue };
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let opts2 = opts.clone();
        tokio::spawn(async move {
            let _permit = permit;
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
            let io = TokioIo::new(IdleTimeout::new(tls, opts2.idle_timeout));
            let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let mut req = req.map(Body::new);
                req.extensions_mut().insert(PeerAddr(peer));
                app.clone().oneshot(req)
            });
            let conn = builder.serve_connection(io, svc).into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer = %peer, error = %e, "connection ended with error");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: draining connections");
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after 10 s; closing");
    }
}

fn spawn_reloader(current: Arc<RwLock<Arc<ServerConfig>>>, opts: ServeOptions) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; certificate reload disabled");
            return;
        };
        while hup.recv().await.is_some() {
            match load_tls(&opts.cert, &opts.key) {
                Ok(cfg) => {
                    if let Ok(mut g) = current.write() {
                        *g = cfg;
                    }
                    tracing::info!(cert = %opts.cert.display(), "TLS certificate reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
                }
            }
        }
    });
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
