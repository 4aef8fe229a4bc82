//! The request runner against the real engine facade, with the `testkit` backend's identity
//! model (output i is a copy of input i) and real shared-memory objects in /dev/shm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use bytes::Bytes;
use oxserve_backend::Backend;
use oxserve_backend::testkit::TestkitBackend;
use oxserve_core::{DataType, ErrorKind, TensorData};
use oxserve_engine::{InferenceService, ManagerOptions, ModelManager};
use oxserve_frontend::{
    DecodedInput, DecodedRequest, InputData, ModelTarget, OutputRequest, Placement, RunResponse, run,
};
use oxserve_shm::{SharedMemoryRegistry, ShmRef};

/// Model `m` (version 1): FP32 `INPUT0` → `OUTPUT0`, BYTES `INPUT1` → `OUTPUT1`, no batching.
async fn engine() -> Result<(tempfile::TempDir, InferenceService)> {
    let repo = tempfile::tempdir()?;
    let model = repo.path().join("m");
    std::fs::create_dir_all(model.join("1"))?;
    std::fs::write(
        model.join("1").join("model.json"),
        r#"{"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [-1]},
                       {"name": "INPUT1", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1]},
                        {"name": "OUTPUT1", "datatype": "BYTES", "shape": [-1]}]}"#,
    )?;
    std::fs::write(
        model.join("config.pbtxt"),
        r#"
        backend: "testkit"
        default_model_filename: "model.json"
        max_batch_size: 0
        input [{ name: "INPUT0", data_type: TYPE_FP32, dims: [-1] },
               { name: "INPUT1", data_type: TYPE_STRING, dims: [-1] }]
        output [{ name: "OUTPUT0", data_type: TYPE_FP32, dims: [-1] },
                { name: "OUTPUT1", data_type: TYPE_STRING, dims: [-1] }]
        "#,
    )?;
    let manager = ModelManager::new(
        vec![Arc::new(TestkitBackend::new()) as Arc<dyn Backend>],
        ManagerOptions {
            repositories: vec![repo.path().to_path_buf()],
            ..Default::default()
        },
    );
    let engine = InferenceService::new(manager, true);
    engine.load_models().await;
    Ok((repo, engine))
}

fn f32s(values: &[f32]) -> Bytes {
    Bytes::from(values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())
}

fn request(engine: &InferenceService, inputs: Vec<DecodedInput>) -> Result<DecodedRequest> {
    let mut r = DecodedRequest::new(
        ModelTarget::resolve(engine, "m", None)?,
        Some("r1".into()),
        Default::default(),
    )?;
    r.inputs = inputs;
    Ok(r)
}

fn body_inputs() -> Vec<DecodedInput> {
    vec![
        DecodedInput::body(
            "INPUT0",
            DataType::F32,
            vec![2],
            TensorData::Raw(f32s(&[1.5, -2.0])),
        ),
        DecodedInput::body(
            "INPUT1",
            DataType::Bytes,
            vec![1],
            TensorData::Strings(vec![Bytes::from_static(b"cat")]),
        ),
    ]
}

fn placements(r: &RunResponse) -> Vec<(&str, &Placement)> {
    r.outputs
        .iter()
        .map(|o| (o.tensor.name.as_str(), &o.placement))
        .collect()
}

#[tokio::test]
async fn body_inputs_and_binary_preferences() -> Result<()> {
    let (_repo, engine) = engine().await?;
    let shm = SharedMemoryRegistry::new();

    // Nothing asked: every output inline, in the model's order, with the request's id.
    let r = run(&engine, &shm, request(&engine, body_inputs())?).await?;
    assert_eq!(
        (r.model_name.as_str(), r.model_version, r.id.as_deref()),
        ("m", 1, Some("r1"))
    );
    assert_eq!(
        placements(&r),
        vec![("OUTPUT0", &Placement::Inline), ("OUTPUT1", &Placement::Inline)]
    );
    assert_eq!(r.outputs[0].tensor.data, TensorData::Raw(f32s(&[1.5, -2.0])));

    // binary_data_output for the request, one output overriding it.
    let mut req = request(&engine, body_inputs())?;
    req.binary_by_default = true;
    req.outputs = vec![
        OutputRequest {
            binary: Some(false),
            ..OutputRequest::named("OUTPUT0")
        },
        OutputRequest::named("OUTPUT1"),
    ];
    let r = run(&engine, &shm, req).await?;
    assert_eq!(
        placements(&r),
        vec![("OUTPUT0", &Placement::Inline), ("OUTPUT1", &Placement::Binary)]
    );

    // Only the outputs asked for come back; classification turns one into its top classes.
    let mut req = request(&engine, body_inputs())?;
    req.outputs = vec![OutputRequest {
        classification: Some(1),
        ..OutputRequest::named("OUTPUT0")
    }];
    let r = run(&engine, &shm, req).await?;
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].tensor.datatype, DataType::Bytes);
    assert_eq!(
        r.outputs[0].tensor.data,
        TensorData::Strings(vec![Bytes::from_static(b"1.5:0")])
    );
    Ok(())
}

