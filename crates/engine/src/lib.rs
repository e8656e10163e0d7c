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
//!   im2col + GEMM (unrolled a band of rows at a time), with a direct
//!   kernel for depthwise (a vectorised one for 3x3), no im2col at all
//!   for pointwise (1x1) convolutions, and Winograd's F(2x2, 3x3) for 3x3
//!   stride-1 convolutions on large enough images. The GEMM is the `gemm` crate's
//!   (AVX-512, AVX2 or portable, chosen at run time), with a row-dot kernel
//!   of ours for dense layers at small batch; hot loops of ours are compiled
//!   per instruction set and dispatched at run time. All of it is reached
//!   through `kernels`, the only module with `unsafe` code.
//! - [`Plan::new`] fuses a Relu or Clip into the Conv before it when
//!   nothing else reads the Conv's output; every node keeps its step, so a
//!   [`WeightSource`] still sees every node.
//! - Threads: one knob, [`set_threads`]; rayon across batch items, groups,
//!   channel planes and image rows, and the GEMM's own splitting on the
//!   same pool, never both for one product. A run with more than one
//!   thread (and not under 100 µs last time) moves onto one of the pool's
//!   workers and keeps the others awake until 1 ms after their last work,
//!   so its parallel regions start without waking anyone.
//! - Memory: intermediate buffers are recycled within a run instead of
//!   being allocated and zeroed per node.
//! - [`Staged`] and [`StreamedGemm`] let a caller run a dense layer whose
//!   weights arrive row block by row block (the enclave's memory budget),
//!   bit for bit as the plan would at small batch.
//! - [`npy`] reads and writes the `.npy` tensors test vectors and the CLI use.
//! - Nothing panics on user data: bad graphs, weights, inputs and `.npy`
//!   files are [`Error`] values that say what was expected.
//!
//! Not here: ONNX parsing (the `capsule-onnx` crate, provider side only),
//! decryption (`capsule-format`), any notion of a query budget, and
//! `f16`/quantised arithmetic.

mod buffers;
mod error;
mod graph;
#[allow(unsafe_code)]
mod kernels;
mod model;
pub mod npy;
mod ops;
mod plan;
mod streamed;
mod tensor;
mod threads;

pub use error::Error;
pub use graph::{Activation, ConvAttrs, Graph, Node, Op, ParamInfo, PoolAttrs, ValueInfo};
pub use kernels::{
    LINE_ALIGNED_FROM, LineAligned, instruction_set, last_level_cache, zero_uncached,
};
pub use model::Model;
pub use npy::{read_npy, write_npy};
pub use plan::{Plan, WeightSource};
pub use streamed::{STREAMED_GEMM_EXACT_ROWS, Staged, StreamedGemm};
pub use tensor::Tensor;
pub use threads::{set_threads, threads};

// The engine's tests run on the allocator its binaries install, so that
// valgrind's run of them (scripts/memcheck.sh) checks it too.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: LineAligned = LineAligned;
