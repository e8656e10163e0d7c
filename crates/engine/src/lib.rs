//! MLCapsule's inference engine: tensors, the graph IR, operators and the executor.
//!
//! The engine runs a [`Graph`] (public architecture) on weights supplied by
//! the caller: plain weights on the provider's side, weights unsealed inside
//! the enclave on the client's. It knows nothing about capsules, keys or files
//! other than `.npy` tensors; it has no crypto and no network.
//!
//! ```
//! use capsule_engine::{Graph, Model, Op, Node, ValueInfo, Tensor};
//! let graph = Graph {
//!     inputs: vec![ValueInfo { name: "x".into(), shape: vec![None, Some(3)] }],
//!     params: vec![],
//!     nodes: vec![Node { name: "relu".into(), op: Op::Relu,
//!                        inputs: vec!["x".into()], outputs: vec!["y".into()] }],
//!     outputs: vec!["y".into()],
//! };
//! let model = Model::new(graph, Default::default()).unwrap();
//! let x = Tensor::new(vec![1, 3], vec![-1.0, 0.5, 2.0]).unwrap();
//! let y = model.run(&[x]).unwrap();
//! assert_eq!(y[0].data(), &[0.0, 0.5, 2.0]);
//! ```
//!
//! # Design
//!
//! - [`Plan::new`] checks a graph once (names, arities, attributes) and
//!   compiles it into steps over numbered slots with precomputed last uses;
//!   running it looks nothing up by name, hands each value to its last
//!   reader by move and frees intermediates as soon as they are dead.
//! - Weights reach the executor through a [`WeightSource`], node by node:
//!   a [`Model`] holds them all, the enclave can unseal one layer at a time.
//! - Kernels live in `ops`, one module per operator family. Convolution is
//!   im2col + GEMM, with a direct kernel for depthwise and no im2col at all
//!   for pointwise (1x1) convolutions. The GEMM is `matrixmultiply`'s,
//!   reached through `kernels`, the only module with `unsafe` code.
//! - Threads: rayon across batch items, groups and channel planes, and
//!   `matrixmultiply`'s own threads inside large products; a product uses
//!   one or the other, never both (see `kernels`).
//! - [`npy`] reads and writes the `.npy` tensors test vectors and the CLI use.
//! - Nothing panics on user data: bad graphs, weights, inputs and `.npy`
//!   files are [`Error`] values that say what was expected.
//!
//! Not here: ONNX parsing (the `capsule-onnx` crate, provider side only),
//! decryption (`capsule-format`), any notion of a query budget, and
//! `f16`/quantised arithmetic.

mod error;
mod graph;
#[allow(unsafe_code)]
mod kernels;
mod model;
pub mod npy;
mod ops;
mod plan;
mod tensor;

pub use error::Error;
pub use graph::{Activation, ConvAttrs, Graph, Node, Op, ParamInfo, PoolAttrs, ValueInfo};
pub use model::Model;
pub use npy::{read_npy, write_npy};
pub use plan::{Plan, WeightSource};
pub use tensor::Tensor;
