//! End-to-end tests against the real `oxserve` binary on ephemeral ports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oxserve_kserve::grpc::pb;
use serde_json::{Value, json};

fn repo_path(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
        .display()
        .to_string()
}

struct Server {
    child: Child,
    http: String,
    grpc: String,
}

impl Server {
    /// Starts the binary and waits for its machine-readable "listening" line.
    fn start(repositories: &[&str], extra: &[&str]) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxserve"));
        cmd.args([
            "serve",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
            "--metrics-port",
            "0",
            "--host",
            "127.0.0.1",
        ]);
        for r in repositories {
            cmd.args(["--model-repository", &repo_path(r)]);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("start oxserve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad listening line {line:?}: {e}"));
        assert_eq!(v["event"], "listening");
        Server {
            child,
            http: format!("http://{}", v["http"].as_str().unwrap()),
            grpc: format!("http://{}", v["grpc"].as_str().unwrap()),
        }
    }

    async fn wait_until(&self, path: &str) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}{path}", self.http)).send().await
                && r.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "server never answered 200 on {path}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_sub_over_http_json_binary_and_grpc() {
    let server = Server::start(&["examples/models"], &[]);
    server.wait_until("/v2/health/ready").await;
    let client = reqwest::Client::new();
    let a: Vec<f32> = (0..32).map(|i| i as f32 * 0.5).collect();
    let b: Vec<f32> = (0..32).map(|i| 3.0 - i as f32).collect();
    let sum: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();

    // JSON, batch of 2, nested data, only OUTPUT1 requested.
    let body = json!({
        "id": "r1",
        "inputs": [
            {"name": "INPUT0", "shape": [2, 16], "datatype": "FP32", "data": [&a[..16], &a[16..]]},
            {"name": "INPUT1", "shape": [2, 16], "datatype": "FP32", "data": &b},
        ],
        "outputs": [{"name": "OUTPUT1"}]
    });
    let r: Value = client
        .post(format!("{}/v2/models/add_sub/infer", server.http))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["id"], "r1");
    assert_eq!(r["model_version"], "1");
    assert_eq!(r["outputs"].as_array().unwrap().len(), 1);
    assert_eq!(r["outputs"][0]["name"], "OUTPUT1");
    assert_eq!(r["outputs"][0]["shape"], json!([2, 16]));
    assert_eq!(f32s(&r["outputs"][0]["data"]), diff);

    // Binary tensor extension, both ways.
    let header = json!({
        "inputs": [
            {"name": "INPUT0", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": 128}},
            {"name": "INPUT1", "shape": [2, 16], "datatype": "FP32", "parameters": {"binary_data_size": 128}},
        ],
        "parameters": {"binary_data_output": true}
    })
    .to_string();
    let mut payload = header.clone().into_bytes();
    payload.extend(a.iter().flat_map(|v| v.to_le_bytes()));
    payload.extend(b.iter().flat_map(|v| v.to_le_bytes()));
    let r = client
        .post(format!("{}/v2/models/add_sub/versions/1/infer", server.http))
        .header("Inference-Header-Content-Length", header.len())
        .body(payload)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let n: usize = r.headers()["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let bytes = r.bytes().await.unwrap();
    let head: Value = serde_json::from_slice(&bytes[..n]).unwrap();
    assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 128);
    let decode = |raw: &[u8]| -> Vec<f32> {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    assert_eq!(decode(&bytes[n..n + 128]), sum);
    assert_eq!(decode(&bytes[n + 128..]), diff);

    // gRPC with raw contents.
    let mut grpc = pb::GrpcInferenceServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let raw = |v: &[f32]| -> bytes::Bytes {
        v[..16]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<u8>>()
            .into()
    };
    let input = |name: &str| pb::model_infer_request::InferInputTensor {
        name: name.into(),
        datatype: "FP32".into(),
        shape: vec![1, 16],
        ..Default::default()
    };
    let response = grpc
        .model_infer(pb::ModelInferRequest {
            model_name: "add_sub".into(),
            inputs: vec![input("INPUT0"), input("INPUT1")],
            raw_input_contents: vec![raw(&a), raw(&b)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.outputs[0].name, "OUTPUT0");
    assert_eq!(decode(&response.raw_output_contents[0]), sum[..16]);

    // A bad request gets a clear error and the server keeps serving.
    let r = client
        .post(format!("{}/v2/models/add_sub/infer", server.http))
        .body("{\"inputs\": [")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"].as_str().unwrap().contains("malformed"));
    let status = grpc
        .model_infer(pb::ModelInferRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    server.wait_until("/v2/health/live").await;

    assert!(server.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_models_are_reported_and_the_rest_serve() {
    let server = Server::start(&["tests/fixtures/broken"], &[]);
    server.wait_until("/v2/models/good/ready").await;
    let client = reqwest::Client::new();
    // Strict readiness: one failed model means not ready, but alive.
    let ready = client
        .get(format!("{}/v2/health/ready", server.http))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let index: Value = client
        .post(format!("{}/v2/repository/index", server.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rows = index.as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    assert_eq!(row("good")["state"], "READY");
    for name in ["truncated", "bad_config", "dtype_mismatch", "not_onnx"] {
        assert_eq!(row(name)["state"], "UNAVAILABLE", "{name}");
        assert!(!row(name)["reason"].as_str().unwrap().is_empty(), "{name}");
    }
    assert!(
        row("bad_config")["reason"]
            .as_str()
            .unwrap()
            .contains("max_batchsize")
    );
    let r = client
        .post(format!("{}/v2/models/truncated/infer", server.http))
        .json(&json!({"inputs": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(server.terminate().success());
}

#[test]
fn models_command_reports_failures() {
    let out = Command::new(env!("CARGO_BIN_EXE_oxserve"))
        .args(["models", "--json", &repo_path("tests/fixtures/broken")])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a repository with failures must exit non-zero"
    );
    let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 5);
    let ok = Command::new(env!("CARGO_BIN_EXE_oxserve"))
        .args(["models", &repo_path("examples/models")])
        .output()
        .unwrap();
    assert!(ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stdout).contains("add_sub"));
}

/// Runs `oxserve bench` against the server and returns its JSON lines (one per point).
fn bench(server: &Server, args: &[&str]) -> (std::process::Output, Vec<Value>) {
    let out = Command::new(env!("CARGO_BIN_EXE_oxserve"))
        .args([
            "bench",
            "--http-url",
            &server.http,
            "--grpc-url",
            &server.grpc,
            "--json",
        ])
        .args(args)
        .output()
        .unwrap();
    let points = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, points)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_drives_every_protocol_and_reads_the_server_statistics() {
    let server = Server::start(&["examples/models"], &[]);
    server.wait_until("/v2/health/ready").await;
    let (out, points) = bench(
        &server,
        &[
            "--model",
            "add_sub",
            "--protocol",
            "http-json,http-binary,grpc",
            "--concurrency",
            "1,4",
            "--batch",
            "2",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let seen: Vec<(String, u64)> = points
        .iter()
        .map(|p| {
            (
                p["protocol"].as_str().unwrap().to_string(),
                p["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = ["http-json", "http-binary", "grpc"]
        .iter()
        .flat_map(|p| [(p.to_string(), 1), (p.to_string(), 4)])
        .collect();
    assert_eq!(seen, want);
    for p in &points {
        let requests = p["requests"].as_u64().unwrap();
        assert!(requests > 0, "{p}");
        assert_eq!(p["errors"], 0, "{p}");
        assert_eq!(p["batch"], 2);
        assert!(
            p["p50_us"].as_u64().unwrap() <= p["p99_us"].as_u64().unwrap(),
            "{p}"
        );
        // The server-side breakdown comes from the statistics extension, read before and
        // after the window: the requests the client counted reached the model, give or take
        // those in flight at either edge of the window.
        let server = &p["server"];
        let in_flight = 2 * p["concurrency"].as_u64().unwrap();
        assert!(
            server["requests"].as_u64().unwrap() + in_flight >= requests,
            "{p}"
        );
        // Rows per execution: each request has 2; counters read mid-flight may lag by one.
        assert!(server["avg_batch_size"].as_f64().unwrap() >= 1.9, "{p}");
    }

    // Requests the server rejects are counted as errors, not as throughput.
    let (out, points) = bench(
        &server,
        &[
            "--model",
            "add_sub",
            "--protocol",
            "grpc,http-json",
            "--batch",
            "9",
            "--duration",
            "0.3",
            "--warmup",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &points {
        assert_eq!(p["requests"], 0, "{p}");
        assert!(p["errors"].as_u64().unwrap() > 0, "{p}");
    }

    // An unknown model is a clear error before any load is sent.
    let (out, _) = bench(
        &server,
        &["--model", "nope", "--protocol", "grpc", "--duration", "0.2"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

fn bench_shm_objects() -> usize {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("oxserve-bench-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_generator_with_system_shared_memory() {
    let server = Server::start(&["examples/models"], &[]);
    server.wait_until("/v2/health/ready").await;
    let before = bench_shm_objects();
    let (out, points) = bench(
        &server,
        &[
            "--model",
            "add_sub",
            "--protocol",
            "http-json,grpc",
            "--shared-memory",
            "system",
            "--concurrency",
            "2",
            "--batch",
            "3",
            "--duration",
            "0.4",
            "--warmup",
            "0",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(points.len(), 2);
    for p in &points {
        assert_eq!(p["shared_memory"], "system", "{p}");
        assert!(p["requests"].as_u64().unwrap() > 0, "{p}");
        assert_eq!(p["errors"], 0, "{p}");
        assert!(p["server"]["avg_batch_size"].as_f64().unwrap() >= 2.9, "{p}");
    }
    // The regions were unregistered and their objects removed.
    let status: Value = reqwest::get(format!("{}/v2/systemsharedmemory/status", server.http))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status, serde_json::json!([]));
    assert_eq!(bench_shm_objects(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_memory_can_be_turned_off() {
    let server = Server::start(&["examples/models"], &["--allow-shared-memory", "false"]);
    server.wait_until("/v2/health/ready").await;
    let key = format!("oxserve-test-off-{}", std::process::id());
    std::fs::write(format!("/dev/shm/{key}"), [0u8; 64]).unwrap();
    let client = reqwest::Client::new();
    let register = client
        .post(format!("{}/v2/systemsharedmemory/region/r/register", server.http))
        .json(&serde_json::json!({"key": format!("/{key}"), "offset": 0, "byte_size": 64}))
        .send()
        .await
        .unwrap();
    let _ = std::fs::remove_file(format!("/dev/shm/{key}"));
    assert_eq!(register.status(), 501);
    assert!(register.text().await.unwrap().contains("disabled"));
    let zeros = vec![0.0f32; 16];
    let infer = client
        .post(format!("{}/v2/models/add_sub/infer", server.http))
        .json(&serde_json::json!({"inputs": [
            {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32",
             "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 64}},
            {"name": "INPUT1", "shape": [1, 16], "datatype": "FP32", "data": zeros}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(infer.status(), 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let server = Server::start(&["examples/models"], &[]);
    server.wait_until("/v2/health/ready").await;
    let client = reqwest::Client::new();

    // The caller's id is echoed, on success and on error alike.
    for (path, status) in [("/v2/health/ready", 200), ("/v2/models/nope", 404)] {
        let r = client
            .get(format!("{}{path}", server.http))
            .header("x-request-id", "caller-7")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["x-request-id"], "caller-7");
    }
    // Without one, each request gets a fresh id.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = client
            .get(format!("{}/v2/health/live", server.http))
            .send()
            .await
            .unwrap();
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_string());
    }
    assert!(!ids[0].is_empty());
    assert_ne!(ids[0], ids[1]);

    // gRPC: in the response metadata, also for a trailers-only error answer.
    let mut grpc = pb::GrpcInferenceServiceClient::connect(server.grpc.clone())
        .await
        .unwrap();
    let mut request = tonic::Request::new(pb::ServerLiveRequest {});
    request
        .metadata_mut()
        .insert("x-request-id", "caller-8".parse().unwrap());
    let answer = grpc.server_live(request).await.unwrap();
    assert_eq!(answer.metadata().get("x-request-id").unwrap(), "caller-8");
    let answer = grpc.server_live(pb::ServerLiveRequest {}).await.unwrap();
    assert!(!answer.metadata().get("x-request-id").unwrap().is_empty());
    let mut request = tonic::Request::new(pb::ModelMetadataRequest {
        name: "nope".into(),
        version: String::new(),
    });
    request
        .metadata_mut()
        .insert("x-request-id", "caller-9".parse().unwrap());
    let status = grpc.model_metadata(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.metadata().get("x-request-id").unwrap(), "caller-9");
}
