//! The protocol-neutral request every adapter decodes its wire into, and the decisions about a
//! request that do not depend on the wire: version strings, datatypes, request and output
//! parameters (binary preference, classification, shared-memory placement).

use oxserve_core::{DataType, Error, ParamValue, Parameters, Result, TensorData, element_count};
use oxserve_engine::InferenceService;
use oxserve_shm::{ShmRef, check_output_place, take_shm_ref};

/// The request-level parameter asking for every output in binary form (Triton's binary
/// tensor data extension); taken out of the parameters the engine sees.
pub const BINARY_DATA_OUTPUT: &str = "binary_data_output";
/// The output parameter asking for one output in binary (true) or inline (false) form.
pub const BINARY_DATA: &str = "binary_data";
/// The output parameter of Triton's classification extension.
pub const CLASSIFICATION: &str = "classification";

/// A model (and version) that was found ready when the request arrived. Only
/// [`ModelTarget::resolve`] makes one, so every adapter looks the model up before it decodes
/// a request's tensors: an unknown model costs no decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTarget {
    name: String,
    version: Option<u64>,
}

impl ModelTarget {
    /// NOT_FOUND for an unknown model or version, UNAVAILABLE for one that is not ready.
    pub fn resolve(engine: &InferenceService, name: &str, version: Option<u64>) -> Result<ModelTarget> {
        engine.check_model_ready(name, version)?;
        Ok(ModelTarget {
            name: name.to_string(),
            version,
        })
    }

    /// The version a label of the model points at now (NOT_FOUND: unknown model or label;
    /// UNAVAILABLE: that version is not serving).
    pub fn resolve_label(engine: &InferenceService, name: &str, label: &str) -> Result<ModelTarget> {
        let version = engine.label_version(name, label)?;
        Self::resolve(engine, name, Some(version))
    }

    /// Applies a `version_label` request parameter (any protocol), taking it out of the
    /// parameters: the request then runs on the version the label points at. A request that
    /// also names a version is refused.
    pub fn with_label_parameter(
        self,
        engine: &InferenceService,
        parameters: &mut Parameters,
    ) -> Result<ModelTarget> {
        let Some(value) = parameters.remove(VERSION_LABEL) else {
            return Ok(self);
        };
        let ParamValue::String(label) = value else {
            return Err(Error::invalid(format!(
                "parameter '{VERSION_LABEL}' must be a string"
            )));
        };
        if let Some(version) = self.version {
            return Err(Error::invalid(format!(
                "the request names version {version} and parameter '{VERSION_LABEL}' '{label}': give one of them"
            )));
        }
        Self::resolve_label(engine, &self.name, &label)
    }

    /// A target that was not looked up: for clients that build requests without a server,
    /// and tests. The engine still resolves the model when the request runs.
    pub fn unchecked(name: impl Into<String>, version: Option<u64>) -> ModelTarget {
        ModelTarget {
            name: name.into(),
            version,
        }
    }

    /// [`ModelTarget::resolve`] with the version as the protocols carry it (see
    /// [`version_or_label`]).
    pub fn resolve_str(engine: &InferenceService, name: &str, version: &str) -> Result<ModelTarget> {
        Self::resolve(engine, name, version_or_label(engine, name, version)?)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `None`: the server picks the latest ready version.
    pub fn version(&self) -> Option<u64> {
        self.version
    }
}

/// The request parameter that names a version label instead of a version.
pub const VERSION_LABEL: &str = "version_label";

/// A protocol's version field, which may also name one of the model's version labels (so
/// every protocol with a version field reaches labels): empty = the server picks; a number;
/// else the label's version; else Triton's error for a malformed version.
pub fn version_or_label(engine: &InferenceService, name: &str, version: &str) -> Result<Option<u64>> {
    match parse_version(version) {
        Ok(v) => Ok(v),
        Err(e) => engine.label_version(name, version).map(Some).map_err(|_| e),
    }
}

/// Parses a model version as every protocol carries it: empty means "let the server pick"
/// (the latest ready version); anything else must be a non-negative integer. Triton's message.
pub fn parse_version(version: &str) -> Result<Option<u64>> {
    if version.is_empty() {
        return Ok(None);
    }
    version.parse::<u64>().map(Some).map_err(|_| {
        Error::invalid(format!(
            "failed to get model version from specified version string '{version}', \
             version should be an integral value > 0"
        ))
    })
}

/// The datatype named by a wire string (`FP32`, `BYTES`, ...).
pub fn parse_datatype(input: &str, datatype: &str) -> Result<DataType> {
    DataType::from_wire_name(datatype)
        .ok_or_else(|| Error::invalid(format!("input '{input}' has unknown datatype '{datatype}'")))
}

/// The element count of an input's shape; rejects negative dimensions and overflow before any
/// data is looked at.
pub fn input_elements(input: &str, shape: &[i64]) -> Result<usize> {
    element_count(shape).map_err(|e| Error::invalid(format!("input '{input}': {}", e.message())))
}

/// The error for an input that names a shared-memory region and also carries data in the
/// body, the same over every protocol.
pub fn shm_and_data_error(input: &str) -> Error {
    Error::invalid(format!(
        "input '{input}' names a shared memory region and also carries data"
    ))
}

/// Where an input's values are.
#[derive(Debug, Clone, PartialEq)]
pub enum InputData {
    /// Carried in the request itself (JSON data, a binary-extension slice of the body, gRPC
    /// typed or raw contents, a TF Serving or TorchServe payload), already decoded.
    Body(TensorData),
    /// In a registered shared-memory region; the runner reads it.
    SharedMemory(ShmRef),
}

/// One input of a decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedInput {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
    pub data: InputData,
}

