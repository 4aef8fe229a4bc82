//! The TorchScript engine proper (compiled with the `libtorch` feature).

use std::path::Path;
use std::sync::{Arc, Once};

use oxserve_backend::support::{check_input, internal, invalid_input, invalid_model, unsupported};
use oxserve_backend::{Backend, BackendError, Batch, LoadSpec, LoadedModel, ModelInstance, ModelSignature};
use oxserve_core::{DataType, Tensor, TensorData, TensorMeta, check_bools, element_count};
use tch::{CModule, Device, IValue, Kind};

/// The engine's name, as in config.pbtxt's `backend` field (Triton's PyTorch backend).
pub const NAME: &str = "pytorch";

/// The TorchScript backend (CPU).
#[derive(Debug, Default)]
pub struct TorchBackend {
    _private: (),
}

impl TorchBackend {
    pub fn new() -> Self {
        TorchBackend::default()
    }
}

fn kind_of(dt: DataType) -> Option<Kind> {
    Some(match dt {
        DataType::Bool => Kind::Bool,
        DataType::U8 => Kind::Uint8,
        DataType::I8 => Kind::Int8,
        DataType::I16 => Kind::Int16,
        DataType::I32 => Kind::Int,
        DataType::I64 => Kind::Int64,
        DataType::F16 => Kind::Half,
        DataType::BF16 => Kind::BFloat16,
        DataType::F32 => Kind::Float,
        DataType::F64 => Kind::Double,
        DataType::U16 | DataType::U32 | DataType::U64 | DataType::Bytes => return None,
    })
}

fn data_type_of(kind: Kind) -> Option<DataType> {
    Some(match kind {
        Kind::Bool => DataType::Bool,
        Kind::Uint8 => DataType::U8,
        Kind::Int8 => DataType::I8,
        Kind::Int16 => DataType::I16,
        Kind::Int => DataType::I32,
        Kind::Int64 => DataType::I64,
        Kind::Half => DataType::F16,
        Kind::BFloat16 => DataType::BF16,
        Kind::Float => DataType::F32,
        Kind::Double => DataType::F64,
        _ => return None,
    })
}

/// `INPUT__3` → 3 (Triton's positional naming).
fn positional(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?.strip_prefix("__")?.parse().ok()
}

/// libtorch's thread pools are per process; the inter-op pool can be sized only once.
fn apply_threads(spec: &LoadSpec) -> Result<(), BackendError> {
    static INTEROP: Once = Once::new();
    let count = |key: &str| -> Result<Option<i32>, BackendError> {
        match spec.parameters.get(key) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<i32>()
                .ok()
                .filter(|n| *n > 0)
                .map(Some)
                .ok_or_else(|| {
                    invalid_model(format!("parameter '{key}' must be a positive integer, got '{v}'"))
                }),
        }
    };
    if let Some(n) = count("INTRA_OP_THREAD_COUNT")? {
        tch::set_num_threads(n);
    }
    if let Some(n) = count("INTER_OP_THREAD_COUNT")? {
        INTEROP.call_once(|| tch::set_num_interop_threads(n));
    }
    Ok(())
}

/// Where a configured output comes from in `forward`'s result.
#[derive(Debug, Clone)]
enum OutputSource {
    /// Element `i` of a tuple or list (or the tensor itself for 0).
    Index(usize),
    /// A dict's key, or the only result.
    Key(String),
}

pub(crate) struct TorchModel {
    model_name: String,
    module: Arc<CModule>,
    /// Batch input index for each `forward` argument, in argument order.
    arguments: Vec<usize>,
    inputs: Vec<TensorMeta>,
    outputs: Vec<(TensorMeta, OutputSource)>,
}

