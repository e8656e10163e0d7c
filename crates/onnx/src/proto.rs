//! The subset of `onnx.proto` the importer reads, as hand-written prost messages.
//!
//! Field numbers are copied from the official `onnx.proto` (proto2 syntax, ONNX
//! 1.12, IR version 8; the numbers are stable across ONNX releases). Each
//! struct quotes the message it mirrors. Fields we do not declare (doc strings,
//! metadata, sub-graphs, sparse tensors, training info, functions) are skipped
//! by prost as unknown fields, so newer models still decode.
//!
//! No build script and no `protoc`: the derive macros are the whole codec.
//! Repeated scalars that proto2 leaves unpacked carry `packed = "false"` so
//! that the encoder (used by tests only) writes what `onnx` itself writes; the
//! decoder accepts both forms anyway.

/// `message ModelProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// `optional int64 ir_version = 1;`
    #[prost(int64, optional, tag = "1")]
    pub ir_version: Option<i64>,
    /// `repeated OperatorSetIdProto opset_import = 8;`
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    /// `optional string producer_name = 2;`
    #[prost(string, optional, tag = "2")]
    pub producer_name: Option<String>,
    /// `optional GraphProto graph = 7;`
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
}

/// `message OperatorSetIdProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    /// `optional string domain = 1;` (empty or `ai.onnx` is the default domain).
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    /// `optional int64 version = 2;`
    #[prost(int64, optional, tag = "2")]
    pub version: Option<i64>,
}

/// `message GraphProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    /// `repeated NodeProto node = 1;`
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    /// `optional string name = 2;`
    #[prost(string, optional, tag = "2")]
    pub name: Option<String>,
    /// `repeated TensorProto initializer = 5;`
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    /// `repeated ValueInfoProto input = 11;`
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    /// `repeated ValueInfoProto output = 12;`
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    /// `repeated ValueInfoProto value_info = 13;`
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

/// `message NodeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    /// `repeated string input = 1;` (an empty name is an omitted optional input).
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    /// `repeated string output = 2;`
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    /// `optional string name = 3;`
    #[prost(string, optional, tag = "3")]
    pub name: Option<String>,
    /// `optional string op_type = 4;`
    #[prost(string, optional, tag = "4")]
    pub op_type: Option<String>,
    /// `optional string domain = 7;`
    #[prost(string, optional, tag = "7")]
    pub domain: Option<String>,
    /// `repeated AttributeProto attribute = 5;`
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
}

/// `enum AttributeProto.AttributeType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    /// `UNDEFINED = 0;`
    Undefined = 0,
    /// `FLOAT = 1;`
    Float = 1,
    /// `INT = 2;`
    Int = 2,
    /// `STRING = 3;`
    String = 3,
    /// `TENSOR = 4;`
    Tensor = 4,
    /// `GRAPH = 5;`
    Graph = 5,
    /// `FLOATS = 6;`
    Floats = 6,
    /// `INTS = 7;`
    Ints = 7,
    /// `STRINGS = 8;`
    Strings = 8,
    /// `TENSORS = 9;`
    Tensors = 9,
    /// `GRAPHS = 10;`
    Graphs = 10,
    /// `SPARSE_TENSOR = 11;`
    SparseTensor = 11,
    /// `SPARSE_TENSORS = 12;`
    SparseTensors = 12,
    /// `TYPE_PROTO = 13;`
    TypeProto = 13,
    /// `TYPE_PROTOS = 14;`
    TypeProtos = 14,
}

/// `message AttributeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    /// `optional string name = 1;`
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// `optional string ref_attr_name = 21;` (only valid inside functions).
    #[prost(string, optional, tag = "21")]
    pub ref_attr_name: Option<String>,
    /// `optional AttributeType type = 20;`
    #[prost(enumeration = "AttributeType", optional, tag = "20")]
    pub r#type: Option<i32>,
    /// `optional float f = 2;`
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    /// `optional int64 i = 3;`
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    /// `optional bytes s = 4;`
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    /// `optional TensorProto t = 5;`
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    /// `repeated float floats = 7;`
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    /// `repeated int64 ints = 8;`
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    /// `repeated bytes strings = 9;`
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
}

/// `message ValueInfoProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    /// `optional string name = 1;`
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// `optional TypeProto type = 2;`
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
}

/// `message TypeProto`; only the `tensor_type` arm of its `value` oneof is read.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    /// `oneof value { Tensor tensor_type = 1; ... }`
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
}

/// Nested messages of `TypeProto`.
pub mod type_proto {
    /// `message TypeProto.Tensor`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        /// `optional int32 elem_type = 1;` (a `TensorProto.DataType`).
        #[prost(int32, optional, tag = "1")]
        pub elem_type: Option<i32>,
        /// `optional TensorShapeProto shape = 2;` (absent: rank unknown).
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    /// `oneof value` of `TypeProto` (sequence, map, optional and sparse arms are skipped).
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        /// `Tensor tensor_type = 1;`
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

/// `message TensorShapeProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    /// `repeated Dimension dim = 1;`
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

/// Nested messages of `TensorShapeProto`.
pub mod tensor_shape_proto {
    /// `message TensorShapeProto.Dimension`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        /// `oneof value { int64 dim_value = 1; string dim_param = 2; }`
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
    }

