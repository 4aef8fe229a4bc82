//! In-process gRPC round trips: the real engine facade with a stand-in backend, the tonic
//! server on an ephemeral port and the generated client. Protocol details (every datatype,
//! every malformed request) are unit-tested in `src/grpc`; this checks the wiring.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use oxserve_backend::{Backend, BackendError, Batch, LoadSpec, LoadedModel, ModelInstance, ModelSignature};
use oxserve_core::{DataType, Tensor, TensorMeta};
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_kserve::grpc::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use oxserve_kserve::grpc::pb::{
    GrpcInferenceServiceClient, InferTensorContents, ModelConfigRequest, ModelInferRequest,
    ModelMetadataRequest, ModelReadyRequest, ModelStatisticsRequest, RepositoryIndexRequest,
    ServerLiveRequest, ServerMetadataRequest, ServerReadyRequest,
};
use oxserve_kserve::grpc::{grpc_service, pb};
use tonic::Code;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

/// Registered under tract's name, which the engine picks for ONNX models: copies input `x`
/// to output `y`.
struct Identity;

fn signature() -> ModelSignature {
    let meta = |name: &str| TensorMeta {
        name: name.into(),
        datatype: DataType::F32,
        shape: vec![-1],
    };
    ModelSignature {
        inputs: vec![meta("x")],
        outputs: vec![meta("y")],
    }
}

impl Backend for Identity {
    fn name(&self) -> &'static str {
        "tract"
    }
    fn inspect(&self, _model_path: &Path) -> Result<ModelSignature, BackendError> {
        Ok(signature())
    }
    fn load(&self, _spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        Ok(Box::new(Identity))
    }
}

impl LoadedModel for Identity {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(Identity))
    }
}

impl ModelInstance for Identity {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        Ok(batch
            .inputs
            .into_iter()
            .map(|t| Tensor {
                name: "y".into(),
                ..t
            })
            .collect())
    }
}

/// A repository with model `m`, version 1, and a server answering on an ephemeral port.
async fn start() -> Result<(tempfile::TempDir, GrpcInferenceServiceClient<Channel>)> {
    let repo = tempfile::tempdir()?;
    let model = repo.path().join("m");
    std::fs::create_dir_all(model.join("1"))?;
    std::fs::write(model.join("1").join("model.onnx"), b"")?;
    std::fs::write(
        model.join("config.pbtxt"),
        r#"
        max_batch_size: 0
        input [{ name: "x", data_type: TYPE_FP32, dims: [-1] }]
        output [{ name: "y", data_type: TYPE_FP32, dims: [-1] }]
        "#,
    )?;
    let manager = ModelManager::new(
        vec![Arc::new(Identity) as Arc<dyn Backend>],
        ManagerOptions {
            repositories: vec![repo.path().to_path_buf()],
            ..Default::default()
        },
    );
    let engine = InferenceService::new(manager, true);
    engine.load_models().await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(grpc_service(engine))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let client = GrpcInferenceServiceClient::connect(format!("http://{addr}")).await?;
    Ok((repo, client))
}

