//! Running TF Serving requests on the engine through the shared request runner: predict
//! (checked against the signature as TF Serving checks it), classify and regress.

use bytes::Bytes;
use oxserve_core::{DataType, Error, Parameters, Result, Tensor, TensorData};
use oxserve_engine::InferenceService;
use oxserve_frontend::{DecodedInput, DecodedRequest, ModelTarget, OutputRequest};
use oxserve_shm::SharedMemoryRegistry;

use crate::spec::{CLASSIFY_METHOD, REGRESS_METHOD, Signature};

/// A predict's answer: the version that ran and the outputs by key.
#[derive(Debug)]
pub struct Predicted {
    pub version: u64,
    pub outputs: Vec<Tensor>,
}

fn keys<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let mut v: Vec<&str> = it.collect();
    v.sort_unstable();
    v.join(",")
}

/// Runs `inputs` (named by signature key) on `sig`; `output_filter` empty means every output.
pub async fn predict(
    engine: &InferenceService,
    shm: &SharedMemoryRegistry,
    target: ModelTarget,
    client_inputs: &[oxserve_core::TensorMeta],
    sig: &Signature,
    inputs: Vec<Tensor>,
    output_filter: &[String],
) -> Result<Predicted> {
    // TF Serving's check: exactly the signature's inputs, each once.
    let sent: std::collections::BTreeSet<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
    let expected: std::collections::BTreeSet<&str> = sig.inputs.iter().map(|t| t.key.as_str()).collect();
    if sent != expected || sent.len() != inputs.len() {
        let extra: Vec<&str> = sent.difference(&expected).copied().collect();
        let missing: Vec<&str> = expected.difference(&sent).copied().collect();
        return Err(Error::invalid(format!(
            "input size does not match signature: {}!={} len({{{}}}) != len({{{}}}). Sent extra: {{{}}}. Missing but required: {{{}}}.",
            inputs.len(),
            sig.inputs.len(),
            keys(inputs.iter().map(|t| t.name.as_str())),
            keys(sig.inputs.iter().map(|t| t.key.as_str())),
            extra.join(","),
            missing.join(",")
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in output_filter {
        if !sig.outputs.iter().any(|o| &o.key == name) {
            return Err(Error::invalid(format!(
                "output tensor alias not found in signature: {} Outputs expected to be in the set {{{}}}.",
                crate::spec::truncate(name),
                keys(sig.outputs.iter().map(|t| t.key.as_str()))
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid(format!("duplicate output tensor alias: {name}")));
        }
    }
    let mut request = DecodedRequest::new(target, None, Parameters::new())?;
    request.signature = (!sig.is_default).then(|| sig.name.clone());
    request.inputs = inputs
        .into_iter()
        .map(|mut t| {
            // The engine's configuration may give a batched `[-1]` tensor a trailing 1
            // (Triton's convention); TF Serving's clients send the signature's own shape.
            if sig.native
                && sig.is_default
                && let Some(client) = client_inputs.iter().find(|c| c.name == t.name)
                && client.shape.len() == t.shape.len() + 1
                && client.shape.last() == Some(&1)
            {
                t.shape.push(1);
            }
            DecodedInput::body(t.name, t.datatype, t.shape, t.data)
        })
        .collect();
    request.outputs = output_filter.iter().map(OutputRequest::named).collect();
    let response = oxserve_frontend::run(engine, shm, request).await?;
    let outputs = response
        .outputs
        .into_iter()
        .map(|placed| {
            let mut t = placed.tensor;
            if let Some(declared) = sig.outputs.iter().find(|o| o.key == t.name)
                && sig.native
                && t.shape.len() == declared.shape.len() + 1
                && t.shape.last() == Some(&1)
            {
                t.shape.pop();
            }
            t
        })
        .collect();
    Ok(Predicted {
        version: response.model_version,
        outputs,
    })
}

/// The signature's single string input for serialized examples (TF Serving's `inputs`).
fn examples_input(sig: &Signature, what: &str) -> Result<String> {
    match sig.inputs.as_slice() {
        [one] if one.datatype == DataType::Bytes => Ok(one.key.clone()),
        [_] => Err(Error::invalid(format!(
            "{what} signature input must be a string tensor of serialized tf.Example"
        ))),
        _ => Err(Error::invalid("Expected one input Tensor.")),
    }
}

fn check_method(sig: &Signature, method: &str, what: &str) -> Result<()> {
    if sig.method_name != method {
        return Err(Error::invalid(format!(
            "Expected {what} signature method_name to be {method}. Was: {}",
            sig.method_name
        )));
    }
    Ok(())
}

fn example_batch(key: String, examples: Vec<Bytes>) -> Tensor {
    let n = examples.len() as i64;
    Tensor::new(key, DataType::Bytes, vec![n], TensorData::Strings(examples))
}

/// One classification: (label, score) per class.
pub type Classes = Vec<(Bytes, f32)>;

pub async fn classify(
    engine: &InferenceService,
    shm: &SharedMemoryRegistry,
    target: ModelTarget,
    client_inputs: &[oxserve_core::TensorMeta],
    sig: &Signature,
    examples: Vec<Bytes>,
) -> Result<(u64, Vec<Classes>)> {
    check_method(sig, CLASSIFY_METHOD, "classification")?;
    let key = examples_input(sig, "classification")?;
    let n = examples.len();
    let has = |k: &str| sig.outputs.iter().any(|o| o.key == k);
    let mut filter = Vec::new();
    for k in ["classes", "scores"] {
        if has(k) {
            filter.push(k.to_string());
        }
    }
    if filter.is_empty() {
        return Err(Error::invalid(
            "Expected classification signature outputs to contain at least one of 'classes' or 'scores'",
        ));
    }
    let predicted = predict(
        engine,
        shm,
        target,
        client_inputs,
        sig,
        vec![example_batch(key, examples)],
        &filter,
    )
    .await?;
    let find = |k: &str| predicted.outputs.iter().find(|t| t.name == k);
    let classes = find("classes");
    let scores = find("scores");
    let per_example = |t: &Tensor| -> Result<usize> {
        match t.shape.as_slice() {
            [rows, k] if *rows as usize == n => Ok(*k as usize),
            [rows] if *rows as usize == n => Ok(1),
            _ => Err(Error::invalid(format!(
                "Expected output Tensor '{}' of shape [batch_size, num_classes] with batch_size {n}, got {:?}",
                t.name, t.shape
            ))),
        }
    };
    let k = match (classes, scores) {
        (Some(c), Some(s)) => {
            let (kc, ks) = (per_example(c)?, per_example(s)?);
            if kc != ks {
                return Err(Error::invalid(format!(
                    "Tensors class and score should match in dim[1]: {kc} vs {ks}"
                )));
            }
            kc
        }
        (Some(c), None) => per_example(c)?,
        (None, Some(s)) => per_example(s)?,
        (None, None) => 0,
    };
    let labels: Option<&Vec<Bytes>> = match classes.map(|c| &c.data) {
        Some(TensorData::Strings(items)) => Some(items),
        Some(_) => return Err(Error::invalid("Expected classes Tensor of DT_STRING")),
        None => None,
    };
    let values: Option<Vec<f32>> = match scores {
        Some(s) if s.datatype == DataType::F32 => Some(
            s.raw()
                .map(|raw| {
                    raw.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect()
                })
                .unwrap_or_default(),
        ),
        Some(_) => return Err(Error::invalid("Expected scores Tensor of DT_FLOAT")),
        None => None,
    };
    let results = (0..n)
        .map(|i| {
            (0..k)
                .map(|j| {
                    let label = labels.and_then(|l| l.get(i * k + j).cloned()).unwrap_or_default();
                    let score = values
                        .as_ref()
                        .and_then(|v| v.get(i * k + j).copied())
                        .unwrap_or(0.0);
                    (label, score)
                })
                .collect()
        })
        .collect();
    Ok((predicted.version, results))
}

pub async fn regress(
    engine: &InferenceService,
    shm: &SharedMemoryRegistry,
    target: ModelTarget,
    client_inputs: &[oxserve_core::TensorMeta],
    sig: &Signature,
    examples: Vec<Bytes>,
) -> Result<(u64, Vec<f32>)> {
    check_method(sig, REGRESS_METHOD, "regression")?;
    let key = examples_input(sig, "regression")?;
    if !sig.outputs.iter().any(|o| o.key == "outputs") {
        return Err(Error::invalid(
            "Expected regression signature to have an output named 'outputs'",
        ));
    }
    let n = examples.len();
    let predicted = predict(
        engine,
        shm,
        target,
        client_inputs,
        sig,
        vec![example_batch(key, examples)],
        &["outputs".to_string()],
    )
    .await?;
    let Some(out) = predicted.outputs.into_iter().next() else {
        return Err(Error::internal("the regression returned no output"));
    };
    let shape_ok = matches!(out.shape.as_slice(), [rows] if *rows as usize == n)
        || matches!(out.shape.as_slice(), [rows, 1] if *rows as usize == n);
    if !shape_ok || out.datatype != DataType::F32 {
        return Err(Error::invalid(format!(
            "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] of DT_FLOAT but got {:?} {}",
            out.shape, out.datatype
        )));
    }
    let values = out
        .raw()
        .map(|raw| {
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .unwrap_or_default();
    Ok((predicted.version, values))
}