    /// Nested types of `TensorShapeProto.Dimension`.
    pub mod dimension {
        /// `oneof value` of `Dimension`.
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            /// `int64 dim_value = 1;`
            #[prost(int64, tag = "1")]
            DimValue(i64),
            /// `string dim_param = 2;` (a symbolic, dynamic dimension).
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

/// `enum TensorProto.DataType` values the importer names in messages.
pub mod data_type {
    /// `FLOAT = 1;`
    pub const FLOAT: i32 = 1;
    /// `UINT8 = 2;`
    pub const UINT8: i32 = 2;
    /// `INT8 = 3;`
    pub const INT8: i32 = 3;
    /// `UINT16 = 4;`
    pub const UINT16: i32 = 4;
    /// `INT16 = 5;`
    pub const INT16: i32 = 5;
    /// `INT32 = 6;`
    pub const INT32: i32 = 6;
    /// `INT64 = 7;`
    pub const INT64: i32 = 7;
    /// `BOOL = 9;`
    pub const BOOL: i32 = 9;
    /// `DOUBLE = 11;`
    pub const DOUBLE: i32 = 11;

    /// The spec's name of a `TensorProto.DataType` value, for error messages.
    pub fn name(data_type: i32) -> &'static str {
        match data_type {
            0 => "undefined",
            1 => "float32",
            2 => "uint8",
            3 => "int8",
            4 => "uint16",
            5 => "int16",
            6 => "int32",
            7 => "int64",
            8 => "string",
            9 => "bool",
            10 => "float16",
            11 => "float64",
            12 => "uint32",
            13 => "uint64",
            14 => "complex64",
            15 => "complex128",
            16 => "bfloat16",
            17..=20 => "float8",
            _ => "unknown",
        }
    }
}

/// `message TensorProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `repeated int64 dims = 1;`
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    /// `optional int32 data_type = 2;`
    #[prost(int32, optional, tag = "2")]
    pub data_type: Option<i32>,
    /// `repeated float float_data = 4 [packed = true];`
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    /// `repeated int32 int32_data = 5 [packed = true];`
    #[prost(int32, repeated, tag = "5")]
    pub int32_data: Vec<i32>,
    /// `repeated int64 int64_data = 7 [packed = true];`
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    /// `optional string name = 8;`
    #[prost(string, optional, tag = "8")]
    pub name: Option<String>,
    /// `optional bytes raw_data = 9;` (little-endian, fixed width).
    #[prost(bytes = "vec", optional, tag = "9")]
    pub raw_data: Option<Vec<u8>>,
    /// `repeated double double_data = 10 [packed = true];`
    #[prost(double, repeated, tag = "10")]
    pub double_data: Vec<f64>,
    /// `repeated StringStringEntryProto external_data = 13;`
    #[prost(message, repeated, tag = "13")]
    pub external_data: Vec<StringStringEntryProto>,
    /// `optional DataLocation data_location = 14;` (`DEFAULT = 0; EXTERNAL = 1;`).
    #[prost(int32, optional, tag = "14")]
    pub data_location: Option<i32>,
}

/// `TensorProto.DataLocation.EXTERNAL = 1;`
pub const DATA_LOCATION_EXTERNAL: i32 = 1;

/// `message StringStringEntryProto`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    /// `optional string key = 1;`
    #[prost(string, optional, tag = "1")]
    pub key: Option<String>,
    /// `optional string value = 2;`
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// Builders for hand-made models in unit tests.
#[cfg(test)]
pub(crate) mod build {
    use super::*;
    use prost::Message;

    /// A float32 value info with the given dimensions (`None` is `dim_param "N"`).
    pub(crate) fn value(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
        use tensor_shape_proto::{Dimension, dimension::Value};
        let dim = dims
            .iter()
            .map(|d| Dimension {
                value: Some(match d {
                    Some(v) => Value::DimValue(*v),
                    None => Value::DimParam("N".into()),
                }),
            })
            .collect();
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(data_type::FLOAT),
                    shape: Some(TensorShapeProto { dim }),
                })),
            }),
        }
    }

    /// A float32 initializer.
    pub(crate) fn floats(name: &str, dims: &[i64], data: Vec<f32>) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: dims.to_vec(),
            data_type: Some(data_type::FLOAT),
            float_data: data,
            ..Default::default()
        }
    }

    /// An int64 initializer.
    pub(crate) fn ints(name: &str, data: Vec<i64>) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: vec![data.len() as i64],
            data_type: Some(data_type::INT64),
            int64_data: data,
            ..Default::default()
        }
    }

    /// A node of the default domain.
    pub(crate) fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
        NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.iter().map(|s| s.to_string()).collect(),
            name: Some(name.into()),
            op_type: Some(op.into()),
            domain: None,
            attribute: vec![],
        }
    }

    /// An INT attribute.
    pub(crate) fn int_attr(name: &str, v: i64) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(v),
            ..Default::default()
        }
    }

    /// An INTS attribute.
    pub(crate) fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::Ints as i32),
            ints: v.to_vec(),
            ..Default::default()
        }
    }

    /// A STRING attribute.
    pub(crate) fn string_attr(name: &str, v: &str) -> AttributeProto {
        AttributeProto {
            name: Some(name.into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(v.as_bytes().to_vec()),
            ..Default::default()
        }
    }

    /// A serialised model of the default domain at `opset`.
    pub(crate) fn model(
        opset: i64,
        inputs: Vec<ValueInfoProto>,
        initializer: Vec<TensorProto>,
        node: Vec<NodeProto>,
        outputs: &[&str],
    ) -> Vec<u8> {
        ModelProto {
            ir_version: Some(8),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            producer_name: Some("capsule-onnx tests".into()),
            graph: Some(GraphProto {
                node,
                name: Some("test".into()),
                initializer,
                input: inputs,
                output: outputs
                    .iter()
                    .map(|o| value(o, &[]))
                    .map(|mut v| {
                        v.r#type = None;
                        v
                    })
                    .collect(),
                value_info: vec![],
            }),
        }
        .encode_to_vec()
    }
}
