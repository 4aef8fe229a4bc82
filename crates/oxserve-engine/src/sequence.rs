//! Triton's `sequence_batching` in a model configuration: the checks Triton makes at load,
//! the inputs and outputs the sequence batcher (not the client) gives the model, and the
//! request parameters that name a request's sequence.

use std::path::Path;
use std::time::Duration;

use oxserve_core::{DataType, Error, ParamValue, Parameters, Result, Tensor, TensorData, TensorMeta};
use oxserve_repository::data_type_of;
use oxserve_repository::pb::ModelConfig;
use oxserve_repository::pb::ModelSequenceBatching;
use oxserve_repository::pb::model_config::SchedulingChoice;
use oxserve_repository::pb::model_sequence_batching::control::Kind;
use oxserve_repository::pb::model_sequence_batching::initial_state::StateData;
use oxserve_repository::pb::model_sequence_batching::{StrategyChoice, StrategyDirect};
use oxserve_scheduler::{
    ControlInput, ControlKind, CorrelationId, SequenceConfig, SequenceFlags, SequenceStrategy, StateSpec,
};

/// Triton's default for `max_sequence_idle_microseconds` (1 s).
const DEFAULT_IDLE: Duration = Duration::from_secs(1);

fn sequence_batching(cfg: &ModelConfig) -> Option<&ModelSequenceBatching> {
    match &cfg.scheduling_choice {
        Some(SchedulingChoice::SequenceBatching(s)) => Some(s),
        _ => None,
    }
}

/// Names of the model inputs and outputs the sequence batcher supplies and consumes: they are
/// the model's, but not the client's (neither in the configuration's `input`/`output` nor in
/// the metadata).
pub(crate) fn provided_names(cfg: &ModelConfig) -> (Vec<String>, Vec<String>) {
    let Some(s) = sequence_batching(cfg) else {
        return (Vec::new(), Vec::new());
    };
    let mut inputs: Vec<String> = s.control_input.iter().map(|c| c.name.clone()).collect();
    inputs.extend(s.state.iter().map(|st| st.input_name.clone()));
    let outputs = s.state.iter().map(|st| st.output_name.clone()).collect();
    (inputs, outputs)
}

/// The batcher-supplied inputs and the state outputs, as the engine sees them (after the
/// client's inputs and outputs, in this order).
pub(crate) fn engine_io(config: &SequenceConfig, batched: bool) -> (Vec<TensorMeta>, Vec<TensorMeta>) {
    let with_batch = |mut shape: Vec<i64>| {
        if batched {
            shape.insert(0, -1);
        }
        shape
    };
    let mut inputs: Vec<TensorMeta> = config
        .controls
        .iter()
        .map(|c| TensorMeta {
            name: c.name.clone(),
            datatype: c.datatype,
            shape: with_batch(vec![1]),
        })
        .collect();
    let mut outputs = Vec::new();
    for s in &config.states {
        inputs.push(TensorMeta {
            name: s.input.clone(),
            datatype: s.initial.datatype,
            shape: with_batch(s.initial.shape.clone()),
        });
        outputs.push(TensorMeta {
            name: s.output.clone(),
            datatype: s.initial.datatype,
            shape: with_batch(s.initial.shape.clone()),
        });
    }
    (inputs, outputs)
}

