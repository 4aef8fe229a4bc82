//! What the fuzz targets share: the real KServe front-ends (the axum router and the gRPC
//! service) over the real engine running the bundled example models on tract, and the rule
//! every answer must keep: a client's input never gets a server error.
//!
//! The harness goes through the public entry points only (`http::router`, `GrpcFrontend`),
//! so it keeps working while the request parsing behind them changes.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_kserve::grpc::GrpcFrontend;
use oxserve_kserve::grpc::pb::{GrpcInferenceService, ModelInferRequest};
use oxserve_kserve::http::{HttpOptions, router};
use oxserve_shm::SharedMemoryRegistry;
use tower::ServiceExt;

/// The shared-memory region registered for every run, so requests that name it reach the
/// shared-memory reads (4 KiB of float32 values).
pub const SHM_REGION: &str = "fuzz_region";
pub const SHM_REGION_BYTES: usize = 4096;

/// The server every input is sent to, started once per process.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    grpc: GrpcFrontend,
    shm: Arc<SharedMemoryRegistry>,
}

/// The shared-memory registry of [`server`], with [`SHM_REGION`] registered.
pub fn shm_registry() -> &'static SharedMemoryRegistry {
    &server().shm
}

/// The shared server (built on first use: the example models load once per process).
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(Server::start)
}

impl Server {
    fn start() -> Server {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let repository = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/models");
        let engine = runtime.block_on(async {
            let manager = ModelManager::new(
                vec![Arc::new(oxserve_tract::TractBackend::new())],
                ManagerOptions {
                    repositories: vec![repository],
                    ..ManagerOptions::default()
                },
            );
            let engine = InferenceService::new(manager, false);
            engine.load_models().await;
            engine
        });
        assert!(
            engine.model_metadata("add_sub", None).is_ok(),
            "the example model add_sub must load"
        );
        let shm = Arc::new(SharedMemoryRegistry::new());
        let router = router(engine.clone(), HttpOptions::default(), Arc::clone(&shm));
        let grpc = GrpcFrontend::new(engine, Arc::clone(&shm));
        let server = Server {
            runtime,
            router,
            grpc,
            shm,
        };
        server.register_region();
        server
    }

    /// Registers [`SHM_REGION`] the way a client does (over HTTP), then removes the object's
    /// name, so no run leaves files in /dev/shm. If registration is refused (a policy that
    /// does not allow it here), the shared-memory paths are only fuzzed up to the lookup.
    fn register_region(&self) {
        let key = format!("oxserve-fuzz-{}", std::process::id());
        let path = PathBuf::from("/dev/shm").join(&key);
        let values: Vec<u8> = (0..SHM_REGION_BYTES / 4)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        if std::fs::write(&path, values).is_err() {
            return;
        }
        let body = format!(r#"{{"key":"{key}","offset":0,"byte_size":{SHM_REGION_BYTES}}}"#);
        let request = http::Request::post(format!("/v2/systemsharedmemory/region/{SHM_REGION}/register"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("a valid request");
        let (status, text) = self.http(request);
        if !status.is_success() {
            eprintln!("note: shared-memory region not registered: {status} {}", String::from_utf8_lossy(&text));
        }
        let _ = std::fs::remove_file(&path);
    }

    /// One HTTP request through the router: the status and the whole body.
    pub fn http(&self, request: http::Request<Body>) -> (StatusCode, Bytes) {
        self.runtime.block_on(async {
            let response = match self.router.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            (status, body)
        })
    }

    /// One `ModelInfer` call on the gRPC service.
    pub fn grpc_infer(&self, request: ModelInferRequest) -> Result<(), tonic::Status> {
        self.runtime.block_on(async {
            self.grpc
                .model_infer(tonic::Request::new(request))
                .await
                .map(|_| ())
        })
    }
}

/// The rule for an HTTP answer to client input: never a server error. 429 (over capacity) and
/// 504 (the client's own timeout passed) are the client's to retry or relax; every other 5xx
/// is a finding.
pub fn assert_client_answer(status: StatusCode, body: &[u8], input: &dyn std::fmt::Debug) {
    if status.is_server_error() && status != StatusCode::GATEWAY_TIMEOUT {
        panic!(
            "HTTP {status} for client input: {}\ninput: {input:?}",
            String::from_utf8_lossy(&body[..body.len().min(2000)])
        );
    }
}

/// The same rule in gRPC terms.
pub fn assert_client_status(status: &tonic::Status, input: &dyn std::fmt::Debug) {
    use tonic::Code;
    if matches!(
        status.code(),
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented | Code::Unavailable
    ) {
        panic!(
            "gRPC {:?} for client input: {}\ninput: {input:?}",
            status.code(),
            status.message()
        );
    }
}
