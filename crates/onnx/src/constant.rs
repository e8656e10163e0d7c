//! Constant values: initializers and `Constant` nodes, decoded from `TensorProto`.
//!
//! Float tensors become engine [`Tensor`]s (float64 is narrowed to float32);
//! integer tensors are kept as `i64` because they only ever feed attributes
//! (a Reshape's shape, say): the engine computes in float32 only.

use capsule_engine::Tensor;

use crate::Error;
use crate::proto::{DATA_LOCATION_EXTERNAL, TensorProto, data_type};

/// A value known at import time.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Constant {
    /// A float tensor (stored as float32).
    Float(Tensor),
    /// An integer tensor (any integer type or bool in the model).
    Int {
        /// Dimensions.
        shape: Vec<usize>,
        /// Values, row-major.
        values: Vec<i64>,
    },
}

impl Constant {
    /// The constant's dimensions.
    pub(crate) fn shape(&self) -> &[usize] {
        match self {
            Constant::Float(t) => t.shape(),
            Constant::Int { shape, .. } => shape,
        }
    }

    /// The ONNX name of the constant's element type, for messages.
    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Constant::Float(_) => "float32",
            Constant::Int { .. } => "int64",
        }
    }

    /// Decodes a `TensorProto`. `name` is the value name used in messages
    /// (a `Constant` node's tensor often has none of its own).
    pub(crate) fn from_proto(tensor: &TensorProto, name: &str) -> Result<Constant, Error> {
        if tensor.data_location == Some(DATA_LOCATION_EXTERNAL) || !tensor.external_data.is_empty()
        {
            return Err(Error::ExternalData {
                tensor: name.to_string(),
            });
        }
        let shape = dims(&tensor.dims, name)?;
        let count = element_count(&shape)
            .ok_or_else(|| Error::invalid(format!("tensor '{name}' has an overflowing size")))?;
        let raw = tensor.raw_data.as_deref().filter(|r| !r.is_empty());
        let dt = tensor.data_type.unwrap_or(0);
        let constant = match dt {
            data_type::FLOAT => {
                let values = match raw {
                    Some(raw) => le_words::<4>(raw, count, name)?
                        .map(f32::from_le_bytes)
                        .collect(),
                    None => tensor.float_data.clone(),
                };
                float(shape, values, count, name)?
            }
            data_type::DOUBLE => {
                // Narrowing is what the engine would do anyway; float64 weights
                // come from exporters that default to double, not from a need.
                let values = match raw {
                    Some(raw) => le_words::<8>(raw, count, name)?
                        .map(|b| f64::from_le_bytes(b) as f32)
                        .collect(),
                    None => tensor.double_data.iter().map(|&v| v as f32).collect(),
                };
                float(shape, values, count, name)?
            }
            data_type::INT64 => {
                let values = match raw {
                    Some(raw) => le_words::<8>(raw, count, name)?
                        .map(i64::from_le_bytes)
                        .collect(),
                    None => tensor.int64_data.clone(),
                };
                int(shape, values, count, name)?
            }
            data_type::INT32 => {
                let values = match raw {
                    Some(raw) => le_words::<4>(raw, count, name)?
                        .map(|b| i64::from(i32::from_le_bytes(b)))
                        .collect(),
                    None => tensor.int32_data.iter().map(|&v| i64::from(v)).collect(),
                };
                int(shape, values, count, name)?
            }
            data_type::BOOL | data_type::INT8 | data_type::UINT8 => {
                // Small integers live in int32_data, or one byte each in raw_data.
                let values = match raw {
                    Some(raw) => le_words::<1>(raw, count, name)?
                        .map(|[b]| match dt {
                            data_type::INT8 => i64::from(b as i8),
                            _ => i64::from(b),
                        })
                        .collect(),
                    None => tensor.int32_data.iter().map(|&v| i64::from(v)).collect(),
                };
                int(shape, values, count, name)?
            }
            data_type::INT16 | data_type::UINT16 => {
                let values = match raw {
                    Some(raw) => le_words::<2>(raw, count, name)?
                        .map(|b| match dt {
                            data_type::INT16 => i64::from(i16::from_le_bytes(b)),
                            _ => i64::from(u16::from_le_bytes(b)),
                        })
                        .collect(),
                    None => tensor.int32_data.iter().map(|&v| i64::from(v)).collect(),
                };
                int(shape, values, count, name)?
            }
            other => {
                return Err(Error::UnsupportedDataType {
                    value: name.to_string(),
                    data_type: data_type::name(other).to_string(),
                });
            }
        };
        Ok(constant)
    }
}

/// Converts ONNX dimensions (int64) to sizes, rejecting negative ones.
pub(crate) fn dims(raw: &[i64], name: &str) -> Result<Vec<usize>, Error> {
    raw.iter()
        .map(|&d| {
            usize::try_from(d).map_err(|_| {
                Error::invalid(format!("tensor '{name}' has a negative dimension {d}"))
            })
        })
        .collect()
}

