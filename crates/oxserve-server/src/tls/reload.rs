//! Loading a listener's TLS configuration from its PEM files, and replacing it while serving.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{Context, anyhow, bail};
use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use super::TlsFiles;

/// One listener's TLS configuration, replaceable while connections use the old one.
pub struct ReloadableTls {
    listener: &'static str,
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<ServerConfig>,
    /// The files as they were when last read, so polling notices when they change.
    last_read: Mutex<FilesState>,
}

impl std::fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableTls")
            .field("listener", &self.listener)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableTls {
    /// Reads the certificate, key and (optional) client CA files. `listener` names the
    /// listener in logs ("HTTP", "gRPC"); `alpn` lists the application protocols it offers.
    pub fn load(listener: &'static str, files: TlsFiles, alpn: &[&[u8]]) -> anyhow::Result<Self> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let state = FilesState::of(&files);
        let config = build_config(&files, &alpn)
            .with_context(|| format!("cannot set up TLS for the {listener} listener"))?;
        Ok(ReloadableTls {
            listener,
            files,
            alpn,
            current: ArcSwap::from_pointee(config),
            last_read: Mutex::new(state),
        })
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configuration a handshake starting now uses.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Reads the files again; if they make a valid configuration it becomes current for new
    /// connections, otherwise the previous one stays and the error says why.
    pub fn reload(&self) -> anyhow::Result<()> {
        // Noted before reading, so a change made while reading is seen by the next poll; and
        // noted even when the files are bad, so a bad file is reported once, not every poll.
        *self.last_read.lock().unwrap_or_else(PoisonError::into_inner) = FilesState::of(&self.files);
        let config = build_config(&self.files, &self.alpn)?;
        self.current.store(Arc::new(config));
        Ok(())
    }

    /// Whether any of the files changed (modification time, size or inode) since last read.
    pub fn files_changed(&self) -> bool {
        FilesState::of(&self.files) != *self.last_read.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reload_and_log(&self, cause: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(
                listener = self.listener,
                cert = %self.files.cert.display(),
                cause,
                "TLS certificate reloaded; new connections use it"
            ),
            Err(e) => tracing::error!(
                listener = self.listener,
                cause,
                error = format!("{e:#}"),
                "TLS certificate reload failed; keeping the previous certificate"
            ),
        }
    }
}

/// Reloads every configuration on SIGHUP and, every `poll` (when set), each one whose files
/// changed. Returns when `stop` resolves.
pub async fn watch_certificates(
    sources: Vec<Arc<ReloadableTls>>,
    poll: Option<Duration>,
    stop: impl Future<Output = ()>,
) {
    if sources.is_empty() {
        return;
    }
    let mut hangup = hangup_signal();
    let mut ticker = poll.filter(|p| !p.is_zero()).map(|period| {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = next_hangup(&mut hangup) => {
                for source in &sources {
                    source.reload_and_log("SIGHUP");
                }
            }
            () = next_tick(&mut ticker) => {
                for source in sources.iter().filter(|s| s.files_changed()) {
                    source.reload_and_log("files changed");
                }
            }
        }
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; certificates reload only when their files change");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

async fn next_hangup(hangup: &mut Hangup) {
    #[cfg(unix)]
    if let Some(signal) = hangup {
        if signal.recv().await.is_some() {
            return;
        }
        *hangup = None;
    }
    #[cfg(not(unix))]
    let _ = hangup;
    std::future::pending::<()>().await;
}

async fn next_tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// What polling compares: per file its modification time, size and inode (a file replaced
/// by rename, as Kubernetes does with mounted secrets, gets a new inode), or `None` while it
/// cannot be read.
#[derive(Debug, PartialEq, Eq)]
struct FilesState(Vec<Option<(Option<SystemTime>, u64, u64)>>);

impl FilesState {
    fn of(files: &TlsFiles) -> Self {
        let paths = [Some(&files.cert), Some(&files.key), files.client_ca.as_ref()];
        FilesState(
            paths
                .into_iter()
                .flatten()
                .map(|path| {
                    std::fs::metadata(path)
                        .ok()
                        .map(|m| (m.modified().ok(), m.len(), inode(&m)))
                })
                .collect(),
        )
    }
}

#[cfg(unix)]
fn inode(metadata: &std::fs::Metadata) -> u64 {
    std::os::unix::fs::MetadataExt::ino(metadata)
}

#[cfg(not(unix))]
fn inode(_: &std::fs::Metadata) -> u64 {
    0
}

fn build_config(files: &TlsFiles, alpn: &[Vec<u8>]) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certificates(&files.cert, "certificate")?;
    let key = read_private_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certificates(path, "client CA certificate")? {
                roots
                    .add(cert)
                    .map_err(|e| anyhow!("invalid client CA certificate in {}: {e}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| anyhow!("cannot verify clients against {}: {e}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        anyhow!(
            "the private key in {} cannot serve the certificate in {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

fn read_file(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the TLS {what} file {}", path.display()))
}

fn read_certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the TLS {what} file {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "the TLS {what} file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(certs)
}

fn read_private_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_file(path, "private key")?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow!(
            "the TLS private key file {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            path.display()
        ),
        e => anyhow!(
            "the TLS private key file {} is not valid PEM: {e}",
            path.display()
        ),
    })
}
