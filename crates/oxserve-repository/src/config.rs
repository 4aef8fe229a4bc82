//! `config.pbtxt` parsing (protobuf text format, via prost-reflect), Triton's JSON rendering
//! of the config, and the checks a config must pass before a model is loaded.

use std::collections::HashSet;

use oxserve_core::DataType;
use prost_reflect::{DeserializeOptions, DynamicMessage, SerializeOptions, text_format::ParseError};

use crate::{
    error::ConfigError,
    model_config_descriptor,
    pb::{self, model_version_policy::PolicyChoice},
    pbtxt,
};

/// Parses a `config.pbtxt`. Fields outside our schema are an error naming the field, so a
/// typo (or a Triton feature oxserve does not implement) is never silently ignored.
pub fn parse_config_text(text: &str) -> Result<pb::ModelConfig, ConfigError> {
    let (fixed, inserted) = pbtxt::add_list_colons(text);
    let message = DynamicMessage::parse_text_format(model_config_descriptor(), &fixed)
        .map_err(|e| parse_error(&e, text, &inserted))?;
    message
        .transcode_to::<pb::ModelConfig>()
        .map_err(|e| ConfigError::Parse {
            message: e.to_string(),
            position: None,
        })
}

fn parse_error(err: &ParseError, text: &str, inserted: &[usize]) -> ConfigError {
    let offset = miette::Diagnostic::labels(err)
        .and_then(|mut labels| labels.next())
        .map(|label| pbtxt::original_offset(label.offset(), inserted));
    let raw = err.to_string();
    ConfigError::Parse {
        message: unknown_field_message(&raw).unwrap_or(raw),
        position: offset.map(|o| line_column(text, o)),
    }
}

/// prost-reflect says "field 'x' not found for message 'inference.ModelConfig'"; users of a
/// config file know this as an unknown field. A field of Triton's schema that oxserve does not
/// implement is named as such, with the reason.
fn unknown_field_message(raw: &str) -> Option<String> {
    let rest = raw.strip_prefix("field '")?;
    let (field, message) = rest.split_once("' not found for message '")?;
    let message = message.strip_suffix('\'')?;
    Some(match triton_field_reason(message, field) {
        Some(reason) => format!("Triton's field '{field}' in {message} is not supported: {reason}"),
        None => format!("unknown field '{field}' in {message}"),
    })
}

/// Why a field of Triton's `model_config.proto` is outside oxserve's schema.
fn triton_field_reason(message: &str, field: &str) -> Option<&'static str> {
    Some(match (message, field) {
        ("inference.ModelConfig", "batch_input" | "batch_output") => {
            "ragged batching (batch_input, batch_output) is not supported"
        }
        ("inference.ModelConfig", "response_cache") => "the response cache is not supported",
        ("inference.ModelConfig", "runtime") => {
            "engines are built into oxserve, not loaded from a backend library"
        }
        ("inference.ModelConfig", "cc_model_filenames") => {
            "per-GPU-architecture model files are not supported; use default_model_filename"
        }
        ("inference.ModelConfig", "metric_tags") => "custom metric labels are not supported",
        ("inference.ModelConfig", "model_operations" | "model_repository_agents") => {
            "repository agents and model operations are not supported"
        }
        (
            "inference.ModelInstanceGroup",
            "rate_limiter" | "secondary_devices" | "profile" | "passive" | "host_policy",
        ) => "only name, kind, count and gpus are supported in an instance group",
        (
            "inference.ModelOptimizationPolicy",
            "priority"
            | "cuda"
            | "input_pinned_memory"
            | "output_pinned_memory"
            | "gather_kernel_buffer_threshold"
            | "eager_batching",
        ) => "only graph { level } and execution_accelerators are supported in optimization",
        _ => return None,
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line_start = before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

// Triton's shape for `GET /v2/models/M/config`: proto field names, enum names, 64-bit
// integers as numbers (Triton converts protobuf's "16" strings back), defaults included.
const JSON_OPTIONS: SerializeOptions = SerializeOptions::new()
    .use_proto_field_name(true)
    .stringify_64_bit_integers(false)
    .skip_default_fields(false);

fn to_dynamic(cfg: &pb::ModelConfig) -> DynamicMessage {
    let mut message = DynamicMessage::new(model_config_descriptor());
    // Same schema on both sides, so this only fails if the build is inconsistent.
    if let Err(e) = message.transcode_from(cfg) {
        tracing::error!(error = %e, "model config does not match its own descriptor");
    }
    message
}

/// The config as Triton's JSON (`GET /v2/models/M/config`), fields in declaration order.
pub fn config_to_json(cfg: &pb::ModelConfig) -> String {
    let mut serializer = serde_json::Serializer::new(Vec::new());
    if let Err(e) = to_dynamic(cfg).serialize_with_options(&mut serializer, &JSON_OPTIONS) {
        tracing::error!(error = %e, "cannot render model config as JSON");
        return "{}".to_owned();
    }
    String::from_utf8(serializer.into_inner()).unwrap_or_else(|_| "{}".to_owned())
}

/// The config as a JSON value, for embedding in a larger response.
pub fn config_to_json_value(cfg: &pb::ModelConfig) -> serde_json::Value {
    to_dynamic(cfg)
        .serialize_with_options(serde_json::value::Serializer, &JSON_OPTIONS)
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot render model config as JSON");
            serde_json::Value::Object(Default::default())
        })
}

/// Parses a config in protobuf JSON (as Triton's load API accepts it). Unknown fields are
/// an error; enums may be names or numbers; 64-bit integers may be numbers or strings.
pub fn config_from_json(s: &str) -> Result<pb::ModelConfig, ConfigError> {
    let json_error = |e: &dyn std::fmt::Display| ConfigError::Json(e.to_string());
    let mut deserializer = serde_json::Deserializer::from_str(s);
    let message = DynamicMessage::deserialize_with_options(
        model_config_descriptor(),
        &mut deserializer,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| json_error(&e))?;
    deserializer.end().map_err(|e| json_error(&e))?;
    message.transcode_to().map_err(|e| json_error(&e))
}

