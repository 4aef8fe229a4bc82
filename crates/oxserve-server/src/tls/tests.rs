//! The TLS listener against a real rustls client, with certificates made by rcgen.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::{GRPC_ALPN, HTTP_ALPN, ReloadableTls, TlsFiles, TlsListener, watch_certificates};

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A leaf certificate (PEM) and its key (PEM) signed by `ca`.
fn leaf(ca: &Ca, serial: u64, client: bool) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.serial_number = Some(SerialNumber::from(serial));
    if client {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes by rename, as a deployment would, so a poll never sees half a file.
fn write(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Pki {
    dir: tempfile::TempDir,
    ca: Ca,
}

impl Pki {
    fn new() -> Self {
        Pki {
            dir: tempfile::tempdir().unwrap(),
            ca: ca("test CA"),
        }
    }

    /// Writes a server certificate with this serial to server.crt/server.key.
    fn server_files(&self, serial: u64) -> TlsFiles {
        let (cert, key) = leaf(&self.ca, serial, false);
        let files = self.files();
        write(&files.cert, &cert);
        write(&files.key, &key);
        files
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.dir.path().join("server.crt"),
            key: self.dir.path().join("server.key"),
            client_ca: None,
        }
    }
}

fn connector(ca: &Ca, client_cert: Option<(String, String)>, alpn: &[&[u8]]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(config))
}

