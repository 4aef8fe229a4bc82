//! TensorFlow data types ↔ oxserve's.

use oxserve_core::DataType;

use crate::api::dtype as tf;

/// The oxserve type of a TensorFlow `DataType` code, for the types the engine serves.
pub fn data_type(code: i32) -> Option<DataType> {
    Some(match code {
        tf::FLOAT => DataType::F32,
        tf::DOUBLE => DataType::F64,
        tf::INT32 => DataType::I32,
        tf::UINT8 => DataType::U8,
        tf::INT16 => DataType::I16,
        tf::INT8 => DataType::I8,
        tf::STRING => DataType::Bytes,
        tf::INT64 => DataType::I64,
        tf::BOOL => DataType::Bool,
        tf::BFLOAT16 => DataType::BF16,
        tf::UINT16 => DataType::U16,
        tf::HALF => DataType::F16,
        tf::UINT32 => DataType::U32,
        tf::UINT64 => DataType::U64,
        _ => return None,
    })
}

/// The TensorFlow `DataType` code of an oxserve type.
pub fn tf_code(dt: DataType) -> i32 {
    match dt {
        DataType::F32 => tf::FLOAT,
        DataType::F64 => tf::DOUBLE,
        DataType::I32 => tf::INT32,
        DataType::U8 => tf::UINT8,
        DataType::I16 => tf::INT16,
        DataType::I8 => tf::INT8,
        DataType::Bytes => tf::STRING,
        DataType::I64 => tf::INT64,
        DataType::Bool => tf::BOOL,
        DataType::BF16 => tf::BFLOAT16,
        DataType::U16 => tf::UINT16,
        DataType::F16 => tf::HALF,
        DataType::U32 => tf::UINT32,
        DataType::U64 => tf::UINT64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_type_round_trips() {
        for code in 0..30 {
            if let Some(dt) = data_type(code) {
                assert_eq!(tf_code(dt), code);
            }
        }
        assert_eq!(data_type(tf::HALF), Some(DataType::F16));
        assert_eq!(data_type(8), None, "complex64 is not served");
    }
}