/// The domain type for a config `data_type`; `None` for TYPE_INVALID and unknown numbers.
pub fn data_type_of(data_type: i32) -> Option<DataType> {
    use pb::DataType as P;
    Some(match P::try_from(data_type).ok()? {
        P::TypeInvalid => return None,
        P::TypeBool => DataType::Bool,
        P::TypeUint8 => DataType::U8,
        P::TypeUint16 => DataType::U16,
        P::TypeUint32 => DataType::U32,
        P::TypeUint64 => DataType::U64,
        P::TypeInt8 => DataType::I8,
        P::TypeInt16 => DataType::I16,
        P::TypeInt32 => DataType::I32,
        P::TypeInt64 => DataType::I64,
        P::TypeFp16 => DataType::F16,
        P::TypeFp32 => DataType::F32,
        P::TypeFp64 => DataType::F64,
        P::TypeString => DataType::Bytes,
        P::TypeBf16 => DataType::BF16,
    })
}

/// The config `data_type` number for a domain type.
pub fn data_type_to_config(data_type: DataType) -> i32 {
    use pb::DataType as P;
    let p = match data_type {
        DataType::Bool => P::TypeBool,
        DataType::U8 => P::TypeUint8,
        DataType::U16 => P::TypeUint16,
        DataType::U32 => P::TypeUint32,
        DataType::U64 => P::TypeUint64,
        DataType::I8 => P::TypeInt8,
        DataType::I16 => P::TypeInt16,
        DataType::I32 => P::TypeInt32,
        DataType::I64 => P::TypeInt64,
        DataType::F16 => P::TypeFp16,
        DataType::BF16 => P::TypeBf16,
        DataType::F32 => P::TypeFp32,
        DataType::F64 => P::TypeFp64,
        DataType::Bytes => P::TypeString,
    };
    p as i32
}

/// Checks a config before loading. Inputs and outputs may be absent (the engine completes
/// them from the model file, then calls this again); any that are listed must be complete.
pub fn validate_config(cfg: &pb::ModelConfig) -> Result<(), ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        model: cfg.name.clone(),
        message,
    };
    if cfg.name.is_empty() {
        return Err(invalid("model name must not be empty".to_owned()));
    }
    if cfg.model_transaction_policy.is_some_and(|p| p.decoupled) {
        return Err(invalid(
            "model_transaction_policy { decoupled: true } is not supported: no engine in oxserve \
             answers a request with more than one response (decoupled: false loads)"
                .to_owned(),
        ));
    }
    if cfg.max_batch_size < 0 {
        return Err(invalid(format!(
            "max_batch_size must be >= 0, got {}",
            cfg.max_batch_size
        )));
    }

    let inputs = cfg.input.iter().map(|i| TensorSpec {
        name: &i.name,
        data_type: i.data_type,
        dims: &i.dims,
        reshape: i.reshape.as_ref(),
    });
    check_tensors("input", inputs).map_err(invalid)?;
    for input in &cfg.input {
        check_input_fields(input).map_err(invalid)?;
    }
    let outputs = cfg.output.iter().map(|o| TensorSpec {
        name: &o.name,
        data_type: o.data_type,
        dims: &o.dims,
        reshape: o.reshape.as_ref(),
    });
    check_tensors("output", outputs).map_err(invalid)?;
    for output in &cfg.output {
        if output.is_shape_tensor {
            return Err(invalid(format!(
                "output '{}': {SHAPE_TENSORS_UNSUPPORTED}",
                output.name
            )));
        }
        if !output.label_filename.is_empty() && !is_plain_file_name(&output.label_filename) {
            return Err(invalid(format!(
                "output '{}': label_filename '{}' must be a file name in the model directory",
                output.name, output.label_filename
            )));
        }
    }

    check_version_policy(cfg.version_policy.as_ref()).map_err(invalid)?;
    check_instance_groups(&cfg.instance_group).map_err(invalid)?;

    if !cfg.default_model_filename.is_empty() && !is_plain_file_name(&cfg.default_model_filename) {
        return Err(invalid(format!(
            "default_model_filename '{}' must be a file name in the version directory",
            cfg.default_model_filename
        )));
    }
    check_warmups(cfg).map_err(invalid)?;
    check_traffic(cfg).map_err(invalid)?;
    check_ensemble(cfg).map_err(invalid)?;
    for (label, version) in &cfg.version_labels {
        if !is_label_name(label) {
            return Err(invalid(format!(
                "version_labels: label '{label}' must be 1-64 letters, digits, '_', '-' or '.'"
            )));
        }
        if *version < 1 {
            return Err(invalid(format!(
                "version_labels: label '{label}' names version {version}; versions start at 1"
            )));
        }
    }
    Ok(())
}

