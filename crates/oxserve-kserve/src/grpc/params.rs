//! `InferParameter` maps ⇄ oxserve [`Parameters`].

use std::collections::HashMap;

use oxserve_core::{Error, ParamValue, Parameters, Result};

use super::pb::InferParameter;
use super::pb::infer_parameter::ParameterChoice;

pub type WireParams = HashMap<String, InferParameter>;

/// One parameter; `what` names where it came from for the error message.
pub(crate) fn param_from_wire(what: &str, key: &str, param: &InferParameter) -> Result<ParamValue> {
    Ok(match &param.parameter_choice {
        Some(ParameterChoice::BoolParam(v)) => ParamValue::Bool(*v),
        Some(ParameterChoice::Int64Param(v)) => ParamValue::Int(*v),
        Some(ParameterChoice::StringParam(v)) => ParamValue::String(v.clone()),
        Some(ParameterChoice::DoubleParam(v)) => ParamValue::Double(*v),
        Some(ParameterChoice::Uint64Param(v)) => ParamValue::Uint(*v),
        // An unset oneof: the client built an InferParameter without a value.
        None => {
            return Err(Error::invalid(format!("{what} parameter '{key}' has no value")));
        }
    })
}

pub(crate) fn params_from_wire(what: &str, params: &WireParams) -> Result<Parameters> {
    params
        .iter()
        .map(|(key, p)| Ok((key.clone(), param_from_wire(what, key, p)?)))
        .collect()
}

pub(crate) fn param_to_wire(value: &ParamValue) -> InferParameter {
    let choice = match value {
        ParamValue::Bool(v) => ParameterChoice::BoolParam(*v),
        ParamValue::Int(v) => ParameterChoice::Int64Param(*v),
        ParamValue::Uint(v) => ParameterChoice::Uint64Param(*v),
        ParamValue::Double(v) => ParameterChoice::DoubleParam(*v),
        ParamValue::String(v) => ParameterChoice::StringParam(v.clone()),
    };
    InferParameter {
        parameter_choice: Some(choice),
    }
}

pub fn params_to_wire(params: &Parameters) -> WireParams {
    params
        .iter()
        .map(|(key, value)| (key.clone(), param_to_wire(value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(choice: ParameterChoice) -> InferParameter {
        InferParameter {
            parameter_choice: Some(choice),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let values = [
            ParamValue::Bool(true),
            ParamValue::Int(-7),
            ParamValue::Uint(u64::MAX),
            ParamValue::Double(0.25),
            ParamValue::String("high".into()),
        ];
        for v in values {
            let back = param_from_wire("request", "k", &param_to_wire(&v));
            assert_eq!(back.ok(), Some(v));
        }
    }

    #[test]
    fn map_conversion_and_unset_value() {
        let mut map = WireParams::new();
        map.insert("priority".into(), wire(ParameterChoice::Int64Param(1)));
        map.insert("sequence_start".into(), wire(ParameterChoice::BoolParam(true)));
        let params = params_from_wire("request", &map).ok();
        assert_eq!(
            params.as_ref().and_then(|p| p.get("priority")),
            Some(&ParamValue::Int(1))
        );
        assert_eq!(params.map(|p| params_to_wire(&p)), Some(map.clone()));

        map.insert("empty".into(), InferParameter::default());
        let err = params_from_wire("request", &map).err();
        assert!(err.is_some_and(|e| e.message().contains("'empty' has no value")));
    }
}
