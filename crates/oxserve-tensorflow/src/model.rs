//! A loaded SavedModel (one session shared by every instance) and its instances.

use std::sync::Arc;

use bytes::Bytes;
use oxserve_backend::support::{
    check_declared_shape, check_declared_type, check_input, check_same_names, internal, invalid_input,
    invalid_model,
};
use oxserve_backend::{BackendError, Batch, EntryPoint, LoadSpec, LoadedModel, ModelInstance};
use oxserve_core::{DataType, Tensor, TensorData, TensorMeta, check_bools, element_count};

use crate::api::Api;
use crate::handles::{Endpoint, OwnedTensor, Session, TensorBytes};
use crate::savedmodel::{self, Signature};

/// Session settings that are not part of the model.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionSettings {
    pub tags: Vec<String>,
    /// 0 = TensorFlow's choice (one thread per core).
    pub intra_op_threads: i32,
    pub inter_op_threads: i32,
    /// Whether idle pool threads spin waiting for work (TensorFlow's default) rather than sleep.
    pub thread_spinning: bool,
}

/// One tensor of a signature, bound to its graph endpoint.
#[derive(Clone)]
struct Binding {
    name: String,
    datatype: DataType,
    /// Model-facing shape (`-1` = variable).
    shape: Vec<i64>,
    endpoint: Endpoint,
}

pub(crate) struct TfModel {
    model_name: String,
    session: Arc<Session>,
    signatures: Vec<Signature>,
    default: String,
    /// The default signature's tensors in the order of the load spec (the configuration's).
    inputs: Vec<Binding>,
    outputs: Vec<Binding>,
}

fn bind(session: &Session, meta: &TensorMeta, tensor_name: &str) -> Result<Binding, BackendError> {
    Ok(Binding {
        name: meta.name.clone(),
        datatype: meta.datatype,
        shape: meta.shape.clone(),
        endpoint: session.endpoint(tensor_name).map_err(invalid_model)?,
    })
}

/// The serialized `ConfigProto` a session is loaded with.
fn session_config(settings: &SessionSettings) -> Vec<u8> {
    prost::Message::encode_to_vec(&savedmodel::SessionConfig {
        intra_op_parallelism_threads: settings.intra_op_threads,
        inter_op_parallelism_threads: settings.inter_op_threads,
        experimental: Some(savedmodel::SessionExperimental {
            disable_thread_spinning: !settings.thread_spinning,
        }),
    })
}

pub(crate) fn load(
    api: Arc<Api>,
    spec: &LoadSpec,
    settings: &SessionSettings,
) -> Result<TfModel, BackendError> {
    let config_bytes = session_config(settings);
    // The MetaGraphDef TensorFlow returns is the one it loaded: signatures come from it.
    let (session, meta_bytes) =
        Session::load(api, &spec.model_path, &settings.tags, &config_bytes).map_err(|e| {
            invalid_model(format!(
                "TensorFlow could not load the SavedModel: {}",
                summarize(&e)
            ))
        })?;
    let meta: savedmodel::MetaGraphDef = prost::Message::decode(meta_bytes.as_slice())
        .map_err(|e| invalid_model(format!("the loaded MetaGraphDef cannot be read: {e}")))?;
    let (signatures, default) = savedmodel::signatures(&meta).map_err(invalid_model)?;
    let Some(sig) = signatures.iter().find(|s| s.name == default) else {
        return Err(invalid_model("the default signature disappeared"));
    };
    // The configuration names the default signature's keys; check it against the file.
    let model_inputs: Vec<&str> = sig.inputs.iter().map(|(m, _)| m.name.as_str()).collect();
    let model_outputs: Vec<&str> = sig.outputs.iter().map(|(m, _)| m.name.as_str()).collect();
    check_same_names("input", &spec.inputs, &model_inputs, true)?;
    check_same_names("output", &spec.outputs, &model_outputs, false)?;
    let bind_spec =
        |configured: &[TensorMeta], declared: &[(TensorMeta, String)], role: &str, strict: bool| {
            configured
                .iter()
                .map(|c| {
                    let Some((meta, tensor)) = declared.iter().find(|(m, _)| m.name == c.name) else {
                        return Err(invalid_model(format!(
                            "{role} '{}' is not in the signature",
                            c.name
                        )));
                    };
                    check_declared_type(role, c, meta.datatype)?;
                    check_declared_shape(role, c, &meta.shape, strict)?;
                    bind(&session, c, tensor)
                })
                .collect::<Result<Vec<_>, _>>()
        };
    let inputs = bind_spec(&spec.inputs, &sig.inputs, "input", true)?;
    let outputs = bind_spec(&spec.outputs, &sig.outputs, "output", false)?;
    // Every signature's tensors must exist in the graph, so a request for one never finds a
    // broken signature.
    for s in &signatures {
        for (meta, tensor) in s.inputs.iter().chain(&s.outputs) {
            session
                .endpoint(tensor)
                .map_err(|e| invalid_model(format!("signature '{}', tensor '{}': {e}", s.name, meta.name)))?;
        }
    }
    Ok(TfModel {
        model_name: spec.model_name.clone(),
        session: Arc::new(session),
        signatures,
        default,
        inputs,
        outputs,
    })
}