/// Triton's ensemble rules: `platform: "ensemble"` and `ensemble_scheduling` go together; at
/// least one step; each step names a model and maps at least one input and one output; every
/// ensemble tensor is produced once (by the ensemble's inputs or one step output); every step
/// input and every ensemble output is produced; every ensemble input is used; no cycles.
fn check_ensemble(cfg: &pb::ModelConfig) -> Result<(), String> {
    use std::collections::{HashMap, HashSet};
    let scheduling = match &cfg.scheduling_choice {
        Some(pb::model_config::SchedulingChoice::EnsembleScheduling(e)) => Some(e),
        _ => None,
    };
    let is_ensemble = cfg.platform == "ensemble";
    let ensemble = match (is_ensemble, scheduling) {
        (false, None) => return Ok(()),
        (true, None) => return Err("an ensemble (platform \"ensemble\") needs ensemble_scheduling".into()),
        (false, Some(_)) => return Err("ensemble_scheduling is only for platform \"ensemble\"".into()),
        (true, Some(e)) => e,
    };
    if ensemble.step.is_empty() {
        return Err("ensemble_scheduling has no step".into());
    }
    // Which step (or the ensemble's inputs, None) produces each tensor.
    let mut producer: HashMap<&str, Option<usize>> = HashMap::new();
    for input in &cfg.input {
        producer.insert(&input.name, None);
    }
    for (i, step) in ensemble.step.iter().enumerate() {
        if step.model_name.is_empty() {
            return Err(format!("ensemble step {i} names no model"));
        }
        if step.model_version < -1 || step.model_version == 0 {
            return Err(format!(
                "ensemble step {i} ('{}'): model_version must be -1 (latest) or a version, got {}",
                step.model_name, step.model_version
            ));
        }
        if step.input_map.is_empty() || step.output_map.is_empty() {
            return Err(format!(
                "ensemble step {i} ('{}') must map at least one input and one output",
                step.model_name
            ));
        }
        for tensor in step.output_map.values() {
            if producer.insert(tensor, Some(i)).is_some() {
                return Err(format!(
                    "ensemble tensor '{tensor}' is produced more than once (step {i}, '{}')",
                    step.model_name
                ));
            }
        }
    }
    let mut used: HashSet<&str> = HashSet::new();
    for (i, step) in ensemble.step.iter().enumerate() {
        for tensor in step.input_map.values() {
            if !producer.contains_key(tensor.as_str()) {
                return Err(format!(
                    "ensemble step {i} ('{}') reads tensor '{tensor}', which no ensemble input or step produces",
                    step.model_name
                ));
            }
            used.insert(tensor);
        }
    }
    for output in &cfg.output {
        if !producer.contains_key(output.name.as_str()) {
            return Err(format!(
                "ensemble output '{}' is not produced by any step",
                output.name
            ));
        }
        used.insert(&output.name);
    }
    for input in &cfg.input {
        if !used.contains(input.name.as_str()) {
            return Err(format!("ensemble input '{}' is not used by any step", input.name));
        }
    }
    // Cycles: a step may only read tensors whose producer chain ends at the ensemble inputs.
    let mut ready: HashSet<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
    let mut done = vec![false; ensemble.step.len()];
    loop {
        let mut progressed = false;
        for (i, step) in ensemble.step.iter().enumerate() {
            if !done[i] && step.input_map.values().all(|t| ready.contains(t.as_str())) {
                done[i] = true;
                progressed = true;
                ready.extend(step.output_map.values().map(String::as_str));
            }
        }
        if !progressed {
            break;
        }
    }
    if let Some(i) = done.iter().position(|d| !d) {
        return Err(format!(
            "ensemble step {i} ('{}') is part of a cycle: its inputs depend on its own outputs",
            ensemble.step[i].model_name
        ));
    }
    Ok(())
}

/// A traffic split's or shadow's target: a version number or a label.
fn is_version_or_label(key: &str) -> bool {
    key.parse::<u64>().is_ok_and(|v| v > 0) || is_label_name(key)
}

/// `traffic_split` and `shadow` (our extensions): targets that can name a version, weights
/// that add up to something, a share between 0 and 1.
fn check_traffic(cfg: &pb::ModelConfig) -> Result<(), String> {
    if let Some(split) = &cfg.traffic_split {
        check_traffic_split(
            split.weights.iter().map(|(k, w)| (k.as_str(), *w)),
            &split.sticky_header,
        )?;
    }
    if let Some(shadow) = &cfg.shadow {
        check_shadow(&shadow.version, shadow.share)?;
    }
    Ok(())
}

/// The rules of a traffic split, in config.pbtxt or set at run time: targets that can name a
/// version, weights that add up to something (and fit a u32), a lowercase header name
/// (`""`: not sticky).
pub fn check_traffic_split<'a>(
    weights: impl Iterator<Item = (&'a str, u32)>,
    sticky_header: &str,
) -> Result<(), String> {
    let mut total = 0u64;
    for (target, weight) in weights {
        if !is_version_or_label(target) {
            return Err(format!(
                "traffic_split: '{target}' is neither a version number nor a label name"
            ));
        }
        total += u64::from(weight);
    }
    if total == 0 {
        return Err("traffic_split needs at least one version or label with a weight above 0".to_owned());
    }
    if total > u64::from(u32::MAX) {
        return Err("traffic_split: the weights add up to more than 4294967295".to_owned());
    }
    let header_ok = sticky_header
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if !header_ok {
        return Err(format!(
            "traffic_split: sticky_header '{sticky_header}' must be a lowercase header name"
        ));
    }
    Ok(())
}

/// The rules of a shadow, in config.pbtxt or set at run time.
pub fn check_shadow(version: &str, share: f64) -> Result<(), String> {
    if !is_version_or_label(version) {
        return Err(format!(
            "shadow: version '{version}' is neither a version number nor a label name"
        ));
    }
    if !(0.0..=1.0).contains(&share) {
        return Err(format!("shadow: share {share} must be between 0 and 1"));
    }
    Ok(())
}

/// A version label usable in a URL path segment and a header.
pub fn is_label_name(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && label != "."
        && label != ".."
}