/// A TLS echo server on an ephemeral port; returns its address.
async fn echo_server(tls: Arc<ReloadableTls>, handshake_timeout: Duration) -> SocketAddr {
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut listener = TlsListener::with_handshake_timeout(tcp, tls, handshake_timeout);
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept_tls().await;
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = stream.read(&mut buf).await {
                    if stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn connect(connector: &TlsConnector, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// Sends a line and reads it back: proves the connection carries data both ways.
async fn echo(stream: &mut TlsStream<TcpStream>, text: &str) -> std::io::Result<String> {
    stream.write_all(text.as_bytes()).await?;
    let mut buf = vec![0u8; text.len()];
    stream.read_exact(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

fn der_of(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test]
async fn serves_the_certificate_with_the_listeners_alpn() {
    let pki = Pki::new();
    let files = pki.server_files(1);
    let expected = der_of(&std::fs::read_to_string(&files.cert).unwrap());
    let http = echo_server(
        Arc::new(ReloadableTls::load("HTTP", files.clone(), HTTP_ALPN).unwrap()),
        Duration::from_secs(10),
    )
    .await;
    let grpc = echo_server(
        Arc::new(ReloadableTls::load("gRPC", files, GRPC_ALPN).unwrap()),
        Duration::from_secs(10),
    )
    .await;

    for (alpn, want) in [(&b"h2"[..], &b"h2"[..]), (b"http/1.1", b"http/1.1")] {
        let mut stream = connect(&connector(&pki.ca, None, &[alpn]), http).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(want));
        assert_eq!(presented(&stream), expected);
        assert_eq!(echo(&mut stream, "ping").await.unwrap(), "ping");
    }
    let stream = connect(&connector(&pki.ca, None, &[b"h2", b"http/1.1"]), grpc)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // gRPC needs HTTP/2: a client offering only HTTP/1.1 is refused.
    assert!(
        connect(&connector(&pki.ca, None, &[b"http/1.1"]), grpc)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn reload_changes_new_connections_only_and_keeps_the_old_certificate_on_error() {
    let pki = Pki::new();
    let files = pki.server_files(1);
    let first = der_of(&std::fs::read_to_string(&files.cert).unwrap());
    let tls = Arc::new(ReloadableTls::load("HTTP", files.clone(), HTTP_ALPN).unwrap());
    let addr = echo_server(tls.clone(), Duration::from_secs(10)).await;
    let client = connector(&pki.ca, None, &[b"h2"]);
    let mut before = connect(&client, addr).await.unwrap();
    assert_eq!(presented(&before), first);
    assert!(!tls.files_changed());

    pki.server_files(2);
    let second = der_of(&std::fs::read_to_string(&files.cert).unwrap());
    assert!(tls.files_changed());
    tls.reload().unwrap();
    assert!(!tls.files_changed());
    let mut after = connect(&client, addr).await.unwrap();
    assert_eq!(presented(&after), second);
    // The connection opened before the reload still works, with the old certificate.
    assert_eq!(echo(&mut before, "still here").await.unwrap(), "still here");
    assert_eq!(echo(&mut after, "new").await.unwrap(), "new");

    write(&files.cert, "not a certificate\n");
    let error = format!("{:#}", tls.reload().unwrap_err());
    assert!(error.contains("holds no PEM certificate"), "{error}");
    assert!(
        !tls.files_changed(),
        "a bad file is reported once, not on every poll"
    );
    let mut third = connect(&client, addr).await.unwrap();
    assert_eq!(presented(&third), second);
    assert_eq!(echo(&mut third, "x").await.unwrap(), "x");
}

#[tokio::test]
async fn polling_picks_up_replaced_files() {
    let pki = Pki::new();
    let files = pki.server_files(1);
    let tls = Arc::new(ReloadableTls::load("HTTP", files.clone(), HTTP_ALPN).unwrap());
    let addr = echo_server(tls.clone(), Duration::from_secs(10)).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(watch_certificates(
        vec![tls],
        Some(Duration::from_millis(50)),
        async move {
            let _ = stopped.await;
        },
    ));

    pki.server_files(7);
    let replaced = der_of(&std::fs::read_to_string(&files.cert).unwrap());
    let client = connector(&pki.ca, None, &[b"h2"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stream = connect(&client, addr).await.unwrap();
        if presented(&stream) == replaced {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(()).unwrap();
    watcher.await.unwrap();
}

#[tokio::test]
async fn silent_and_plain_clients_do_not_hold_up_others() {
    let pki = Pki::new();
    let tls = Arc::new(ReloadableTls::load("HTTP", pki.server_files(1), HTTP_ALPN).unwrap());
    let addr = echo_server(tls, Duration::from_millis(500)).await;

    // A connection that never sends a ClientHello...
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // ...and one that speaks plain HTTP, which gets a readable 400.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    plain.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 400 Bad Request"), "{answer}");
    assert!(answer.contains("https://"), "{answer}");

    // A real client still gets through at once, while the silent one is pending.
    let client = connector(&pki.ca, None, &[b"h2"]);
    let mut stream = tokio::time::timeout(Duration::from_millis(400), connect(&client, addr))
        .await
        .expect("a pending handshake held up the accept loop")
        .unwrap();
    assert_eq!(echo(&mut stream, "ok").await.unwrap(), "ok");

    // The silent connection is closed when its handshake time is up.
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
}

#[tokio::test]
async fn client_certificates_are_required_with_a_client_ca() {
    let pki = Pki::new();
    let client_ca = ca("client CA");
    let client_ca_path = pki.dir.path().join("client-ca.crt");
    write(&client_ca_path, &client_ca.pem());
    let files = TlsFiles {
        client_ca: Some(client_ca_path),
        ..pki.server_files(1)
    };
    let tls = Arc::new(ReloadableTls::load("HTTP", files, HTTP_ALPN).unwrap());
    let addr = echo_server(tls, Duration::from_secs(10)).await;

    // With TLS 1.3 the client learns of the refusal on its first read.
    let refused = |result: std::io::Result<TlsStream<TcpStream>>| async move {
        match result {
            Err(_) => true,
            Ok(mut stream) => echo(&mut stream, "hello").await.is_err(),
        }
    };
    let anonymous = connect(&connector(&pki.ca, None, &[b"h2"]), addr).await;
    assert!(
        refused(anonymous).await,
        "a client without a certificate was served"
    );
    let stranger = leaf(&ca("another CA"), 5, true);
    let foreign = connect(&connector(&pki.ca, Some(stranger), &[b"h2"]), addr).await;
    assert!(
        refused(foreign).await,
        "a certificate from another CA was accepted"
    );

    let mut trusted = connect(
        &connector(&pki.ca, Some(leaf(&client_ca, 9, true)), &[b"h2"]),
        addr,
    )
    .await
    .unwrap();
    assert_eq!(echo(&mut trusted, "hello").await.unwrap(), "hello");
}

#[test]
fn unusable_files_are_clear_errors() {
    let pki = Pki::new();
    let good = pki.server_files(1);
    let dir = pki.dir.path();
    let load = |files: TlsFiles| format!("{:#}", ReloadableTls::load("HTTP", files, HTTP_ALPN).unwrap_err());

    let missing = load(TlsFiles {
        cert: dir.join("missing.crt"),
        ..good.clone()
    });
    assert!(missing.contains("cannot read the TLS certificate file") && missing.contains("missing.crt"));

    write(&dir.join("garbage.crt"), "hello\n");
    let garbage = load(TlsFiles {
        cert: dir.join("garbage.crt"),
        ..good.clone()
    });
    assert!(garbage.contains("holds no PEM certificate"), "{garbage}");

    write(
        &dir.join("broken.crt"),
        "-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n",
    );
    let broken = load(TlsFiles {
        cert: dir.join("broken.crt"),
        ..good.clone()
    });
    assert!(broken.contains("not valid PEM"), "{broken}");

    let key_as_cert = load(TlsFiles {
        key: good.cert.clone(),
        ..good.clone()
    });
    assert!(key_as_cert.contains("holds no PEM private key"), "{key_as_cert}");

    let (_, other_key) = leaf(&pki.ca, 2, false);
    write(&dir.join("other.key"), &other_key);
    let mismatch = load(TlsFiles {
        key: dir.join("other.key"),
        ..good.clone()
    });
    assert!(mismatch.contains("cannot serve the certificate"), "{mismatch}");

    let bad_ca = load(TlsFiles {
        client_ca: Some(dir.join("garbage.crt")),
        ..good.clone()
    });
    assert!(bad_ca.contains("client CA certificate"), "{bad_ca}");
    assert!(bad_ca.contains("HTTP listener"), "{bad_ca}");
}

#[tokio::test]
async fn handlers_see_the_clients_address() {
    use axum::extract::ConnectInfo;
    use futures::StreamExt;
    use tonic::transport::server::Connected;

    let pki = Pki::new();
    let files = pki.server_files(1);
    let client = connector(&pki.ca, None, &[b"http/1.1"]);

    // HTTP: axum's ConnectInfo<SocketAddr>, as lib.rs serves it.
    let tls = Arc::new(ReloadableTls::load("HTTP", files.clone(), HTTP_ALPN).unwrap());
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
    );
    let listener = axum::serve::ListenerExt::tap_io(TlsListener::new(tcp, tls), |_| {});
    tokio::spawn(
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).into_future(),
    );
    let mut stream = connect(&client, addr).await.unwrap();
    let me = stream.get_ref().0.local_addr().unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with(&me.to_string()), "{response} should name {me}");

    // gRPC: tonic reads the address from the connection's TcpConnectInfo.
    let tls = Arc::new(ReloadableTls::load("gRPC", files, GRPC_ALPN).unwrap());
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let mut incoming = Box::pin(super::grpc_incoming(TlsListener::new(tcp, tls)));
    let client = connector(&pki.ca, None, &[b"h2"]);
    let (stream, accepted) = tokio::join!(connect(&client, addr), incoming.next());
    let me = stream.unwrap().get_ref().0.local_addr().unwrap();
    let info = accepted.unwrap().unwrap().connect_info();
    assert_eq!(info.remote_addr(), Some(me));
    assert_eq!(info.local_addr(), Some(addr));
}