/// TensorFlow's load errors can run over several lines and name absolute paths.
fn summarize(message: &str) -> String {
    let joined: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    oxserve_backend::support::truncate(&joined.join(" "), 400)
}

impl LoadedModel for TfModel {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(TfInstance {
            model_name: self.model_name.clone(),
            session: Arc::clone(&self.session),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }))
    }

    fn entry_points(&self) -> Vec<EntryPoint> {
        self.signatures
            .iter()
            .map(|s| s.entry_point(s.name == self.default))
            .collect()
    }

    fn new_entry_instance(&self, entry: &str, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        let sig = self
            .signatures
            .iter()
            .find(|s| s.name == entry)
            .ok_or_else(|| invalid_input(format!("the model has no signature '{entry}'")))?;
        let bind_all = |tensors: &[(TensorMeta, String)]| {
            tensors
                .iter()
                .map(|(m, t)| bind(&self.session, m, t))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Box::new(TfInstance {
            model_name: self.model_name.clone(),
            session: Arc::clone(&self.session),
            inputs: bind_all(&sig.inputs)?,
            outputs: bind_all(&sig.outputs)?,
        }))
    }
}

/// One instance: a view of the shared session with one signature's bindings. Instances run
/// concurrently on their own threads; the session allows that.
struct TfInstance {
    model_name: String,
    session: Arc<Session>,
    inputs: Vec<Binding>,
    outputs: Vec<Binding>,
}

impl ModelInstance for TfInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        if batch.inputs.len() != self.inputs.len() {
            return Err(invalid_input(format!(
                "model '{}' takes {} inputs, got {}",
                self.model_name,
                self.inputs.len(),
                batch.inputs.len()
            )));
        }
        let api = Arc::clone(self.session.api());
        let mut feeds = Vec::with_capacity(self.inputs.len());
        for (binding, tensor) in self.inputs.iter().zip(&batch.inputs) {
            check_input(&binding.name, binding.datatype, &binding.shape, tensor)?;
            feeds.push((binding.endpoint, to_tensorflow(&api, binding, tensor)?));
        }
        let mut fetches = Vec::with_capacity(batch.outputs.len());
        for name in &batch.outputs {
            let binding = self.outputs.iter().find(|b| &b.name == name).ok_or_else(|| {
                invalid_input(format!("model '{}' has no output '{name}'", self.model_name))
            })?;
            fetches.push(binding);
        }
        let endpoints: Vec<Endpoint> = fetches.iter().map(|b| b.endpoint).collect();
        let feed_refs: Vec<(Endpoint, &OwnedTensor)> = feeds.iter().map(|(e, t)| (*e, t)).collect();
        let results = self
            .session
            .run(&feed_refs, &endpoints)
            .map_err(|(code, message)| run_error(code, &message))?;
        // Outputs are read before the inputs are freed: an output may share an input's buffer.
        let outputs = fetches
            .iter()
            .zip(results)
            .map(|(binding, result)| from_tensorflow(binding, result))
            .collect();
        drop(feeds);
        outputs
    }
}