impl DecodedInput {
    /// An input whose data came in the body: what TF Serving and TorchServe adapters make.
    pub fn body(name: impl Into<String>, datatype: DataType, shape: Vec<i64>, data: TensorData) -> Self {
        DecodedInput {
            name: name.into(),
            datatype,
            shape,
            data: InputData::Body(data),
        }
    }
}

/// One output the client asked for, with where and how it wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRequest {
    pub name: String,
    /// Triton's classification extension: the top N classes instead of the tensor.
    pub classification: Option<usize>,
    /// Per-output binary (true) or inline (false) preference; `None` follows the request's.
    pub binary: Option<bool>,
    /// Write the output into this shared-memory place instead of the response.
    pub shared_memory: Option<ShmRef>,
}

impl OutputRequest {
    /// An output asked for by name only.
    pub fn named(name: impl Into<String>) -> Self {
        OutputRequest {
            name: name.into(),
            classification: None,
            binary: None,
            shared_memory: None,
        }
    }

    /// Reads an output's parameters, the same over every protocol: shared-memory placement,
    /// `binary_data` and `classification` (which exclude shared memory). Other parameters
    /// are ignored, as in Triton.
    pub fn from_parameters(name: String, mut params: Parameters) -> Result<Self> {
        let shared_memory = take_shm_ref("output", &name, &mut params)?;
        let binary = take_bool(&mut params, BINARY_DATA)?;
        let classification = match params.remove(CLASSIFICATION) {
            None => None,
            Some(value) => parse_classification(&name, &value)?,
        };
        check_output_place(&name, shared_memory.as_ref(), classification)?;
        Ok(OutputRequest {
            name,
            classification,
            binary,
            shared_memory,
        })
    }
}

/// Triton's classification count. 0 asks for the plain tensor: what Triton's HTTP front-end
/// does (its "not set" value); Triton's gRPC front-end refuses 0, but answering the tensor
/// there too accepts every request Triton accepts on either protocol, with one rule for both.
/// Negative or non-integer values are refused.
pub fn parse_classification(output: &str, value: &ParamValue) -> Result<Option<usize>> {
    match value.as_i64() {
        Some(0) => Ok(None),
        Some(n) if n > 0 => usize::try_from(n).map(Some).map_err(|_| {
            Error::invalid(format!(
                "output '{output}': classification count {n} is too large"
            ))
        }),
        _ => Err(Error::invalid(format!(
            "output '{output}': parameter 'classification' must be a non-negative integer"
        ))),
    }
}

/// Takes a boolean parameter out of `params`; anything but a boolean is refused.
pub fn take_bool(params: &mut Parameters, key: &str) -> Result<Option<bool>> {
    match params.remove(key) {
        None => Ok(None),
        Some(ParamValue::Bool(b)) => Ok(Some(b)),
        Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a boolean"))),
    }
}

/// A request decoded from any protocol; [`crate::run`] takes it from here.
#[derive(Debug, Clone)]
pub struct DecodedRequest {
    pub target: ModelTarget,
    pub id: Option<String>,
    /// Request parameters for the engine (`priority`, `timeout`, ...), with the front-end's
    /// own (`binary_data_output`) taken out.
    pub parameters: Parameters,
    pub inputs: Vec<DecodedInput>,
    /// Empty: every output of the model, each placed by `binary_by_default`.
    pub outputs: Vec<OutputRequest>,
    /// The request-level binary preference (`binary_data_output`).
    pub binary_by_default: bool,
    /// The value of the model's traffic-split sticky header (see [`sticky_routing_key`]).
    pub routing_key: Option<String>,
    /// The model's entry point (a SavedModel signature): TF Serving's `signature_name`, or
    /// the `signature_name` request parameter of any protocol; `None`: the default one.
    pub signature: Option<String>,
    /// The request's trace (Triton's trace extension), when the trace settings sampled it.
    pub trace: Option<std::sync::Arc<oxserve_core::Trace>>,
}

/// The request parameter that picks a model's signature over protocols without a field for
/// it (KServe v2), as TF Serving's `signature_name`.
pub const SIGNATURE_NAME: &str = "signature_name";

