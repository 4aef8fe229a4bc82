//! Shared-memory parameters of a tensor: `take_shm_ref` over arbitrary parameter maps (the
//! three Triton keys with values of every type, and other keys), then the registry's read
//! and view of the reference against a registered 4 KiB region. Offsets and sizes near the
//! integer limits must be refused, never wrap or read outside the region.
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxserve_core::{ParamValue, Parameters};
use oxserve_shm::{BYTE_SIZE_PARAM, OFFSET_PARAM, REGION_PARAM, SharedMemoryInputs, take_shm_ref};

fn value(kind: u8, bytes: &[u8]) -> ParamValue {
    let mut word = [0u8; 8];
    let n = bytes.len().min(8);
    word[..n].copy_from_slice(&bytes[..n]);
    let int = i64::from_le_bytes(word);
    match kind % 5 {
        0 => ParamValue::Int(int),
        1 => ParamValue::Uint(int as u64),
        2 => ParamValue::Double(f64::from_bits(int as u64)),
        3 => ParamValue::Bool(int & 1 == 1),
        _ => ParamValue::String(String::from_utf8_lossy(bytes).into_owned()),
    }
}

fuzz_target!(|data: &[u8]| {
    // Entries of 10 bytes: key choice, value kind, 8 value bytes.
    let mut params = Parameters::new();
    for entry in data.chunks(10) {
        let [key, kind, rest @ ..] = entry else { break };
        let key = match key % 4 {
            0 => REGION_PARAM,
            1 => OFFSET_PARAM,
            2 => BYTE_SIZE_PARAM,
            _ => "other",
        };
        let value = if key == REGION_PARAM && kind & 0x80 != 0 {
            ParamValue::String(oxserve_fuzz::SHM_REGION.into())
        } else {
            value(*kind, rest)
        };
        params.insert(key.to_string(), value);
    }
    let Ok(Some(at)) = take_shm_ref("input", "x", &mut params) else {
        return;
    };
    assert!(!params.contains_key(REGION_PARAM) && !params.contains_key(OFFSET_PARAM));
    let registry = oxserve_fuzz::shm_registry();
    let mut inputs = SharedMemoryInputs::default();
    for datatype in ["BYTES", "FP32"] {
        if let Ok(bytes) = registry.input(&at, datatype, &mut inputs) {
            assert_eq!(bytes.len(), at.byte_size, "{at:?}");
            assert!(at.offset + at.byte_size <= oxserve_fuzz::SHM_REGION_BYTES, "{at:?}");
        }
    }
});
