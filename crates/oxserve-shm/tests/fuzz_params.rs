//! Property tests of Triton's shared-memory parameters (`shared_memory_region`,
//! `shared_memory_offset`, `shared_memory_byte_size`) as any client can send them: every map
//! of values of any type is either a reference with a string region and non-negative offset
//! and size, "no shared memory", or an invalid-argument error naming the tensor; never a panic.

use oxserve_core::{ErrorKind, ParamValue, Parameters};
use oxserve_shm::{BYTE_SIZE_PARAM, OFFSET_PARAM, REGION_PARAM, take_shm_ref};
use proptest::prelude::*;

fn value() -> impl Strategy<Value = ParamValue> {
    prop_oneof![
        any::<bool>().prop_map(ParamValue::Bool),
        prop_oneof![
            Just(i64::MIN),
            Just(-1i64),
            Just(0i64),
            Just(i64::MAX),
            any::<i64>()
        ]
        .prop_map(ParamValue::Int),
        prop_oneof![Just(u64::MAX), Just(1u64 << 63), any::<u64>()].prop_map(ParamValue::Uint),
        prop_oneof![Just(f64::NAN), Just(-0.0f64), Just(1e300f64), any::<f64>()].prop_map(ParamValue::Double),
        ".{0,8}".prop_map(ParamValue::String),
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_parameter_map(entries in prop::collection::vec(
        (prop::sample::select(vec![REGION_PARAM, OFFSET_PARAM, BYTE_SIZE_PARAM, "binary_data", ""]), value()), 0..5)) {
        let mut params: Parameters = entries.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let given = params.clone();
        match take_shm_ref("input", "x", &mut params) {
            Ok(Some(at)) => {
                prop_assert_eq!(given.get(REGION_PARAM), Some(&ParamValue::String(at.region.clone())));
                prop_assert_eq!(given.get(BYTE_SIZE_PARAM).and_then(ParamValue::as_i64), i64::try_from(at.byte_size).ok());
            }
            Ok(None) => prop_assert!(!given.contains_key(REGION_PARAM)),
            Err(e) => {
                prop_assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                prop_assert!(e.message().contains("'x'"), "{}", e.message());
            }
        }
        // The shared-memory keys are taken out whatever the outcome; others stay.
        for key in [REGION_PARAM, OFFSET_PARAM, BYTE_SIZE_PARAM] {
            prop_assert!(!params.contains_key(key));
        }
        prop_assert_eq!(params.len(), given.keys().filter(|k| ![REGION_PARAM, OFFSET_PARAM, BYTE_SIZE_PARAM].contains(&k.as_str())).count());
    }
}