/// TensorFlow's run errors: bad values (INVALID_ARGUMENT, OUT_OF_RANGE) are the client's;
/// anything else (a variable that was never restored, a kernel failure) is the model's. The
/// first line says what, the rest is graph context.
fn run_error(code: i32, message: &str) -> BackendError {
    const INVALID_ARGUMENT: i32 = 3;
    const OUT_OF_RANGE: i32 = 11;
    let first = message.lines().next().unwrap_or(message);
    let text = format!("TensorFlow: {}", oxserve_backend::support::truncate(first, 400));
    match code {
        INVALID_ARGUMENT | OUT_OF_RANGE => invalid_input(text),
        _ => internal(text),
    }
}

fn to_tensorflow(api: &Arc<Api>, binding: &Binding, tensor: &Tensor) -> Result<OwnedTensor, BackendError> {
    match (&tensor.data, tensor.datatype) {
        (TensorData::Strings(items), DataType::Bytes) => {
            OwnedTensor::from_strings(api, &tensor.shape, items).map_err(internal)
        }
        (TensorData::Raw(raw), dt) if dt != DataType::Bytes => {
            let owned =
                OwnedTensor::from_bytes(api, dt.tensorflow_code(), &tensor.shape, raw).map_err(internal)?;
            // Checked on our copy, which no client can change any more.
            if dt == DataType::Bool {
                check_bools(&binding.name, owned.bytes()).map_err(|e| invalid_input(e.message()))?;
            }
            Ok(owned)
        }
        (_, dt) => Err(invalid_input(format!(
            "input '{}': {dt} data in the wrong representation",
            binding.name
        ))),
    }
}

fn from_tensorflow(binding: &Binding, result: OwnedTensor) -> Result<Tensor, BackendError> {
    let name = binding.name.as_str();
    let datatype = DataType::from_tensorflow_code(result.dtype()).ok_or_else(|| {
        internal(format!(
            "output '{name}' has TensorFlow type {} which is not served",
            result.dtype()
        ))
    })?;
    if datatype != binding.datatype {
        return Err(internal(format!(
            "output '{name}' is {datatype}, its signature says {}",
            binding.datatype
        )));
    }
    let shape = result.dims();
    let count = element_count(&shape).map_err(|e| internal(e.message().to_string()))?;
    let data = match datatype.size() {
        None => TensorData::Strings(result.strings(count).map_err(internal)?),
        Some(size) => {
            let len = result.bytes().len();
            if count.checked_mul(size) != Some(len) {
                return Err(internal(format!(
                    "output '{name}' has {len} bytes for shape {shape:?} of {datatype}"
                )));
            }
            TensorData::Raw(if len == 0 {
                Bytes::new()
            } else {
                Bytes::from_owner(TensorBytes(result))
            })
        }
    };
    Ok(Tensor::new(name, datatype, shape, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_config_sleeps_idle_threads_unless_spinning_is_asked_for() {
        let mut settings = SessionSettings {
            tags: vec!["serve".into()],
            intra_op_threads: 2,
            inter_op_threads: 1,
            thread_spinning: false,
        };
        // ConfigProto on the wire: intra_op_parallelism_threads (2) = 2, inter_op (5) = 1,
        // experimental (16) { disable_thread_spinning (9) = true }.
        assert_eq!(
            session_config(&settings),
            [0x10, 2, 0x28, 1, 0x82, 0x01, 2, 0x48, 1]
        );
        settings.thread_spinning = true;
        // The switch false is TensorFlow's default: the Experimental message stays empty.
        assert_eq!(session_config(&settings), [0x10, 2, 0x28, 1, 0x82, 0x01, 0]);
    }
}