impl Backend for TorchBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    /// A TorchScript file does not declare its inputs and outputs; the configuration must.
    fn inspect(&self, model_path: &Path) -> Result<ModelSignature, BackendError> {
        if !model_path.is_file() {
            return Err(invalid_model(format!(
                "no TorchScript file {}",
                oxserve_backend::support::file_label(model_path)
            )));
        }
        Ok(ModelSignature::default())
    }

    fn declares_signature(&self) -> bool {
        false
    }

    fn load(&self, spec: &LoadSpec) -> Result<Box<dyn LoadedModel>, BackendError> {
        for t in spec.inputs.iter().chain(&spec.outputs) {
            if kind_of(t.datatype).is_none() {
                return Err(unsupported(format!(
                    "tensor '{}': {} is not a type the PyTorch engine serves",
                    t.name, t.datatype
                )));
            }
        }
        apply_threads(spec)?;
        // Inputs: INPUT__i by index, or all named and passed in configuration order.
        let indices: Vec<Option<usize>> = spec.inputs.iter().map(|t| positional(&t.name, "INPUT")).collect();
        let arguments = if indices.iter().all(Option::is_some) && !indices.is_empty() {
            let mut arguments = vec![usize::MAX; indices.len()];
            for (batch_index, i) in indices.iter().enumerate() {
                let i = i.unwrap_or(usize::MAX);
                if i >= arguments.len() || arguments[i] != usize::MAX {
                    return Err(invalid_model(
                        "inputs named INPUT__<i> must number 0 to N-1, each once".to_string(),
                    ));
                }
                arguments[i] = batch_index;
            }
            arguments
        } else {
            (0..spec.inputs.len()).collect()
        };
        let outputs = spec
            .outputs
            .iter()
            .map(|t| {
                let source = match positional(&t.name, "OUTPUT") {
                    Some(i) => OutputSource::Index(i),
                    None => OutputSource::Key(t.name.clone()),
                };
                (t.clone(), source)
            })
            .collect();
        let mut module = CModule::load_on_device(&spec.model_path, Device::Cpu).map_err(|e| {
            invalid_model(format!(
                "libtorch could not load {}: {}",
                oxserve_backend::support::file_label(&spec.model_path),
                first_line(&e.to_string())
            ))
        })?;
        module.set_eval();
        Ok(Box::new(TorchModel {
            model_name: spec.model_name.clone(),
            module: Arc::new(module),
            arguments,
            inputs: spec.inputs.clone(),
            outputs,
        }))
    }

    fn availability(&self) -> Result<String, BackendError> {
        Ok(format!("libtorch (tch {})", "0.26"))
    }
}

fn first_line(message: &str) -> String {
    let line = message
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(message);
    oxserve_backend::support::truncate(line, 400)
}

impl LoadedModel for TorchModel {
    fn new_instance(&self, _index: usize) -> Result<Box<dyn ModelInstance>, BackendError> {
        Ok(Box::new(TorchInstance {
            model_name: self.model_name.clone(),
            module: Arc::clone(&self.module),
            arguments: self.arguments.clone(),
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }))
    }
}

struct TorchInstance {
    model_name: String,
    module: Arc<CModule>,
    arguments: Vec<usize>,
    inputs: Vec<TensorMeta>,
    outputs: Vec<(TensorMeta, OutputSource)>,
}

fn to_torch(meta: &TensorMeta, tensor: &Tensor) -> Result<tch::Tensor, BackendError> {
    let kind = kind_of(meta.datatype)
        .ok_or_else(|| unsupported(format!("input '{}': type not served", meta.name)))?;
    let TensorData::Raw(raw) = &tensor.data else {
        return Err(invalid_input(format!("input '{}' holds byte strings", meta.name)));
    };
    // libtorch copies the bytes; BOOL values are checked on our own copy first, which no
    // client can change any more.
    let owned;
    let bytes: &[u8] = if meta.datatype == DataType::Bool {
        owned = raw.to_vec();
        check_bools(&meta.name, &owned).map_err(|e| invalid_input(e.message()))?;
        &owned
    } else {
        raw
    };
    tch::Tensor::f_from_data_size(bytes, &tensor.shape, kind)
        .map_err(|e| internal(format!("input '{}': {}", meta.name, first_line(&e.to_string()))))
}

fn from_torch(meta: &TensorMeta, value: &tch::Tensor) -> Result<Tensor, BackendError> {
    let name = meta.name.as_str();
    let datatype = data_type_of(value.kind()).ok_or_else(|| {
        internal(format!(
            "output '{name}' has libtorch type {:?}, not served",
            value.kind()
        ))
    })?;
    if datatype != meta.datatype {
        return Err(internal(format!(
            "output '{name}' is {datatype}, the configuration says {}",
            meta.datatype
        )));
    }
    let value = value.to_device(Device::Cpu).contiguous();
    let shape: Vec<i64> = value.size();
    let count = element_count(&shape).map_err(|e| internal(e.message().to_string()))?;
    let size = datatype.size().unwrap_or(1);
    let mut bytes = vec![0u8; count * size];
    value
        .f_copy_data_u8(&mut bytes, count)
        .map_err(|e| internal(format!("output '{name}': {}", first_line(&e.to_string()))))?;
    Ok(Tensor::new(name, datatype, shape, TensorData::Raw(bytes.into())))
}