/// Triton's rules for `model_warmup`: fixed dims, one data source per input, a batch size
/// the model takes, and `input_data_file` a plain file name (in `<model>/warmup/`).
fn check_warmups(cfg: &pb::ModelConfig) -> Result<(), String> {
    use pb::model_warmup::input::InputDataType;
    for warmup in &cfg.model_warmup {
        let what = format!("model_warmup '{}'", warmup.name);
        if warmup.name.is_empty() {
            return Err("a model_warmup needs a name".to_owned());
        }
        if warmup.inputs.is_empty() {
            return Err(format!("{what} has no inputs"));
        }
        if cfg.max_batch_size > 0 {
            if warmup.batch_size < 1 || warmup.batch_size > cfg.max_batch_size as u32 {
                return Err(format!(
                    "{what}: batch_size {} must be between 1 and max_batch_size {}",
                    warmup.batch_size, cfg.max_batch_size
                ));
            }
        } else if warmup.batch_size > 1 {
            return Err(format!(
                "{what}: batch_size {} needs a model that batches (max_batch_size is 0)",
                warmup.batch_size
            ));
        }
        for (name, input) in &warmup.inputs {
            if data_type_of(input.data_type).is_none() {
                return Err(format!("{what}: input '{name}' needs a data_type"));
            }
            if input.dims.iter().any(|&d| d < 0) {
                return Err(format!(
                    "{what}: input '{name}' dims {:?} must be fixed (no -1)",
                    input.dims
                ));
            }
            match &input.input_data_type {
                None => {
                    return Err(format!(
                        "{what}: input '{name}' needs one of zero_data, random_data or input_data_file"
                    ));
                }
                Some(InputDataType::InputDataFile(file)) if !is_plain_file_name(file) => {
                    return Err(format!(
                        "{what}: input '{name}' input_data_file '{file}' must be a file name in the model's warmup directory"
                    ));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

const SHAPE_TENSORS_UNSUPPORTED: &str = "is_shape_tensor is not supported (shape tensors are a \
     TensorRT feature; the engines here read every input as data)";

/// The input fields beyond name, type and shape: each is acted on or rejected with the reason,
/// never accepted and ignored.
fn check_input_fields(input: &pb::ModelInput) -> Result<(), String> {
    use pb::model_input::Format;
    let name = &input.name;
    match Format::try_from(input.format) {
        Err(_) => return Err(format!("input '{name}': unknown format {}", input.format)),
        // Triton's rule: an image layout describes three dims (without the batch dimension).
        // Like Triton, oxserve does not transpose anything: the format is published in the
        // model configuration for clients that lay out images by it.
        Ok(format @ (Format::Nhwc | Format::Nchw)) if input.dims.len() != 3 => {
            return Err(format!(
                "input '{name}': {} needs 3 dims (without the batch dimension), got {:?}",
                format.as_str_name(),
                input.dims
            ));
        }
        Ok(_) => {}
    }
    if input.is_shape_tensor {
        return Err(format!("input '{name}': {SHAPE_TENSORS_UNSUPPORTED}"));
    }
    if input.allow_ragged_batch {
        return Err(format!(
            "input '{name}': allow_ragged_batch is not supported (ragged batching needs \
             batch_input, which oxserve does not implement); without it, requests batch together \
             only when their shapes match"
        ));
    }
    if input.optional {
        return Err(format!(
            "input '{name}': optional inputs are not supported; every input must be sent"
        ));
    }
    Ok(())
}

/// True for a single path component that stays inside its directory.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

struct TensorSpec<'a> {
    name: &'a str,
    data_type: i32,
    dims: &'a [i64],
    reshape: Option<&'a pb::ModelTensorReshape>,
}

fn check_tensors<'a>(kind: &str, tensors: impl Iterator<Item = TensorSpec<'a>>) -> Result<(), String> {
    let mut seen = HashSet::new();
    for (index, t) in tensors.enumerate() {
        if t.name.is_empty() {
            return Err(format!("{kind} #{index} has no name"));
        }
        if !seen.insert(t.name) {
            return Err(format!("duplicate {kind} '{}'", t.name));
        }
        let name = t.name;
        if data_type_of(t.data_type).is_none() {
            return Err(if t.data_type == pb::DataType::TypeInvalid as i32 {
                format!("{kind} '{name}': data_type must be set")
            } else {
                format!("{kind} '{name}': unknown data_type {}", t.data_type)
            });
        }
        if t.dims.is_empty() && t.reshape.is_none() {
            return Err(format!(
                "{kind} '{name}': dims must not be empty (for a scalar use dims: [ 1 ] with reshape: {{ shape: [ ] }})"
            ));
        }
        if let Some(d) = t.dims.iter().find(|&&d| d < -1) {
            return Err(format!(
                "{kind} '{name}': dims {:?} has invalid dimension {d} (must be >= -1)",
                t.dims
            ));
        }
        if let Some(reshape) = t.reshape {
            if let Some(d) = reshape.shape.iter().find(|&&d| d < -1) {
                return Err(format!(
                    "{kind} '{name}': reshape {:?} has invalid dimension {d} (must be >= -1)",
                    reshape.shape
                ));
            }
            if let (Some(from), Some(to)) = (known_elements(t.dims), known_elements(&reshape.shape))
                && from != to
            {
                return Err(format!(
                    "{kind} '{name}': reshape {:?} has {to} elements but dims {:?} has {from}",
                    reshape.shape, t.dims
                ));
            }
        }
    }
    Ok(())
}

/// Element count of a shape with no variable (-1) dimensions; `None` if any is variable or
/// the count overflows. An empty shape is a scalar: one element.
fn known_elements(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| {
        let d = u64::try_from(d).ok()?;
        acc.checked_mul(d)
    })
}

fn check_version_policy(policy: Option<&pb::ModelVersionPolicy>) -> Result<(), String> {
    match policy.and_then(|p| p.policy_choice.as_ref()) {
        Some(PolicyChoice::Latest(latest)) if latest.num_versions < 1 => {
            Err("version_policy latest: num_versions must be >= 1".to_owned())
        }
        Some(PolicyChoice::Specific(specific)) => {
            if specific.versions.is_empty() {
                return Err("version_policy specific: versions must not be empty".to_owned());
            }
            match specific.versions.iter().find(|&&v| v <= 0) {
                Some(v) => Err(format!(
                    "version_policy specific: version {v} is invalid (versions are >= 1)"
                )),
                None => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

fn check_instance_groups(groups: &[pb::ModelInstanceGroup]) -> Result<(), String> {
    for (index, group) in groups.iter().enumerate() {
        let label = if group.name.is_empty() {
            format!("instance_group #{index}")
        } else {
            format!("instance_group '{}'", group.name)
        };
        if group.count < 0 {
            return Err(format!("{label}: count must be >= 0, got {}", group.count));
        }
        if pb::model_instance_group::Kind::try_from(group.kind).is_err() {
            return Err(format!("{label}: unknown kind {}", group.kind));
        }
        if let Some(gpu) = group.gpus.iter().find(|&&g| g < 0) {
            return Err(format!("{label}: invalid gpu {gpu}"));
        }
        let kind = pb::model_instance_group::Kind::try_from(group.kind);
        if kind == Ok(pb::model_instance_group::Kind::Model) {
            return Err(format!(
                "{label}: KIND_MODEL is not supported (it leaves device placement to the model \
                 file, as TensorFlow and PyTorch models can; use KIND_CPU, KIND_GPU or KIND_AUTO)"
            ));
        }
        // Triton's rule: gpus place GPU instances; on a CPU group they would be ignored.
        if kind == Ok(pb::model_instance_group::Kind::Cpu) && !group.gpus.is_empty() {
            return Err(format!(
                "{label}: kind KIND_CPU but gpus {:?} are listed; use KIND_GPU or remove gpus",
                group.gpus
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pb::{model_input::Format, model_instance_group::Kind};

    // Triton's docs/examples/model_repository/simple, on ONNX Runtime.
    const SIMPLE: &str = r#"
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "INPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_INT32
    dims: [ 16 ]
  },
  {
    name: "OUTPUT1"
    data_type: TYPE_INT32
    dims: [ 16 ]
  }
]
"#;

    // Triton's densenet_onnx example: no batching, reshape, labels, `key : value` spacing.
    const DENSENET: &str = r#"
name: "densenet_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 0
input [
  {
    name: "data_0"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
    reshape { shape: [ 1, 3, 224, 224 ] }
  }
]
output [
  {
    name: "fc6_1"
    data_type: TYPE_FP32
    dims: [ 1000 ]
    reshape { shape: [ 1, 1000, 1, 1 ] }
    label_filename: "densenet_labels.txt"
  }
]
"#;

    fn parse(text: &str) -> pb::ModelConfig {
        parse_config_text(text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse_config_text(text).unwrap_err().to_string()
    }

    fn invalid(cfg: &pb::ModelConfig) -> String {
        validate_config(cfg).unwrap_err().to_string()
    }

    #[test]
    fn parses_triton_simple_example() {
        let cfg = parse(SIMPLE);
        assert_eq!(cfg.name, "simple");
        assert_eq!(cfg.platform, "onnxruntime_onnx");
        assert_eq!(cfg.max_batch_size, 8);
        let names: Vec<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["INPUT0", "INPUT1"]);
        assert_eq!(cfg.input[1].data_type, pb::DataType::TypeInt32 as i32);
        assert_eq!(cfg.input[1].dims, [16]);
        assert_eq!(cfg.output.len(), 2);
        assert_eq!(cfg.output[0].name, "OUTPUT0");
        assert!(cfg.version_policy.is_none());
        validate_config(&cfg).unwrap();
    }

    #[test]
    fn parses_reshape_format_and_label_filename() {
        let cfg = parse(DENSENET);
        assert_eq!(cfg.max_batch_size, 0);
        let input = &cfg.input[0];
        assert_eq!(input.format, Format::Nchw as i32);
        assert_eq!(input.dims, [3, 224, 224]);
        assert_eq!(input.reshape.as_ref().unwrap().shape, [1, 3, 224, 224]);
        assert_eq!(cfg.output[0].label_filename, "densenet_labels.txt");
        assert_eq!(cfg.output[0].reshape.as_ref().unwrap().shape, [1, 1000, 1, 1]);
        validate_config(&cfg).unwrap();
    }

    #[test]
    fn parses_version_policies() {
        let policy = |text: &str| parse(text).version_policy.unwrap().policy_choice.unwrap();
        assert_eq!(
            policy("version_policy: { latest: { num_versions: 2 } }"),
            PolicyChoice::Latest(pb::model_version_policy::Latest { num_versions: 2 })
        );
        assert_eq!(
            policy("version_policy { all { } }"),
            PolicyChoice::All(pb::model_version_policy::All {})
        );
        assert_eq!(
            policy("version_policy: { specific: { versions: [ 1, 3 ] } }"),
            PolicyChoice::Specific(pb::model_version_policy::Specific { versions: vec![1, 3] })
        );
        // The oneof takes one choice.
        let err = parse_err("version_policy { all { } latest { num_versions: 1 } }");
        assert!(err.contains("policy_choice"), "{err}");
    }

    #[test]
    fn parses_instance_groups_and_parameters() {
        let cfg = parse(
            r#"
name: "m"
backend: "onnxruntime"
instance_group [
  { count: 2 kind: KIND_CPU },
  { name: "gpu_group" kind: KIND_GPU gpus: [ 0, 1 ] }
]
default_model_filename: "net.onnx"
parameters { key: "k" value: { string_value: "v" } }
parameters: { key: "intra_op_thread_count" value: { string_value: "4" } }
# a comment
"#,
        );
        assert_eq!(cfg.backend, "onnxruntime");
        assert_eq!(cfg.instance_group.len(), 2);
        assert_eq!(cfg.instance_group[0].count, 2);
        assert_eq!(cfg.instance_group[0].kind, Kind::Cpu as i32);
        assert_eq!(cfg.instance_group[1].name, "gpu_group");
        assert_eq!(cfg.instance_group[1].gpus, [0, 1]);
        assert_eq!(cfg.default_model_filename, "net.onnx");
        assert_eq!(cfg.parameters["k"].string_value, "v");
        assert_eq!(cfg.parameters["intra_op_thread_count"].string_value, "4");
        validate_config(&cfg).unwrap();
    }

    #[test]
    fn parses_tritons_graph_optimization_level() {
        let cfg = parse("name: \"m\"\noptimization { graph { level: -1 } }\n");
        assert_eq!(cfg.optimization.unwrap().graph.unwrap().level, -1);
        let cfg = parse("name: \"m\"\noptimization { graph : { level : 2 } }\n");
        assert_eq!(cfg.optimization.unwrap().graph.unwrap().level, 2);
        assert!(parse("name: \"m\"").optimization.is_none());
        // Only the graph level is part of the subset: other policies are fields of Triton's
        // that oxserve does not implement, named as such.
        let err = parse_err("optimization { priority: PRIORITY_MAX }");
        assert!(err.contains("Triton's field 'priority'"), "{err}");
        assert!(err.contains("is not supported"), "{err}");
        let json = config_to_json_value(&parse("name: \"m\"\noptimization { graph { level: 1 } }"));
        assert_eq!(json["optimization"]["graph"]["level"], 1);
        validate_config(&parse("name: \"m\"\noptimization { graph { level: 1 } }")).unwrap();
    }

    #[test]
    fn parses_tritons_execution_accelerators() {
        let text = r#"
name: "m"
optimization { execution_accelerators {
  gpu_execution_accelerator : [ {
    name : "cuda"
    parameters { key: "use_tf32" value: "0" }
    parameters { key: "cudnn_conv_use_max_workspace" value: "1" }
  } ]
} }
"#;
        let cfg = parse(text);
        let accelerators = cfg
            .optimization
            .as_ref()
            .unwrap()
            .execution_accelerators
            .as_ref()
            .unwrap();
        let cuda = &accelerators.gpu_execution_accelerator[0];
        assert_eq!(cuda.name, "cuda");
        assert_eq!(cuda.parameters["use_tf32"], "0");
        assert_eq!(cuda.parameters["cudnn_conv_use_max_workspace"], "1");
        assert!(accelerators.cpu_execution_accelerator.is_empty());
        validate_config(&cfg).unwrap();
        let json = config_to_json_value(&cfg);
        assert_eq!(
            json["optimization"]["execution_accelerators"]["gpu_execution_accelerator"][0]["parameters"]["use_tf32"],
            "0"
        );
    }

    #[test]
    fn unknown_field_is_named_with_position() {
        let err = parse_err("name: \"m\"\nmax_batch_size: 4\ndynamic_batchin { }\n");
        assert_eq!(
            err,
            "config.pbtxt: unknown field 'dynamic_batchin' in inference.ModelConfig at line 3, column 1"
        );
        // Nested: names the message the field was found in.
        let err = parse_err("input [ { name: \"x\" data_type: TYPE_FP32 dim: [ 1 ] } ]");
        assert_eq!(
            err,
            "config.pbtxt: unknown field 'dim' in inference.ModelInput at line 1, column 42"
        );
    }

    #[test]
    fn tritons_unimplemented_fields_say_why() {
        let err = parse_err("name: \"m\"\nresponse_cache { }\n");
        assert_eq!(
            err,
            "config.pbtxt: Triton's field 'response_cache' in inference.ModelConfig is not \
             supported: the response cache is not supported at line 2, column 1"
        );
        for (text, reason) in [
            ("batch_input [ { } ]", "ragged batching"),
            ("response_cache { }", "response cache"),
            (
                "instance_group [ { rate_limiter { } } ]",
                "only name, kind, count and gpus",
            ),
            (
                "optimization { cuda { } }",
                "only graph { level } and execution_accelerators",
            ),
        ] {
            let err = parse_err(text);
            assert!(err.contains("is not supported"), "{text}: {err}");
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    /// Triton fields that parse but that oxserve cannot honour: each one is a load error with
    /// the reason, never accepted and ignored.
    #[test]
    fn fields_that_cannot_act_are_rejected_with_the_reason() {
        let check = |text: &str| {
            let mut cfg = parse(text);
            cfg.name = "m".into();
            validate_config(&cfg).map_err(|e| e.to_string())
        };
        let input = |extra: &str| {
            format!("input [ {{ name: \"x\" data_type: TYPE_FP32 dims: [ 3, 4, 4 ] {extra} }} ]")
        };
        for (extra, reason) in [
            (
                "is_shape_tensor: true",
                "input 'x': is_shape_tensor is not supported",
            ),
            (
                "allow_ragged_batch: true",
                "input 'x': allow_ragged_batch is not supported",
            ),
            ("optional: true", "input 'x': optional inputs are not supported"),
        ] {
            let err = check(&input(extra)).unwrap_err();
            assert!(err.contains(reason), "{extra}: {err}");
        }
        let err = check("output [ { name: \"y\" data_type: TYPE_FP32 dims: [ 1 ] is_shape_tensor: true } ]")
            .unwrap_err();
        assert!(
            err.contains("output 'y': is_shape_tensor is not supported"),
            "{err}"
        );

        // format: FORMAT_NONE is the default; an image layout is Triton's published metadata
        // and needs three dims, as Triton checks.
        assert!(check(&input("format: FORMAT_NONE")).is_ok());
        assert!(check(&input("format: FORMAT_NCHW")).is_ok());
        assert!(check(&input("format: FORMAT_NHWC")).is_ok());
        let err = check("input [ { name: \"x\" data_type: TYPE_FP32 format: FORMAT_NHWC dims: [ 16 ] } ]")
            .unwrap_err();
        assert!(err.contains("FORMAT_NHWC needs 3 dims"), "{err}");

        let err = check("instance_group [ { kind: KIND_MODEL } ]").unwrap_err();
        assert!(err.contains("KIND_MODEL is not supported"), "{err}");
        let err = check("instance_group [ { kind: KIND_CPU gpus: [ 0 ] } ]").unwrap_err();
        assert!(err.contains("kind KIND_CPU but gpus [0] are listed"), "{err}");
        assert!(check("instance_group [ { kind: KIND_GPU gpus: [ 0 ] } ]").is_ok());
        assert!(check("instance_group [ { kind: KIND_AUTO } ]").is_ok());

        let warmup = |batch: u32, input: &str| {
            check(&format!(
                "max_batch_size: 4 model_warmup [ {{ name: \"w\" batch_size: {batch} inputs {{ key: \"x\" value: {{ {input} }} }} }} ]"
            ))
        };
        assert!(warmup(1, "data_type: TYPE_FP32 dims: [ 4 ] zero_data: true").is_ok());
        assert!(warmup(4, "data_type: TYPE_FP32 dims: [ 4 ] input_data_file: \"x.bin\"").is_ok());
        let err = warmup(5, "data_type: TYPE_FP32 dims: [ 4 ] zero_data: true").unwrap_err();
        assert!(err.contains("between 1 and max_batch_size 4"), "{err}");
        let err = warmup(1, "data_type: TYPE_FP32 dims: [ -1 ] zero_data: true").unwrap_err();
        assert!(err.contains("must be fixed"), "{err}");
        let err = warmup(1, "data_type: TYPE_FP32 dims: [ 4 ]").unwrap_err();
        assert!(err.contains("needs one of zero_data"), "{err}");
        let err = warmup(1, "data_type: TYPE_FP32 dims: [ 4 ] input_data_file: \"../x\"").unwrap_err();
        assert!(err.contains("warmup directory"), "{err}");
    }

    #[test]
    fn malformed_text_is_an_error_with_position() {
        let err = parse_err("name: \"m\"\nmax_batch_size: \"eight\"\n");
        assert!(err.starts_with("config.pbtxt: expected "), "{err}");
        assert!(err.ends_with("at line 2, column 17"), "{err}");

        let err = parse_err("input [ { name: \"x\" ");
        assert!(err.contains("end of input"), "{err}");

        let err = parse_err("input [ { data_type: TYPE_FLOAT32 } ]");
        assert!(err.contains("TYPE_FLOAT32"), "{err}");
        assert!(err.contains("line 1, column 22"), "{err}");
    }

    #[test]
    fn json_has_tritons_shape() {
        let json: serde_json::Value = serde_json::from_str(&config_to_json(&parse(DENSENET))).unwrap();
        assert_eq!(json["name"], "densenet_onnx");
        assert_eq!(json["max_batch_size"], 0, "defaults are included, as numbers");
        assert_eq!(json["backend"], "");
        let input = &json["input"][0];
        assert_eq!(input["data_type"], "TYPE_FP32");
        assert_eq!(input["format"], "FORMAT_NCHW");
        assert_eq!(input["dims"], serde_json::json!([3, 224, 224]));
        assert_eq!(input["reshape"]["shape"], serde_json::json!([1, 3, 224, 224]));
        assert_eq!(input["is_shape_tensor"], false);
        assert_eq!(json["output"][0]["label_filename"], "densenet_labels.txt");
        assert_eq!(json["instance_group"], serde_json::json!([]));
        assert_eq!(json["parameters"], serde_json::json!({}));

        let simple = config_to_json_value(&parse(SIMPLE));
        assert_eq!(simple["max_batch_size"], 8);
        assert_eq!(simple["input"][0]["data_type"], "TYPE_INT32");
        assert_eq!(simple["input"][0]["dims"], serde_json::json!([16]));
    }

    #[test]
    fn json_round_trips_and_rejects_unknown_fields() {
        let mut cfg = parse(DENSENET);
        cfg.version_policy = Some(pb::ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Specific(pb::model_version_policy::Specific {
                versions: vec![2, 5],
            })),
        });
        cfg.parameters.insert(
            "k".into(),
            pb::ModelParameter {
                string_value: "v".into(),
            },
        );
        let json = config_to_json(&cfg);
        assert_eq!(config_from_json(&json).unwrap(), cfg);
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            json["version_policy"],
            serde_json::json!({"specific": {"versions": [2, 5]}})
        );
        assert_eq!(json["parameters"]["k"]["string_value"], "v");

        let err = config_from_json(r#"{"name": "m", "max_batch_sise": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_batch_sise"), "{err}");
        assert!(config_from_json(r#"{"name": "m"} trailing"#).is_err());
    }

    #[test]
    fn data_types_map_both_ways() {
        for dt in DataType::ALL {
            let number = data_type_to_config(dt);
            assert_eq!(data_type_of(number), Some(dt));
            let proto = pb::DataType::try_from(number).unwrap();
            assert_eq!(proto.as_str_name(), dt.config_name());
        }
        assert_eq!(data_type_of(0), None);
        assert_eq!(data_type_of(15), None);
        assert_eq!(data_type_to_config(DataType::Bytes), 13);
        assert_eq!(data_type_to_config(DataType::BF16), 14);
    }

    #[test]
    fn config_without_tensors_is_valid() {
        let cfg = pb::ModelConfig {
            name: "m".into(),
            ..Default::default()
        };
        validate_config(&cfg).unwrap();
        let unnamed = pb::ModelConfig::default();
        assert!(invalid(&unnamed).contains("model name must not be empty"));
    }

    #[test]
    fn validate_rejects_bad_tensors() {
        let base = parse(SIMPLE);
        let check = |edit: &dyn Fn(&mut pb::ModelConfig), expected: &str| {
            let mut cfg = base.clone();
            edit(&mut cfg);
            let err = invalid(&cfg);
            assert!(err.starts_with("invalid config for model 'simple': "), "{err}");
            assert!(err.contains(expected), "expected '{expected}' in '{err}'");
        };
        check(&|c| c.max_batch_size = -1, "max_batch_size must be >= 0, got -1");
        check(
            &|c| c.model_transaction_policy = Some(pb::ModelTransactionPolicy { decoupled: true }),
            "decoupled: true } is not supported",
        );
        check(&|c| c.input[1].name.clear(), "input #1 has no name");
        check(
            &|c| c.output[1].name = "OUTPUT0".into(),
            "duplicate output 'OUTPUT0'",
        );
        check(
            &|c| c.input[0].data_type = 0,
            "input 'INPUT0': data_type must be set",
        );
        check(
            &|c| c.output[0].data_type = 99,
            "output 'OUTPUT0': unknown data_type 99",
        );
        check(
            &|c| c.input[0].dims.clear(),
            "input 'INPUT0': dims must not be empty",
        );
        check(&|c| c.input[0].dims = vec![4, -2], "invalid dimension -2");
        check(&|c| c.input[0].format = 7, "input 'INPUT0': unknown format 7");
        check(
            &|c| {
                c.input[0].reshape = Some(pb::ModelTensorReshape { shape: vec![4, 5] });
            },
            "input 'INPUT0': reshape [4, 5] has 20 elements but dims [16] has 16",
        );
        check(
            &|c| c.output[0].label_filename = "../labels.txt".into(),
            "output 'OUTPUT0': label_filename '../labels.txt'",
        );
        check(
            &|c| c.default_model_filename = "/etc/passwd".into(),
            "default_model_filename '/etc/passwd'",
        );
    }

    #[test]
    fn validate_accepts_reshape_forms() {
        let mut cfg = parse(SIMPLE);
        // Scalar: dims [1] presented to the backend as shape [].
        cfg.input[0].dims = vec![1];
        cfg.input[0].reshape = Some(pb::ModelTensorReshape { shape: vec![] });
        // Empty dims are fine when a reshape says what the backend sees.
        cfg.input[1].dims = vec![];
        cfg.input[1].reshape = Some(pb::ModelTensorReshape { shape: vec![1] });
        // Variable dimensions cannot be compared, so they are not.
        cfg.output[0].dims = vec![-1, 4];
        cfg.output[0].reshape = Some(pb::ModelTensorReshape { shape: vec![2, 3] });
        cfg.output[1].dims = vec![2, 8];
        cfg.output[1].reshape = Some(pb::ModelTensorReshape { shape: vec![16] });
        validate_config(&cfg).unwrap();
    }

    #[test]
    fn validate_checks_version_policy_and_instance_groups() {
        let with = |text: &str| {
            let mut cfg = parse(text);
            cfg.name = "m".into();
            validate_config(&cfg).map_err(|e| e.to_string())
        };
        assert!(with("version_policy { latest { num_versions: 2 } }").is_ok());
        assert!(with("version_policy { all { } }").is_ok());
        assert!(with("version_policy { specific { versions: [ 1, 4 ] } }").is_ok());
        assert!(with("version_policy { }").is_ok(), "no choice means the default");
        let err = with("version_policy { latest { } }").unwrap_err();
        assert!(err.contains("num_versions must be >= 1"), "{err}");
        let err = with("version_policy { specific { versions: [ 1, 0 ] } }").unwrap_err();
        assert!(err.contains("version 0 is invalid"), "{err}");
        let err = with("version_policy { specific { } }").unwrap_err();
        assert!(err.contains("versions must not be empty"), "{err}");

        assert!(
            with("instance_group [ { count: 0 } ]").is_ok(),
            "0 means the default"
        );
        let err = with("instance_group [ { kind: KIND_CPU }, { count: -1 } ]").unwrap_err();
        assert!(
            err.contains("instance_group #1: count must be >= 0, got -1"),
            "{err}"
        );
        let err = with("instance_group [ { name: \"g\" gpus: [ -3 ] } ]").unwrap_err();
        assert!(err.contains("instance_group 'g': invalid gpu -3"), "{err}");
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\né x", 6), (2, 3));
        assert_eq!(line_column("ab", 99), (1, 3));
    }

    #[test]
    fn ensembles_are_checked_as_triton_checks_them() {
        let ensemble = |steps: &str, outputs: &str| {
            format!(
                "name: \"e\"\nplatform: \"ensemble\"\nmax_batch_size: 4\n\
                 input [ {{ name: \"IN\" data_type: TYPE_FP32 dims: [ 4 ] }} ]\n\
                 output [ {outputs} ]\nensemble_scheduling {{ step [ {steps} ] }}\n"
            )
        };
        let out = "{ name: \"OUT\" data_type: TYPE_FP32 dims: [ 4 ] }";
        let step = |model: &str, input: &str, output: &str| {
            format!(
                "{{ model_name: \"{model}\" model_version: -1 input_map {{ key: \"x\" value: \"{input}\" }} \
                 output_map {{ key: \"y\" value: \"{output}\" }} }}"
            )
        };
        let check = |text: String| validate_config(&parse(&text)).map_err(|e| e.to_string());
        let chain = format!("{}, {}", step("a", "IN", "mid"), step("b", "mid", "OUT"));
        assert!(check(ensemble(&chain, out)).is_ok());
        let unproduced = check(ensemble(&step("a", "IN", "mid"), out)).unwrap_err();
        assert!(
            unproduced.contains("ensemble output 'OUT' is not produced"),
            "{unproduced}"
        );
        let twice = format!("{}, {}", step("a", "IN", "OUT"), step("b", "IN", "OUT"));
        assert!(
            check(ensemble(&twice, out))
                .unwrap_err()
                .contains("produced more than once")
        );
        let unknown = format!("{}, {}", step("a", "nowhere", "mid"), step("b", "mid", "OUT"));
        assert!(
            check(ensemble(&unknown, out))
                .unwrap_err()
                .contains("reads tensor 'nowhere'")
        );
        let cycle = format!(
            "{}, {}, {}",
            step("a", "IN", "p"),
            step("b", "q", "r"),
            step("c", "r", "q")
        );
        let err = check(ensemble(
            &cycle,
            "{ name: \"p\" data_type: TYPE_FP32 dims: [ 4 ] }",
        ))
        .unwrap_err();
        assert!(err.contains("cycle"), "{err}");
        let no_steps = check(
            "name: \"e\"\nplatform: \"ensemble\"\ninput [ { name: \"IN\" data_type: TYPE_FP32 dims: [ 4 ] } ]\n\
             output [ { name: \"OUT\" data_type: TYPE_FP32 dims: [ 4 ] } ]\n"
                .to_string(),
        )
        .unwrap_err();
        assert!(no_steps.contains("needs ensemble_scheduling"), "{no_steps}");
    }
}