/// Resolves `sequence_batching` for the scheduler, with Triton's load-time checks.
pub(crate) fn sequence_config(
    cfg: &ModelConfig,
    model_dir: &Path,
) -> std::result::Result<Option<SequenceConfig>, String> {
    let Some(s) = sequence_batching(cfg) else {
        return Ok(None);
    };
    let max_batch_size = usize::try_from(cfg.max_batch_size).unwrap_or(0);
    let strategy = match &s.strategy_choice {
        None => direct(&StrategyDirect::default())?,
        Some(StrategyChoice::Direct(d)) => direct(d)?,
        Some(StrategyChoice::Oldest(o)) => {
            let mut preferred = Vec::with_capacity(o.preferred_batch_size.len());
            for &p in &o.preferred_batch_size {
                if p <= 0 || p as usize > max_batch_size.max(1) {
                    return Err(format!(
                        "sequence_batching oldest preferred_batch_size {p} must be between 1 and \
                         max_batch_size {max_batch_size}"
                    ));
                }
                preferred.push(p as usize);
            }
            if o.max_candidate_sequences < 0 {
                return Err("sequence_batching oldest max_candidate_sequences must not be negative".into());
            }
            SequenceStrategy::Oldest {
                max_candidate_sequences: match o.max_candidate_sequences {
                    0 => max_batch_size.max(1),
                    n => n as usize,
                },
                preferred_batch_sizes: preferred,
                max_queue_delay: Duration::from_micros(o.max_queue_delay_microseconds),
            }
        }
    };
    if s.iterative_sequence {
        return Err(
            "sequence_batching iterative_sequence (decoupled iterative models) is not supported".into(),
        );
    }
    let mut controls = Vec::with_capacity(s.control_input.len());
    for input in &s.control_input {
        controls.push(control(&input.name, &input.control)?);
    }
    for kind in [
        ControlKind::Start,
        ControlKind::End,
        ControlKind::Ready,
        ControlKind::CorrelationId,
    ] {
        if controls.iter().filter(|c| c.kind == kind).count() > 1 {
            return Err(format!(
                "sequence_batching has more than one {kind:?} control input"
            ));
        }
    }
    let mut states = Vec::with_capacity(s.state.len());
    for st in &s.state {
        states.push(state(st, model_dir)?);
    }
    let client_inputs: Vec<&str> = cfg.input.iter().map(|i| i.name.as_str()).collect();
    let client_outputs: Vec<&str> = cfg.output.iter().map(|o| o.name.as_str()).collect();
    let mut seen: Vec<&str> = Vec::new();
    for name in controls
        .iter()
        .map(|c| c.name.as_str())
        .chain(states.iter().map(|s| s.input.as_str()))
    {
        if client_inputs.contains(&name) {
            return Err(format!(
                "sequence_batching input '{name}' is supplied by the sequence batcher and must not \
                 also be listed as a model input"
            ));
        }
        if seen.contains(&name) {
            return Err(format!("sequence_batching names input '{name}' twice"));
        }
        seen.push(name);
    }
    for st in &states {
        if client_outputs.contains(&st.output.as_str()) {
            return Err(format!(
                "sequence_batching state output '{}' is kept by the sequence batcher and must not \
                 also be listed as a model output",
                st.output
            ));
        }
    }
    Ok(Some(SequenceConfig {
        model_name: cfg.name.clone(),
        strategy,
        max_sequence_idle: match s.max_sequence_idle_microseconds {
            0 => DEFAULT_IDLE,
            us => Duration::from_micros(us),
        },
        controls,
        states,
    }))
}

fn direct(d: &StrategyDirect) -> std::result::Result<SequenceStrategy, String> {
    if !(0.0..=1.0).contains(&d.minimum_slot_utilization) {
        return Err(format!(
            "sequence_batching direct minimum_slot_utilization {} must be between 0 and 1",
            d.minimum_slot_utilization
        ));
    }
    Ok(SequenceStrategy::Direct {
        max_queue_delay: Duration::from_micros(d.max_queue_delay_microseconds),
        minimum_slot_utilization: d.minimum_slot_utilization,
    })
}

fn control(
    name: &str,
    controls: &[oxserve_repository::pb::model_sequence_batching::Control],
) -> std::result::Result<ControlInput, String> {
    let [c] = controls else {
        return Err(format!(
            "sequence_batching control input '{name}' must have exactly one control, it has {}",
            controls.len()
        ));
    };
    let kind = match Kind::try_from(c.kind) {
        Ok(Kind::ControlSequenceStart) => ControlKind::Start,
        Ok(Kind::ControlSequenceEnd) => ControlKind::End,
        Ok(Kind::ControlSequenceReady) => ControlKind::Ready,
        Ok(Kind::ControlSequenceCorrid) => ControlKind::CorrelationId,
        Err(_) => {
            return Err(format!(
                "sequence_batching control input '{name}' has an unknown kind"
            ));
        }
    };
    if kind == ControlKind::CorrelationId {
        let datatype = data_type_of(c.data_type).filter(|t| {
            matches!(
                t,
                DataType::U64 | DataType::I64 | DataType::U32 | DataType::I32 | DataType::Bytes
            )
        });
        let Some(datatype) = datatype else {
            return Err(format!(
                "sequence_batching CORRID control input '{name}' must have data_type TYPE_UINT64, \
                 TYPE_INT64, TYPE_UINT32, TYPE_INT32 or TYPE_STRING"
            ));
        };
        return Ok(ControlInput {
            name: name.to_string(),
            kind,
            datatype,
            false_true: [Vec::new(), Vec::new()],
        });
    }
    let given = [
        !c.int32_false_true.is_empty(),
        !c.fp32_false_true.is_empty(),
        !c.bool_false_true.is_empty(),
    ];
    let (datatype, false_true) = match given {
        [true, false, false] if c.int32_false_true.len() == 2 => (
            DataType::I32,
            [
                c.int32_false_true[0].to_le_bytes().to_vec(),
                c.int32_false_true[1].to_le_bytes().to_vec(),
            ],
        ),
        [false, true, false] if c.fp32_false_true.len() == 2 => (
            DataType::F32,
            [
                c.fp32_false_true[0].to_le_bytes().to_vec(),
                c.fp32_false_true[1].to_le_bytes().to_vec(),
            ],
        ),
        [false, false, true] if c.bool_false_true.len() == 2 => (
            DataType::Bool,
            [
                vec![u8::from(c.bool_false_true[0])],
                vec![u8::from(c.bool_false_true[1])],
            ],
        ),
        _ => {
            return Err(format!(
                "sequence_batching control input '{name}' must give exactly one of \
                 int32_false_true, fp32_false_true or bool_false_true, with two values (false, true)"
            ));
        }
    };
    Ok(ControlInput {
        name: name.to_string(),
        kind,
        datatype,
        false_true,
    })
}

