//! Accepting TLS connections without letting handshakes hold up the accept loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::ReloadableTls;

/// How long a client has from connecting to finishing the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the kernel's backlog until
/// one finishes, so a flood of idle connections costs at most this many tasks.
const MAX_PENDING_HANDSHAKES: usize = 1024;
/// The first byte of every TLS connection (a handshake record).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Sent to a client that speaks plain HTTP to a TLS port, so it sees why instead of a reset.
const PLAIN_HTTP_REPLY: &[u8] = b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n\
Connection: close\r\nContent-Length: 44\r\n\r\nThis port speaks TLS: connect with https://\n";

type Accepted = (TlsStream<TcpStream>, SocketAddr);

/// A TCP listener whose connections come out after a TLS handshake. Each handshake runs in
/// its own task with a timeout; `accept` returns whichever finishes first.
pub struct TlsListener {
    tcp: TcpListener,
    tls: Arc<ReloadableTls>,
    handshakes: JoinSet<Option<Accepted>>,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("tcp", &self.tcp)
            .field("listener", &self.tls.listener())
            .field("pending_handshakes", &self.handshakes.len())
            .finish()
    }
}

impl TlsListener {
    pub fn new(tcp: TcpListener, tls: Arc<ReloadableTls>) -> Self {
        Self::with_handshake_timeout(tcp, tls, HANDSHAKE_TIMEOUT)
    }

    pub fn with_handshake_timeout(tcp: TcpListener, tls: Arc<ReloadableTls>, timeout: Duration) -> Self {
        TlsListener {
            tcp,
            tls,
            handshakes: JoinSet::new(),
            handshake_timeout: timeout,
        }
    }

    /// The next connection whose handshake succeeded. Failed handshakes are logged at debug
    /// level and skipped. Cancel-safe: handshakes in progress live on in their tasks.
    pub async fn accept_tls(&mut self) -> Accepted {
        loop {
            tokio::select! {
                // Finished handshakes first: those clients are waiting for an answer.
                biased;
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(accepted)) = done {
                        return accepted;
                    }
                }
                accepted = self.tcp.accept(), if self.handshakes.len() < MAX_PENDING_HANDSHAKES => {
                    match accepted {
                        Ok((tcp, peer)) => {
                            // Small responses must not wait for Nagle's algorithm.
                            let _ = tcp.set_nodelay(true);
                            let acceptor = TlsAcceptor::from(self.tls.current());
                            let listener = self.tls.listener();
                            self.handshakes.spawn(handshake(acceptor, tcp, peer, listener, self.handshake_timeout));
                        }
                        Err(e) => accept_error(e).await,
                    }
                }
            }
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.accept_tls().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    listener: &'static str,
    timeout: Duration,
) -> Option<Accepted> {
    let attempt = async move {
        let mut first = [0u8; 1];
        if tcp.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE_RECORD {
            if first[0].is_ascii_uppercase() {
                answer_plain_http(tcp).await;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the client spoke plain HTTP",
                ));
            }
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the client did not start with a TLS handshake",
            ));
        }
        acceptor.accept(tcp).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => Some((stream, peer)),
        Ok(Err(e)) => {
            tracing::debug!(listener, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener, %peer, timeout_s = timeout.as_secs_f64(), "TLS handshake timed out");
            None
        }
    }
}

/// Answers 400 and closes. What the client sent is read (up to a bound) before the socket
/// closes, because closing with unread data resets the connection and the client would lose
/// the answer.
async fn answer_plain_http(mut tcp: TcpStream) {
    if tcp.write_all(PLAIN_HTTP_REPLY).await.is_ok() {
        let _ = tcp.shutdown().await;
        let drain = async {
            let mut discard = [0u8; 4096];
            let mut left = 64 * 1024usize;
            while left > 0 {
                match tcp.read(&mut discard).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

/// As axum's own listener: errors of one connection are dropped; others (out of file
/// descriptors) are logged and retried after a pause instead of spinning.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A TLS connection handed to tonic, which reads the peer address from it so that
/// `request.remote_addr()` works as over plain TCP.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl TlsConnection {
    fn new(stream: TlsStream<TcpStream>, peer: SocketAddr) -> Self {
        let info = TcpConnectInfo {
            local_addr: stream.get_ref().0.local_addr().ok(),
            remote_addr: Some(peer),
        };
        TlsConnection { stream, info }
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The connections of `listener` as the stream `tonic`'s `serve_with_incoming` takes.
pub fn grpc_incoming(
    listener: TlsListener,
) -> impl Stream<Item = io::Result<TlsConnection>> + Send + 'static {
    futures::stream::unfold(listener, |mut listener| async move {
        let (stream, peer) = listener.accept_tls().await;
        Some((Ok(TlsConnection::new(stream, peer)), listener))
    })
}