fn infer_request(raw: Option<Vec<f32>>, typed: Option<Vec<f32>>) -> ModelInferRequest {
    let n = raw.as_ref().or(typed.as_ref()).map_or(0, Vec::len) as i64;
    ModelInferRequest {
        model_name: "m".into(),
        id: "req-7".into(),
        inputs: vec![InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![n],
            parameters: Default::default(),
            contents: typed.map(|v| InferTensorContents {
                fp32_contents: v,
                ..Default::default()
            }),
        }],
        outputs: vec![InferRequestedOutputTensor {
            name: "y".into(),
            parameters: Default::default(),
        }],
        raw_input_contents: raw
            .map(|v| Bytes::from(v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()))
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[tokio::test]
async fn health_metadata_config_and_index() -> Result<()> {
    let (_repo, mut client) = start().await?;

    assert!(client.server_live(ServerLiveRequest {}).await?.into_inner().live);
    assert!(
        client
            .server_ready(ServerReadyRequest {})
            .await?
            .into_inner()
            .ready
    );

    let ready = |name: &str, version: &str| ModelReadyRequest {
        name: name.into(),
        version: version.into(),
    };
    assert!(client.model_ready(ready("m", "")).await?.into_inner().ready);
    assert!(client.model_ready(ready("m", "1")).await?.into_inner().ready);
    // Unknown model or version: not ready, not an error (Triton's behaviour).
    assert!(!client.model_ready(ready("nope", "")).await?.into_inner().ready);
    assert!(!client.model_ready(ready("m", "9")).await?.into_inner().ready);
    match client.model_ready(ready("m", "one")).await {
        Err(s) if s.code() == Code::InvalidArgument => {}
        other => bail!("bad version string: {other:?}"),
    }

    let server = client
        .server_metadata(ServerMetadataRequest {})
        .await?
        .into_inner();
    assert!(!server.name.is_empty() && !server.version.is_empty());

    let meta = client
        .model_metadata(ModelMetadataRequest {
            name: "m".into(),
            version: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(meta.name, "m");
    assert_eq!(meta.versions, vec!["1"]);
    assert_eq!(meta.inputs.first().map(|t| t.datatype.as_str()), Some("FP32"));
    match client
        .model_metadata(ModelMetadataRequest {
            name: "nope".into(),
            version: String::new(),
        })
        .await
    {
        Err(s) if s.code() == Code::NotFound => {}
        other => bail!("unknown model metadata: {other:?}"),
    }

    let config = client
        .model_config(ModelConfigRequest {
            name: "m".into(),
            version: "1".into(),
        })
        .await?
        .into_inner()
        .config
        .context("config missing")?;
    assert_eq!(config.input.first().map(|i| i.name.as_str()), Some("x"));

    let index = client
        .repository_index(RepositoryIndexRequest {
            repository_name: String::new(),
            ready: false,
        })
        .await?
        .into_inner();
    let rows: Vec<_> = index
        .models
        .iter()
        .map(|m| (m.name.as_str(), m.version.as_str(), m.state.as_str()))
        .collect();
    assert_eq!(rows, vec![("m", "1", "READY")]);
    match client
        .repository_index(RepositoryIndexRequest {
            repository_name: "other".into(),
            ready: false,
        })
        .await
    {
        Err(s) if s.code() == Code::Unimplemented => {}
        other => bail!("named repository: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn infer_raw_and_typed() -> Result<()> {
    let (_repo, mut client) = start().await?;

    for request in [
        infer_request(Some(vec![1.0, -2.5, 3.0]), None),
        infer_request(None, Some(vec![1.0, -2.5, 3.0])),
    ] {
        let response = client.model_infer(request).await?.into_inner();
        assert_eq!(response.model_name, "m");
        assert_eq!(response.model_version, "1");
        assert_eq!(response.id, "req-7");
        let out = response.outputs.first().context("no output")?;
        assert_eq!((out.name.as_str(), out.datatype.as_str()), ("y", "FP32"));
        assert_eq!(out.shape, vec![3]);
        let raw = response.raw_output_contents.first().context("no raw output")?;
        assert_eq!(floats(raw), vec![1.0, -2.5, 3.0]);
    }

    // Malformed: shape says 3 elements, raw carries 2.
    let mut bad = infer_request(Some(vec![1.0, 2.0]), None);
    bad.inputs[0].shape = vec![3];
    match client.model_infer(bad).await {
        Err(s) if s.code() == Code::InvalidArgument => {}
        other => bail!("short raw input: {other:?}"),
    }
    let mut unknown = infer_request(Some(vec![1.0]), None);
    unknown.model_name = "nope".into();
    match client.model_infer(unknown).await {
        Err(s) if s.code() == Code::NotFound => {}
        other => bail!("unknown model: {other:?}"),
    }
    Ok(())
}

fn stats_request(name: &str, version: &str) -> ModelStatisticsRequest {
    ModelStatisticsRequest {
        name: name.into(),
        version: version.into(),
    }
}

#[tokio::test]
async fn model_statistics_count_what_was_served() -> Result<()> {
    let (_repo, mut client) = start().await?;

    let before = client
        .model_statistics(stats_request("m", ""))
        .await?
        .into_inner();
    assert_eq!(before.model_stats.len(), 1);
    let s = &before.model_stats[0];
    assert_eq!((s.name.as_str(), s.version.as_str()), ("m", "1"));
    assert_eq!(
        (s.inference_count, s.execution_count, s.last_inference),
        (0, 0, 0)
    );
    assert!(s.batch_stats.is_empty());

    for _ in 0..3 {
        client
            .model_infer(infer_request(Some(vec![1.0, 2.0]), None))
            .await?;
    }
    // Reaches the engine and fails its validation (INT32 for an FP32 input): a failure.
    let mut wrong_type = infer_request(None, None);
    wrong_type.inputs[0].datatype = "INT32".into();
    wrong_type.inputs[0].shape = vec![1];
    wrong_type.inputs[0].contents = Some(InferTensorContents {
        int_contents: vec![1],
        ..Default::default()
    });
    match client.model_infer(wrong_type).await {
        Err(s) if s.code() == Code::InvalidArgument => {}
        other => bail!("wrong datatype: {other:?}"),
    }

    let after = client
        .model_statistics(stats_request("m", "1"))
        .await?
        .into_inner();
    let s = after.model_stats.first().context("no statistics for m/1")?;
    assert_eq!(s.inference_count, 3);
    assert_eq!(s.execution_count, 3);
    assert!(s.last_inference > 0);
    let stats = s.inference_stats.context("no inference_stats")?;
    let count = |d: Option<pb::StatisticDuration>| d.map_or(0, |d| d.count);
    assert_eq!(count(stats.success), 3);
    assert_eq!(count(stats.fail), 1);
    assert_eq!(count(stats.queue), 3);
    assert_eq!(count(stats.compute_infer), 3);
    assert!(stats.success.is_some_and(|d| d.ns > 0));
    let batches: Vec<_> = s
        .batch_stats
        .iter()
        .map(|b| (b.batch_size, count(b.compute_infer)))
        .collect();
    assert_eq!(batches, vec![(1, 3)]);

    // No name: every model; a version without a name is ignored, as in Triton.
    for (name, version) in [("", ""), ("", "9")] {
        let all = client
            .model_statistics(stats_request(name, version))
            .await?
            .into_inner();
        let names: Vec<_> = all.model_stats.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, vec!["m"]);
    }
    for (name, version, code) in [
        ("nope", "", Code::NotFound),
        ("m", "2", Code::NotFound),
        ("m", "x", Code::InvalidArgument),
    ] {
        match client.model_statistics(stats_request(name, version)).await {
            Err(s) if s.code() == code => {}
            other => bail!("statistics of {name}/{version}: {other:?}"),
        }
    }
    Ok(())
}