#[tokio::test]
async fn the_model_is_resolved_first_and_inputs_are_checked_once() -> Result<()> {
    let (_repo, engine) = engine().await?;
    let shm = SharedMemoryRegistry::new();
    let kind = |r: oxserve_core::Result<ModelTarget>| r.err().map(|e| e.kind());
    assert_eq!(
        kind(ModelTarget::resolve(&engine, "nope", None)),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(ModelTarget::resolve(&engine, "m", Some(9))),
        Some(ErrorKind::NotFound)
    );
    assert_eq!(
        kind(ModelTarget::resolve_str(&engine, "m", "x")),
        Some(ErrorKind::InvalidArgument)
    );
    assert!(ModelTarget::resolve_str(&engine, "m", "1").is_ok());

    // Data that does not fill its shape.
    let mut inputs = body_inputs();
    inputs[0].shape = vec![3];
    let e = run(&engine, &shm, request(&engine, inputs)?).await.err();
    assert!(e.is_some_and(|e| e.kind() == ErrorKind::InvalidArgument && e.message().contains("needs 12")));

    // An output the model does not have.
    let mut req = request(&engine, body_inputs())?;
    req.outputs = vec![OutputRequest::named("nope")];
    let e = run(&engine, &shm, req).await.err();
    assert!(e.is_some_and(|e| e.message().contains("nope")));

    // A region that is not registered.
    let mut inputs = body_inputs();
    inputs[0].data = InputData::SharedMemory(ShmRef {
        region: "missing".into(),
        offset: 0,
        byte_size: 8,
    });
    let e = run(&engine, &shm, request(&engine, inputs)?).await.err();
    assert!(e.is_some_and(|e| e.kind() == ErrorKind::NotFound && e.message().contains("'missing'")));
    Ok(())
}

/// A POSIX shared-memory object of `len` zero bytes, removed on drop.
struct Object(std::path::PathBuf, String);

impl Object {
    fn new(len: usize) -> Result<Object> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let key = format!(
            "/oxserve-frontend-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::path::PathBuf::from(format!("/dev/shm{key}"));
        std::fs::write(&path, vec![0u8; len])?;
        Ok(Object(path, key))
    }
}

impl Drop for Object {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn shared_memory_inputs_and_outputs() -> Result<()> {
    let (_repo, engine) = engine().await?;
    let shm = SharedMemoryRegistry::new();
    let input = Object::new(64)?;
    let mut bytes = std::fs::read(&input.0)?;
    bytes[..8].copy_from_slice(&f32s(&[3.0, 4.0]));
    // BYTES input "dog" right after, Triton's length-prefixed form.
    bytes[8..15].copy_from_slice(b"\x03\0\0\0dog");
    std::fs::write(&input.0, &bytes)?;
    let output = Object::new(64)?;
    shm.register(Some(std::net::Ipv6Addr::LOCALHOST.into()), "in", &input.1, 0, 64)?;
    shm.register(
        Some(std::net::Ipv6Addr::LOCALHOST.into()),
        "out",
        &output.1,
        0,
        64,
    )?;

    let at = |region: &str, offset, byte_size| ShmRef {
        region: region.into(),
        offset,
        byte_size,
    };
    let mut req = request(
        &engine,
        vec![
            DecodedInput {
                name: "INPUT0".into(),
                datatype: DataType::F32,
                shape: vec![2],
                data: InputData::SharedMemory(at("in", 0, 8)),
            },
            DecodedInput {
                name: "INPUT1".into(),
                datatype: DataType::Bytes,
                shape: vec![1],
                data: InputData::SharedMemory(at("in", 8, 7)),
            },
        ],
    )?;
    req.outputs = vec![
        OutputRequest {
            shared_memory: Some(at("out", 16, 32)),
            ..OutputRequest::named("OUTPUT0")
        },
        OutputRequest::named("OUTPUT1"),
    ];
    let r = run(&engine, &shm, req).await?;
    assert_eq!(
        placements(&r),
        vec![
            (
                "OUTPUT0",
                &Placement::SharedMemory {
                    region: "out".into(),
                    offset: 16,
                    byte_size: 8
                }
            ),
            ("OUTPUT1", &Placement::Inline),
        ]
    );
    assert_eq!(&std::fs::read(&output.0)?[16..24], f32s(&[3.0, 4.0]).as_ref());
    assert_eq!(
        r.outputs[1].tensor.data,
        TensorData::Strings(vec![Bytes::from_static(b"dog")])
    );

    // An output place too small for the output is refused with the sizes.
    let mut req = request(&engine, body_inputs())?;
    req.outputs = vec![OutputRequest {
        shared_memory: Some(at("out", 0, 4)),
        ..OutputRequest::named("OUTPUT0")
    }];
    let e = run(&engine, &shm, req).await.err();
    assert!(
        e.is_some_and(|e| e.kind() == ErrorKind::InvalidArgument && e.message().contains("at least 8 bytes"))
    );

    // A BYTES region holding more elements than the shape says.
    let mut inputs = body_inputs();
    inputs[1].data = InputData::SharedMemory(at("in", 8, 7));
    inputs[1].shape = vec![0];
    let e = run(&engine, &shm, request(&engine, inputs)?).await.err();
    assert!(e.is_some_and(|e| e.message().contains("more BYTES elements than its shape holds")));
    Ok(())
}
