//! The HTTP/1.1 client of the `http-json` and `http-binary` protocols: a pool of keep-alive
//! connections made directly with hyper's connection API.

use std::sync::{Mutex, PoisonError};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::{HeaderValue, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Keep-alive HTTP/1.1 connections to one server, reused by whichever request needs one: a
/// closed-loop worker keeps reusing the same few, an open-loop burst opens more. Leaner than a
/// general-purpose client (no URL parsing, redirect policy or timers per request), so that
/// the load generator's own CPU, which shares the machine with the server, stays small.
pub(super) struct HttpPool {
    /// `host:port` to connect to.
    addr: String,
    host: HeaderValue,
    /// Origin-form request target, e.g. `/v2/models/add_sub/infer`.
    target: Uri,
    idle: Mutex<Vec<Conn>>,
}

impl HttpPool {
    pub(super) fn new(base_url: &str, path: &str) -> anyhow::Result<Self> {
        let uri: Uri = base_url
            .parse()
            .with_context(|| format!("invalid URL '{base_url}'"))?;
        if uri.scheme_str() != Some("http") {
            bail!("the load generator sends plain http:// requests, not '{base_url}'");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("no host in '{base_url}'"))?;
        let addr = format!("{}:{}", authority.host(), authority.port_u16().unwrap_or(80));
        let target: Uri = format!("{}{path}", uri.path().trim_end_matches('/'))
            .parse()
            .with_context(|| format!("invalid request path '{path}'"))?;
        Ok(HttpPool {
            addr,
            host: HeaderValue::from_str(authority.as_str())?,
            target,
            idle: Mutex::new(Vec::new()),
        })
    }

    async fn connect(&self) -> Result<Conn, String> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.addr))?;
        let _ = tcp.set_nodelay(true);
        let (conn, driver) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP handshake with {}: {e}", self.addr))?;
        tokio::spawn(async move {
            let _ = driver.await;
        });
        Ok(conn)
    }

    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if !conn.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    pub(super) async fn post(
        &self,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<(), String> {
        let (mut conn, reused) = match self.checkout() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        let mut outcome = self.exchange(&mut conn, body, content_type, header_len).await;
        if outcome.is_err() && reused {
            // A kept-alive connection the server has since closed: once more on a new one.
            conn = self.connect().await?;
            outcome = self.exchange(&mut conn, body, content_type, header_len).await;
        }
        let answer = outcome?;
        self.checkin(conn);
        answer
    }

    /// One request on `conn`. The outer `Err` is a transport failure (the connection is not
    /// reusable); the inner one an HTTP error status.
    async fn exchange(
        &self,
        conn: &mut Conn,
        body: &Bytes,
        content_type: &HeaderValue,
        header_len: Option<&HeaderValue>,
    ) -> Result<Result<(), String>, String> {
        conn.ready().await.map_err(|e| e.to_string())?;
        let mut request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.target.clone())
            .header(http::header::HOST, self.host.clone())
            .header(http::header::CONTENT_TYPE, content_type.clone());
        if let Some(n) = header_len {
            request = request.header("inference-header-content-length", n.clone());
        }
        let request = super::headers::with_extra_headers(request)
            .body(Full::new(body.clone()))
            .map_err(|e| e.to_string())?;
        let response = conn.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(if status.is_success() {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            Err(format!("HTTP {status}: {text}"))
        })
    }
}
