//! MLCapsule's defenses against black-box attacks through the query interface, run by the
//! enclave on every query under the provider's policy (spec/policy.md; MLCapsule paper §7).
//!
//! - [`Policy`]: the provider's defense policy, parsed from `policy.toml`
//!   ([`Policy::from_toml`]), stored as JSON in the capsule, checked by [`Policy::validate`].
//! - [`Prada`]: PRADA model-stealing detection per enclave instance, with a bounded,
//!   serialisable [`PradaState`] that the enclave seals between runs.
//! - [`noise`]: membership-inference noising (the paper's Algorithm 1).
//! - [`output`]: top-k, label only, rounding, reverse sigmoid, and [`apply`], the pipeline
//!   that runs a policy's noise and output sections on a posterior in a fixed order.
//! - [`detector`]: the decision rule of the kennen-io input detector.
//! - [`shapiro_wilk`]: the Shapiro–Wilk test as scipy computes it (AS R94), which PRADA uses.
//!
//! The enclave's order on one query: the detector on the input (refuse if it says so), the
//! model, [`Prada::observe`] with the input and the predicted class (refuse if it says so),
//! then [`apply`] to the posterior, and release.
//!
//! ```
//! use capsule_defense::{Policy, Prada, Verdict, apply, argmax};
//!
//! let policy = Policy::from_toml(r#"
//!     [noise]
//!     c = 0.5
//!     [output]
//!     round = 2
//!     [prada]
//!     delta = 0.95
//!     action = "deny"
//! "#)?;
//! let mut prada = Prada::new(policy.prada.clone().unwrap())?;
//!
//! let input = [0.0f32; 784];
//! let posterior = [0.01f32, 0.97, 0.02];
//! let observation = prada.observe(&input, argmax(&posterior).unwrap())?;
//! assert_eq!(observation.verdict, Verdict::Answer);
//! let released = apply(&policy, &posterior)?;
//! assert_eq!(argmax(&released), Some(1));
//! assert!(released[1] < 0.97);
//!
//! // The enclave seals the state between runs.
//! let sealed = serde_json::to_vec(prada.state())?;
//! let prada = Prada::restore(policy.prada.unwrap(), serde_json::from_slice(&sealed)?)?;
//! assert_eq!(prada.state().queries(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Every function is a pure function of its inputs and of the state passed in; nothing here
//! draws random numbers, so the same queries give the same answers and the same state.
//!
//! What it does not do: no I/O (it reads no file; the CLI reads `policy.toml`, the enclave
//! seals the state), no cryptography (the capsule authenticates the policy, the enclave seals
//! the state), no inference (the caller runs the model and the detector network), and no
//! training (the detector network and the lab's attacks live elsewhere).

pub mod detector;
mod error;
mod growing_set;
pub mod noise;
pub mod output;
pub mod policy;
pub mod posterior;
mod prada;
mod shapiro;

pub use detector::DetectorDecision;
pub use error::Error;
pub use output::apply;
pub use policy::{
    DetectorPolicy, DetectorScores, NoisePolicy, OutputPolicy, Policy, PradaAction, PradaPolicy,
    ReverseSigmoid, Storage,
};
pub use posterior::argmax;
pub use prada::{MAX_CLASSES, Observation, Prada, PradaState, PradaTest, STATE_FORMAT, Verdict};
pub use shapiro::{ShapiroWilk, shapiro_wilk, shapiro_wilk_sorted};