/// The tensor a configured output names in `forward`'s result.
fn select<'a>(result: &'a IValue, source: &OutputSource, single: bool) -> Option<&'a tch::Tensor> {
    match (result, source) {
        (IValue::Tensor(t), OutputSource::Index(0)) => Some(t),
        (IValue::Tensor(t), OutputSource::Key(_)) if single => Some(t),
        (IValue::Tuple(items) | IValue::GenericList(items), OutputSource::Index(i)) => match items.get(*i)? {
            IValue::Tensor(t) => Some(t),
            _ => None,
        },
        (IValue::TensorList(items), OutputSource::Index(i)) => items.get(*i),
        (IValue::GenericDict(entries), OutputSource::Key(key)) => {
            entries.iter().find_map(|(k, v)| match (k, v) {
                (IValue::String(k), IValue::Tensor(t)) if k == key => Some(t),
                _ => None,
            })
        }
        // A list holding one dict: torchvision's detection models answer a dict per image, and
        // one image runs at a time (their results differ in length from image to image).
        (IValue::GenericList(items), OutputSource::Key(_)) if items.len() == 1 => {
            select(&items[0], source, single)
        }
        _ => None,
    }
}

impl ModelInstance for TorchInstance {
    fn execute(&mut self, batch: Batch) -> Result<Vec<Tensor>, BackendError> {
        if batch.inputs.len() != self.inputs.len() {
            return Err(invalid_input(format!(
                "model '{}' takes {} inputs, got {}",
                self.model_name,
                self.inputs.len(),
                batch.inputs.len()
            )));
        }
        for (meta, tensor) in self.inputs.iter().zip(&batch.inputs) {
            check_input(&meta.name, meta.datatype, &meta.shape, tensor)?;
        }
        let arguments = self
            .arguments
            .iter()
            .map(|&i| to_torch(&self.inputs[i], &batch.inputs[i]).map(IValue::Tensor))
            .collect::<Result<Vec<_>, _>>()?;
        let result = tch::no_grad(|| self.module.forward_is(&arguments))
            .map_err(|e| invalid_input(format!("libtorch: {}", first_line(&e.to_string()))))?;
        let single = self.outputs.len() == 1;
        batch
            .outputs
            .iter()
            .map(|name| {
                let (meta, source) = self
                    .outputs
                    .iter()
                    .find(|(m, _)| &m.name == name)
                    .ok_or_else(|| invalid_input(format!("model '{}' has no output '{name}'", self.model_name)))?;
                let tensor = select(&result, source, single).ok_or_else(|| {
                    internal(format!(
                        "the model's result has no tensor for output '{name}' (OUTPUT__<i> names an element of a tuple or list result, other names a key of a dict result)"
                    ))
                })?;
                from_torch(meta, tensor)
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn triton_positional_names() {
        assert_eq!(positional("INPUT__0", "INPUT"), Some(0));
        assert_eq!(positional("OUTPUT__12", "OUTPUT"), Some(12));
        assert_eq!(positional("INPUT0", "INPUT"), None);
        assert_eq!(positional("features", "INPUT"), None);
    }

    #[test]
    fn outputs_come_from_tuples_lists_dicts_or_the_one_tensor() {
        let a = tch::Tensor::from_slice(&[1f32, 2.]);
        let b = tch::Tensor::from_slice(&[3i64]);
        let tuple = IValue::Tuple(vec![
            IValue::Tensor(a.shallow_clone()),
            IValue::Tensor(b.shallow_clone()),
        ]);
        let picked = select(&tuple, &OutputSource::Index(1), false).unwrap();
        assert_eq!(picked.kind(), Kind::Int64);
        assert!(select(&tuple, &OutputSource::Index(2), false).is_none());
        let dict = IValue::GenericDict(vec![(
            IValue::String("probs".into()),
            IValue::Tensor(a.shallow_clone()),
        )]);
        assert!(select(&dict, &OutputSource::Key("probs".into()), false).is_some());
        assert!(select(&dict, &OutputSource::Key("other".into()), false).is_none());
        let one_image = IValue::GenericList(vec![dict]);
        assert!(select(&one_image, &OutputSource::Key("probs".into()), false).is_some());
        let single = IValue::Tensor(a.shallow_clone());
        assert!(select(&single, &OutputSource::Key("y".into()), true).is_some());
        assert!(select(&single, &OutputSource::Key("y".into()), false).is_none());
        let meta = TensorMeta {
            name: "y".into(),
            datatype: DataType::F32,
            shape: vec![-1],
        };
        let out = from_torch(&meta, &a).unwrap();
        assert_eq!(out.shape, [2]);
        assert_eq!(
            out.raw().unwrap().as_ref(),
            [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
        );
        let wrong = TensorMeta {
            datatype: DataType::I64,
            ..meta
        };
        assert!(from_torch(&wrong, &a).is_err());
    }
}
