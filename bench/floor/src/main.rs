//! `oxserve-floor ADDR`: serves add_sub over KServe v2 HTTP JSON and nothing else. Prints the
//! bound address as `{"event":"listening","http":"ADDR"}` on stdout (ADDR may use port 0).

use axum::Router;
use axum::body::Bytes;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Deserialize)]
struct Input {
    name: String,
    shape: Vec<i64>,
    data: Vec<f32>,
}

#[derive(Deserialize)]
struct Request {
    inputs: Vec<Input>,
}

#[derive(Serialize)]
struct Output<'a> {
    name: &'static str,
    datatype: &'static str,
    shape: &'a [i64],
    data: Vec<f32>,
}

#[derive(Serialize)]
struct Reply<'a> {
    model_name: &'static str,
    model_version: &'static str,
    outputs: [Output<'a>; 2],
}

const METADATA: &str = r#"{"name":"add_sub","versions":["1"],"platform":"onnxruntime_onnx","inputs":[{"name":"INPUT0","datatype":"FP32","shape":[-1,16]},{"name":"INPUT1","datatype":"FP32","shape":[-1,16]}],"outputs":[{"name":"OUTPUT0","datatype":"FP32","shape":[-1,16]},{"name":"OUTPUT1","datatype":"FP32","shape":[-1,16]}]}"#;

fn json(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body.into()).into_response()
}

async fn infer(body: Bytes) -> Response {
    let Ok(req) = serde_json::from_slice::<Request>(&body) else {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"bad request"}"#);
    };
    let (Some(a), Some(b)) = (
        req.inputs.iter().find(|i| i.name == "INPUT0"),
        req.inputs.iter().find(|i| i.name == "INPUT1"),
    ) else {
        return json(StatusCode::BAD_REQUEST, r#"{"error":"needs INPUT0 and INPUT1"}"#);
    };
    let sum = a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect();
    let diff = a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
    let reply = Reply {
        model_name: "add_sub",
        model_version: "1",
        outputs: [
            Output {
                name: "OUTPUT0",
                datatype: "FP32",
                shape: &a.shape,
                data: sum,
            },
            Output {
                name: "OUTPUT1",
                datatype: "FP32",
                shape: &a.shape,
                data: diff,
            },
        ],
    };
    match serde_json::to_vec(&reply) {
        Ok(v) => json(StatusCode::OK, v),
        Err(_) => json(StatusCode::INTERNAL_SERVER_ERROR, r#"{"error":"encode"}"#),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".into());
    let app = Router::new()
        .route("/v2/health/ready", get(|| async { StatusCode::OK }))
        .route(
            "/v2/models/add_sub",
            get(|| async { json(StatusCode::OK, METADATA) }),
        )
        .route("/v2/models/add_sub/infer", post(infer));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(r#"{{"event":"listening","http":"{}"}}"#, listener.local_addr()?);
    // Like oxserve: no Nagle delay on answers.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}