fn state(
    st: &oxserve_repository::pb::model_sequence_batching::State,
    model_dir: &Path,
) -> std::result::Result<StateSpec, String> {
    if st.input_name.is_empty() || st.output_name.is_empty() {
        return Err("sequence_batching state must name its input_name and output_name".into());
    }
    let datatype = data_type_of(st.data_type).ok_or_else(|| {
        format!(
            "sequence_batching state '{}' has an invalid data_type",
            st.input_name
        )
    })?;
    if st.use_growable_memory {
        return Err(format!(
            "sequence_batching state '{}': use_growable_memory (GPU state buffers) is not supported",
            st.input_name
        ));
    }
    let initial = match st.initial_state.as_slice() {
        [] => None,
        [one] => Some(one),
        _ => {
            return Err(format!(
                "sequence_batching state '{}' may have only one initial_state",
                st.input_name
            ));
        }
    };
    let dims = match initial {
        Some(i) if !i.dims.is_empty() => i.dims.clone(),
        _ => st.dims.clone(),
    };
    if dims.iter().any(|&d| d < 0) {
        return Err(format!(
            "sequence_batching state '{}' needs fixed dims (or an initial_state with fixed dims), got {dims:?}",
            st.input_name
        ));
    }
    if let Some(i) = initial
        && i.data_type != st.data_type
    {
        return Err(format!(
            "sequence_batching state '{}': initial_state data_type differs from the state's",
            st.input_name
        ));
    }
    let count = oxserve_core::element_count(&dims).map_err(|e| e.to_string())?;
    let data = match initial.and_then(|i| i.state_data.as_ref()) {
        Some(StateData::DataFile(file)) => {
            let path = model_dir.join("initial_state").join(file);
            if Path::new(file)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(format!(
                    "sequence_batching state '{}': initial_state data_file '{file}' must be a file \
                     name inside the model's initial_state directory",
                    st.input_name
                ));
            }
            let bytes = std::fs::read(&path).map_err(|e| {
                format!(
                    "sequence_batching state '{}': cannot read initial_state {}: {e}",
                    st.input_name,
                    path.display()
                )
            })?;
            initial_data(&st.input_name, datatype, count, bytes)?
        }
        // zero_data, or no initial state: zeros (Triton's default).
        _ => match datatype.size() {
            Some(size) => TensorData::Raw(vec![0u8; count * size].into()),
            None => TensorData::Strings(vec![bytes::Bytes::new(); count]),
        },
    };
    Ok(StateSpec {
        input: st.input_name.clone(),
        output: st.output_name.clone(),
        initial: Tensor::new(st.input_name.clone(), datatype, dims, data),
    })
}

/// An initial state file: raw little-endian values, or for strings Triton's length-prefixed
/// BYTES elements.
fn initial_data(
    name: &str,
    datatype: DataType,
    count: usize,
    bytes: Vec<u8>,
) -> std::result::Result<TensorData, String> {
    match datatype.size() {
        Some(size) if bytes.len() == count * size => Ok(TensorData::Raw(bytes.into())),
        Some(size) => Err(format!(
            "sequence_batching state '{name}': the initial_state file has {} bytes, the state needs {}",
            bytes.len(),
            count * size
        )),
        None => {
            let strings = Tensor::strings_from_wire(name, &bytes.into(), count).map_err(|e| e.to_string())?;
            if strings.len() != count {
                return Err(format!(
                    "sequence_batching state '{name}': the initial_state file has {} strings, the state needs {count}",
                    strings.len()
                ));
            }
            Ok(TensorData::Strings(strings))
        }
    }
}

