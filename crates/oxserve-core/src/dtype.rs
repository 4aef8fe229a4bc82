use std::fmt;

/// Tensor element types, named on the wire as in the Open Inference Protocol ("FP32") and in
/// Triton's model configuration ("TYPE_FP32").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// Variable-length byte strings (Triton's TYPE_STRING).
    Bytes,
}

const ALL: [DataType; 14] = [
    DataType::Bool,
    DataType::U8,
    DataType::U16,
    DataType::U32,
    DataType::U64,
    DataType::I8,
    DataType::I16,
    DataType::I32,
    DataType::I64,
    DataType::F16,
    DataType::BF16,
    DataType::F32,
    DataType::F64,
    DataType::Bytes,
];

impl DataType {
    pub const ALL: [DataType; 14] = ALL;

    /// The KServe v2 wire name.
    pub fn wire_name(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::U8 => "UINT8",
            DataType::U16 => "UINT16",
            DataType::U32 => "UINT32",
            DataType::U64 => "UINT64",
            DataType::I8 => "INT8",
            DataType::I16 => "INT16",
            DataType::I32 => "INT32",
            DataType::I64 => "INT64",
            DataType::F16 => "FP16",
            DataType::BF16 => "BF16",
            DataType::F32 => "FP32",
            DataType::F64 => "FP64",
            DataType::Bytes => "BYTES",
        }
    }

    /// Parses a KServe v2 wire name (case-sensitive, as the spec says).
    pub fn from_wire_name(name: &str) -> Option<DataType> {
        ALL.into_iter().find(|d| d.wire_name() == name)
    }

    /// The name in Triton's `config.pbtxt` (`inference.DataType`).
    pub fn config_name(self) -> &'static str {
        match self {
            DataType::Bool => "TYPE_BOOL",
            DataType::U8 => "TYPE_UINT8",
            DataType::U16 => "TYPE_UINT16",
            DataType::U32 => "TYPE_UINT32",
            DataType::U64 => "TYPE_UINT64",
            DataType::I8 => "TYPE_INT8",
            DataType::I16 => "TYPE_INT16",
            DataType::I32 => "TYPE_INT32",
            DataType::I64 => "TYPE_INT64",
            DataType::F16 => "TYPE_FP16",
            DataType::BF16 => "TYPE_BF16",
            DataType::F32 => "TYPE_FP32",
            DataType::F64 => "TYPE_FP64",
            DataType::Bytes => "TYPE_STRING",
        }
    }

    pub fn from_config_name(name: &str) -> Option<DataType> {
        ALL.into_iter().find(|d| d.config_name() == name)
    }

    /// TensorFlow's code for the type (`tensorflow.DataType` in types.proto, the C API's
    /// `TF_DataType`), for the TensorFlow engine and TF Serving's protocol alike.
    pub const fn tensorflow_code(self) -> i32 {
        match self {
            DataType::F32 => 1,
            DataType::F64 => 2,
            DataType::I32 => 3,
            DataType::U8 => 4,
            DataType::I16 => 5,
            DataType::I8 => 6,
            DataType::Bytes => 7,
            DataType::I64 => 9,
            DataType::Bool => 10,
            DataType::BF16 => 14,
            DataType::U16 => 17,
            DataType::F16 => 19,
            DataType::U32 => 22,
            DataType::U64 => 23,
        }
    }

    /// The type of a TensorFlow `DataType` code, for the types oxserve has.
    pub fn from_tensorflow_code(code: i32) -> Option<DataType> {
        ALL.into_iter().find(|d| d.tensorflow_code() == code)
    }

    /// Size of one element in bytes; `None` for variable-length BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            DataType::Bool | DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
            DataType::Bytes => return None,
        })
    }

    /// Whether values of this type can be ranked for the classification extension.
    pub fn is_numeric(self) -> bool {
        !matches!(self, DataType::Bytes)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.wire_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_and_config_names_round_trip() {
        for d in DataType::ALL {
            assert_eq!(DataType::from_wire_name(d.wire_name()), Some(d));
            assert_eq!(DataType::from_config_name(d.config_name()), Some(d));
        }
        assert_eq!(DataType::from_wire_name("fp32"), None);
        assert_eq!(DataType::from_config_name("TYPE_BYTES"), None);
        assert_eq!(DataType::from_config_name("TYPE_STRING"), Some(DataType::Bytes));
        for d in DataType::ALL {
            assert_eq!(DataType::from_tensorflow_code(d.tensorflow_code()), Some(d));
        }
        assert_eq!(DataType::from_tensorflow_code(19), Some(DataType::F16));
        assert_eq!(DataType::from_tensorflow_code(8), None, "complex64 is not served");
    }

    #[test]
    fn sizes() {
        assert_eq!(DataType::F16.size(), Some(2));
        assert_eq!(DataType::I64.size(), Some(8));
        assert_eq!(DataType::Bool.size(), Some(1));
        assert_eq!(DataType::Bytes.size(), None);
    }
}