/// The number of elements of `shape`, or `None` on overflow.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// Splits little-endian raw data into `count` words of `N` bytes.
fn le_words<'a, const N: usize>(
    raw: &'a [u8],
    count: usize,
    name: &str,
) -> Result<impl Iterator<Item = [u8; N]> + 'a, Error> {
    if Some(raw.len()) != count.checked_mul(N) {
        return Err(Error::invalid(format!(
            "tensor '{name}' has {} bytes of raw data but its shape needs {count} values of {N} bytes",
            raw.len()
        )));
    }
    Ok(raw.chunks_exact(N).map(|c| {
        let mut word = [0u8; N];
        word.copy_from_slice(c);
        word
    }))
}

fn float(shape: Vec<usize>, values: Vec<f32>, count: usize, name: &str) -> Result<Constant, Error> {
    check_count(values.len(), count, name)?;
    let tensor = Tensor::new(shape, values).map_err(|e| Error::invalid(e.to_string()))?;
    Ok(Constant::Float(tensor))
}

fn int(shape: Vec<usize>, values: Vec<i64>, count: usize, name: &str) -> Result<Constant, Error> {
    check_count(values.len(), count, name)?;
    Ok(Constant::Int { shape, values })
}

fn check_count(got: usize, want: usize, name: &str) -> Result<(), Error> {
    if got != want {
        return Err(Error::invalid(format!(
            "tensor '{name}' holds {got} values but its shape needs {want}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proto(dims: Vec<i64>, data_type: i32) -> TensorProto {
        TensorProto {
            dims,
            data_type: Some(data_type),
            ..Default::default()
        }
    }

    #[test]
    fn float_from_raw_and_typed_fields_agree() {
        let mut typed = proto(vec![2], data_type::FLOAT);
        typed.float_data = vec![1.5, -2.0];
        let mut raw = proto(vec![2], data_type::FLOAT);
        raw.raw_data = Some(
            [1.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        );
        assert_eq!(
            Constant::from_proto(&typed, "t").unwrap(),
            Constant::from_proto(&raw, "t").unwrap()
        );
    }

    #[test]
    fn doubles_are_narrowed_and_int32_widened() {
        let mut d = proto(vec![1], data_type::DOUBLE);
        d.double_data = vec![0.25];
        let Constant::Float(t) = Constant::from_proto(&d, "d").unwrap() else {
            panic!("float expected")
        };
        assert_eq!(t.data(), &[0.25]);
        let mut i = proto(vec![2], data_type::INT32);
        i.raw_data = Some([-1i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect());
        let c = Constant::from_proto(&i, "i").unwrap();
        assert_eq!(
            c,
            Constant::Int {
                shape: vec![2],
                values: vec![-1, 7]
            }
        );
    }

    #[test]
    fn small_integers_and_bools_widen() {
        let mut b = proto(vec![2], data_type::BOOL);
        b.raw_data = Some(vec![1, 0]);
        let mut i8s = proto(vec![2], data_type::INT8);
        i8s.raw_data = Some(vec![0xff, 3]);
        let mut u16s = proto(vec![1], data_type::UINT16);
        u16s.int32_data = vec![65535];
        let values = |t: &TensorProto| match Constant::from_proto(t, "t").unwrap() {
            Constant::Int { values, .. } => values,
            Constant::Float(_) => panic!("int expected"),
        };
        assert_eq!(values(&b), [1, 0]);
        assert_eq!(values(&i8s), [-1, 3]);
        assert_eq!(values(&u16s), [65535]);
    }

    #[test]
    fn size_mismatch_and_external_data_are_rejected() {
        let mut short = proto(vec![3], data_type::FLOAT);
        short.float_data = vec![1.0];
        assert!(matches!(
            Constant::from_proto(&short, "s"),
            Err(Error::InvalidModel { .. })
        ));
        let mut raw = proto(vec![3], data_type::FLOAT);
        raw.raw_data = Some(vec![0; 5]);
        assert!(matches!(
            Constant::from_proto(&raw, "r"),
            Err(Error::InvalidModel { .. })
        ));
        let mut ext = proto(vec![3], data_type::FLOAT);
        ext.data_location = Some(DATA_LOCATION_EXTERNAL);
        assert_eq!(
            Constant::from_proto(&ext, "w"),
            Err(Error::ExternalData { tensor: "w".into() })
        );
        let huge = proto(vec![i64::MAX, i64::MAX], data_type::FLOAT);
        assert!(Constant::from_proto(&huge, "h").is_err());
        let f16 = proto(vec![1], 10);
        assert!(matches!(
            Constant::from_proto(&f16, "h"),
            Err(Error::UnsupportedDataType { .. })
        ));
    }
}
