//! TLS for the HTTP and gRPC listeners (rustls with the ring provider).
//!
//! Each TLS listener owns a [`ReloadableTls`]: the current rustls `ServerConfig` behind an
//! atomic pointer. A new connection's handshake takes whatever configuration is current when
//! it starts, so replacing the certificate (on SIGHUP, or when the files' modification time,
//! size or inode change) affects new connections only; established ones keep the keys they
//! negotiated. A reload that fails keeps the previous configuration and logs why.
//!
//! The accept loop ([`TlsListener`]) hands each TCP connection to its own task for the
//! handshake (with a timeout), so a slow or silent client never holds up the next `accept`.
//! The same listener serves axum (as an `axum::serve::Listener`) and tonic (through
//! [`grpc_incoming`]); both still see the client's address.

mod accept;
mod reload;

pub use accept::{HANDSHAKE_TIMEOUT, TlsConnection, TlsListener, grpc_incoming};
pub use reload::{ReloadableTls, watch_certificates};

use std::path::PathBuf;

/// The PEM files of one TLS listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to. Set: every client must
    /// present a valid certificate (mutual TLS); unset: clients are not asked for one.
    pub client_ca: Option<PathBuf>,
}

/// Application protocols each listener offers in ALPN: the HTTP port speaks both HTTP/2 and
/// HTTP/1.1 (hyper picks by what the client chose); gRPC needs HTTP/2.
pub const HTTP_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
pub const GRPC_ALPN: &[&[u8]] = &[b"h2"];

#[cfg(test)]
mod tests;