/// Reads Triton's sequence parameters: `sequence_id` (a non-zero number or a non-empty
/// string), `sequence_start`, `sequence_end`. `None` when the request names no sequence.
pub(crate) fn sequence_flags(parameters: &Parameters) -> Result<Option<SequenceFlags>> {
    let flag = |key: &str| -> Result<bool> {
        match parameters.get(key) {
            None => Ok(false),
            Some(ParamValue::Bool(b)) => Ok(*b),
            Some(_) => Err(Error::invalid(format!("parameter '{key}' must be a boolean"))),
        }
    };
    let start = flag("sequence_start")?;
    let end = flag("sequence_end")?;
    let id = match parameters.get("sequence_id") {
        None => return Ok(None),
        Some(ParamValue::Int(n)) if *n >= 0 => CorrelationId::Number(*n as u64),
        Some(ParamValue::Uint(n)) => CorrelationId::Number(*n),
        Some(ParamValue::String(s)) => CorrelationId::Text(s.clone()),
        Some(_) => {
            return Err(Error::invalid(
                "parameter 'sequence_id' must be an unsigned integer or a string",
            ));
        }
    };
    if id == CorrelationId::Number(0) || id == CorrelationId::Text(String::new()) {
        return Ok(None);
    }
    Ok(Some(SequenceFlags { id, start, end }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oxserve_repository::parse_config_text;

    fn resolve(text: &str) -> std::result::Result<Option<SequenceConfig>, String> {
        sequence_config(&parse_config_text(text).unwrap(), Path::new("/nonexistent"))
    }

    const ACCUMULATOR: &str = r#"name: "acc" max_batch_size: 4
        input [{ name: "INPUT" data_type: TYPE_INT32 dims: [1] }]
        sequence_batching {
          control_input [
            { name: "START" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] },
            { name: "READY" control [{ kind: CONTROL_SEQUENCE_READY fp32_false_true: [0, 1] }] },
            { name: "END" control [{ kind: CONTROL_SEQUENCE_END bool_false_true: [false, true] }] },
            { name: "CORRID" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_UINT64 }] }
          ]
          state [{ input_name: "INPUT_STATE" output_name: "OUTPUT_STATE" data_type: TYPE_INT32 dims: [2]
                   initial_state { data_type: TYPE_INT32 dims: [2] zero_data: true name: "z" } }]
        }"#;

    #[test]
    fn controls_and_state_resolve_with_their_types() {
        let c = resolve(ACCUMULATOR).unwrap().unwrap();
        assert_eq!(c.max_sequence_idle, DEFAULT_IDLE);
        assert!(matches!(c.strategy, SequenceStrategy::Direct { .. }));
        let kinds: Vec<(ControlKind, DataType)> = c.controls.iter().map(|c| (c.kind, c.datatype)).collect();
        assert_eq!(
            kinds,
            vec![
                (ControlKind::Start, DataType::I32),
                (ControlKind::Ready, DataType::F32),
                (ControlKind::End, DataType::Bool),
                (ControlKind::CorrelationId, DataType::U64)
            ]
        );
        assert_eq!(c.controls[0].false_true[1], 1i32.to_le_bytes().to_vec());
        assert_eq!(c.controls[1].false_true[1], 1f32.to_le_bytes().to_vec());
        assert_eq!(c.states[0].initial.shape, vec![2]);
        assert_eq!(c.states[0].initial.raw().unwrap().len(), 8);
        let (inputs, outputs) = engine_io(&c, true);
        assert_eq!(inputs.len(), 5);
        assert_eq!(inputs[4].shape, vec![-1, 2]);
        assert_eq!(outputs[0].name, "OUTPUT_STATE");
    }

    #[test]
    fn bad_sequence_settings_are_load_errors() {
        let cases = [
            ("int32_false_true: [0, 1]", "int32_false_true: [1]", "two values"),
            ("data_type: TYPE_UINT64", "data_type: TYPE_FP32", "TYPE_UINT64"),
            (
                "input_name: \"INPUT_STATE\"",
                "input_name: \"INPUT\"",
                "must not also be listed",
            ),
        ];
        for (from, to, expected) in cases {
            let err = resolve(&ACCUMULATOR.replace(from, to)).unwrap_err();
            assert!(err.contains(expected), "{to}: {err}");
        }
    }

    #[test]
    fn sequence_parameters_name_the_sequence() {
        let mut p = Parameters::new();
        assert_eq!(sequence_flags(&p).unwrap(), None);
        p.insert("sequence_id".into(), ParamValue::Int(0));
        assert_eq!(sequence_flags(&p).unwrap(), None);
        p.insert("sequence_id".into(), ParamValue::String("user-1".into()));
        p.insert("sequence_start".into(), ParamValue::Bool(true));
        let flags = sequence_flags(&p).unwrap().unwrap();
        assert_eq!(flags.id, CorrelationId::Text("user-1".into()));
        assert!(flags.start && !flags.end);
        p.insert("sequence_end".into(), ParamValue::Int(1));
        assert!(sequence_flags(&p).is_err());
    }
}