impl DecodedRequest {
    /// A request for `target` with no inputs or outputs yet. `parameters` are the request's
    /// parameters as sent; the front-end's own are taken out here.
    pub fn new(target: ModelTarget, id: Option<String>, mut parameters: Parameters) -> Result<Self> {
        let binary_by_default = take_bool(&mut parameters, BINARY_DATA_OUTPUT)?.unwrap_or(false);
        let signature = match parameters.remove(SIGNATURE_NAME) {
            None => None,
            Some(ParamValue::String(name)) if name.is_empty() => None,
            Some(ParamValue::String(name)) => Some(name),
            Some(_) => {
                return Err(Error::invalid(format!(
                    "parameter '{SIGNATURE_NAME}' must be a string"
                )));
            }
        };
        Ok(DecodedRequest {
            target,
            id,
            parameters,
            inputs: Vec::new(),
            outputs: Vec::new(),
            binary_by_default,
            routing_key: None,
            signature,
            trace: None,
        })
    }
}

/// The routing key of a request for `model`: the value of the header its traffic split is
/// sticky by, looked up with `header` (HTTP headers or gRPC metadata by lowercase name).
pub fn sticky_routing_key<'h>(
    engine: &InferenceService,
    model: &str,
    header: impl Fn(&str) -> Option<&'h str>,
) -> Option<String> {
    let name = engine.sticky_header(model)?;
    header(&name).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, ParamValue)]) -> Parameters {
        pairs.iter().map(|(k, v)| ((*k).to_string(), v.clone())).collect()
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("").ok(), Some(None));
        assert_eq!(parse_version("3").ok(), Some(Some(3)));
        for bad in ["x", "-1", "1.5", " 2"] {
            let e = parse_version(bad).err().map(|e| e.message().to_string());
            assert!(
                e.as_deref().is_some_and(|m| m.contains(&format!("'{bad}'"))),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn classification_zero_is_the_plain_tensor_and_negative_is_refused() {
        assert_eq!(parse_classification("o", &ParamValue::Int(0)).ok(), Some(None));
        assert_eq!(parse_classification("o", &ParamValue::Int(3)).ok(), Some(Some(3)));
        assert_eq!(
            parse_classification("o", &ParamValue::Uint(2)).ok(),
            Some(Some(2))
        );
        for bad in [
            ParamValue::Int(-1),
            ParamValue::Bool(true),
            ParamValue::String("2".into()),
            ParamValue::Double(1.5),
        ] {
            let e = parse_classification("o", &bad).err();
            assert!(
                e.is_some_and(|e| e.message().contains("non-negative integer")),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn output_parameters() {
        let o = OutputRequest::from_parameters(
            "o".into(),
            params(&[
                (BINARY_DATA, ParamValue::Bool(false)),
                (CLASSIFICATION, ParamValue::Int(2)),
            ]),
        )
        .ok();
        assert_eq!(o.as_ref().and_then(|o| o.binary), Some(false));
        assert_eq!(o.and_then(|o| o.classification), Some(2));

        let shm = params(&[
            ("shared_memory_region", ParamValue::String("r".into())),
            ("shared_memory_byte_size", ParamValue::Int(16)),
        ]);
        let o = OutputRequest::from_parameters("o".into(), shm.clone()).ok();
        assert_eq!(
            o.and_then(|o| o.shared_memory),
            Some(ShmRef {
                region: "r".into(),
                offset: 0,
                byte_size: 16
            })
        );
        let mut both = shm;
        both.insert(CLASSIFICATION.into(), ParamValue::Int(1));
        let e = OutputRequest::from_parameters("o".into(), both).err();
        assert!(e.is_some_and(|e| e.message().contains("can't set both")));
        let e =
            OutputRequest::from_parameters("o".into(), params(&[(BINARY_DATA, ParamValue::Int(1))])).err();
        assert!(e.is_some_and(|e| e.message().contains("'binary_data' must be a boolean")));
    }

    #[test]
    fn request_parameters_lose_binary_data_output() {
        let target = ModelTarget {
            name: "m".into(),
            version: None,
        };
        let r = DecodedRequest::new(
            target.clone(),
            None,
            params(&[
                (BINARY_DATA_OUTPUT, ParamValue::Bool(true)),
                ("priority", ParamValue::Int(1)),
            ]),
        )
        .ok();
        assert_eq!(r.as_ref().map(|r| r.binary_by_default), Some(true));
        assert_eq!(
            r.map(|r| r.parameters.keys().cloned().collect::<Vec<_>>()),
            Some(vec!["priority".to_string()])
        );
        let e = DecodedRequest::new(target, None, params(&[(BINARY_DATA_OUTPUT, ParamValue::Int(1))])).err();
        assert!(e.is_some_and(|e| e.message().contains("must be a boolean")));
    }
}
