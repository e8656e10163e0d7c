//! Dense `f32` tensors, row-major.

/// A dense row-major `f32` tensor.
///
/// The engine computes in `f32` only; integer operands (shapes, bounds) are
/// attributes of the graph, never tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// A tensor with the given shape and data.
    ///
    /// Fails with [`crate::Error::ShapeMismatch`] when `data.len()` is not the product of `shape`.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Tensor, crate::Error> {
        let Some(expected) = volume(&shape) else {
            return Err(crate::Error::ShapeMismatch {
                context: "tensor".into(),
                reason: format!("shape {shape:?} has more elements than memory can hold"),
            });
        };
        if expected != data.len() {
            return Err(crate::Error::ShapeMismatch {
                context: "tensor".into(),
                reason: format!(
                    "shape {shape:?} needs {expected} values but {} were given",
                    data.len()
                ),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor from parts the caller has already checked: `data.len()` is
    /// the volume of `shape`.
    pub(crate) fn from_parts(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        debug_assert_eq!(volume(&shape), Some(data.len()), "shape {shape:?}");
        Tensor { shape, data }
    }

    /// A tensor of zeros.
    ///
    /// # Panics
    ///
    /// When `shape` has more elements than memory can hold.
    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = volume(&shape).expect("tensor shape too large for memory");
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    /// The dimensions.
    #[must_use]
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    #[must_use]
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Splits into shape and data.
    pub fn into_parts(self) -> (Vec<usize>, Vec<f32>) {
        (self.shape, self.data)
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(self, shape: Vec<usize>) -> Result<Tensor, crate::Error> {
        Tensor::new(shape, self.data)
    }
}

/// The number of elements of `shape`, or `None` when it would not fit in
/// memory (more `f32`s than `isize::MAX` bytes), so that no later product of
/// its dimensions can overflow.
///
/// A shape with a zero dimension has no elements whatever its other
/// dimensions are.
pub(crate) fn volume(shape: &[usize]) -> Option<usize> {
    if shape.contains(&0) {
        return Some(0);
    }
    let max = isize::MAX.unsigned_abs() / size_of::<f32>();
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= max)
}
