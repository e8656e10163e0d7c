//! MLCapsule's attack lab: the measurements behind the defenses of `capsule-defense`
//! (issue 5; MLCapsule paper §7).
//!
//! It trains small MNIST networks on the CPU with candle's autograd, attacks them through
//! their query interface with each defense in the way, and reports what the attacker got:
//!
//! - [`mia`]: an overfit target, ML-Leaks' threshold attacks (max posterior, entropy) and
//!   MLCapsule's noising (Algorithm 1) for c = 0, 0.1, …, 1: the paper's Figure 4.
//! - [`prada_eval`]: benign query streams, a Papernot Jacobian-augmentation attack and a
//!   random-query attack, each through [`capsule_defense::Prada`]: false alarms and queries
//!   to detection.
//! - [`kennen`]: a family of small classifiers with varied attributes, kennen-io queries
//!   crafted against them, and MLCapsule's input detector trained to refuse such queries,
//!   exported to our engine's IR ([`kennen::detector_graph`]).
//!
//! Every network the lab trains exports to `capsule_engine`'s IR ([`models::Cnn::to_engine`]),
//! where it computes the same outputs as in candle to within 1e-4 (tested).
//!
//! ```no_run
//! use capsule_lab::{data::Dataset, mia};
//! let data = Dataset::load("build/mnist".as_ref())?;
//! let report = mia::run(&data, &mia::MiaConfig::quick())?;
//! for row in &report.rows {
//!     println!("c={:.1} AUC={:.3} labels kept={:.4}", row.c, row.auc_entropy, row.label_kept);
//! }
//! capsule_lab::plot::render(&report.panels(), "mia.png".as_ref())?;
//! # Ok::<(), capsule_lab::Error>(())
//! ```
//!
//! Determinism: every random draw (subsets, initial weights, dropout masks, shuffles, attack
//! noise) comes from the seeded [`rng::Rng`]; candle's own CPU random numbers cannot be seeded
//! and are never used. The same seed gives the same figures on the same machine.
//!
//! What it does not do: it reads no file but the IDX data it is pointed at and writes only
//! the plots it is asked for (the `mlcapsule lab` command writes the JSON and chooses the
//! paths); it downloads nothing; it implements no defense (those are `capsule-defense`'s, used
//! as they run in the enclave); and its models are small on purpose: these are CPU-minute
//! reproductions of the paper's experiments, not its CIFAR-100/VGG-16 setup.

mod error;

pub mod data;
pub mod kennen;
pub mod metrics;
pub mod mia;
pub mod models;
pub mod plot;
pub mod prada_eval;
pub mod rng;
pub mod train;

pub use error::Error;
