//! The provider's defense policy (spec/policy.md): what the enclave does to every query.
//!
//! The provider writes it as TOML (`mlcapsule seal --policy policy.toml`, parsed by
//! [`Policy::from_toml`]); the capsule stores it as JSON, authenticated with the header, with
//! every default written out so that a later change of a default cannot change what a sealed
//! capsule does. Unknown tables and keys are rejected in both forms: a restriction a reader
//! does not understand cannot be enforced.
//!
//! Parsing checks the shape; [`Policy::validate`] checks the values. The enclave must call
//! `validate` on the policy it reads from the capsule before using it.

use serde::{Deserialize, Serialize};

use crate::Error;

/// The defense section of a capsule's policy. Every section is optional; an empty policy
/// changes nothing.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Membership-inference noising (MLCapsule Algorithm 1). Absent: off.
    #[serde(default)]
    pub noise: Option<NoisePolicy>,
    /// What the released output may reveal. Absent: the full posterior.
    #[serde(default)]
    pub output: OutputPolicy,
    /// PRADA model-stealing detection. Absent: off.
    #[serde(default)]
    pub prada: Option<PradaPolicy>,
    /// The input detector's decision rule (kennen-io). Absent: no detector.
    #[serde(default)]
    pub detector: Option<DetectorPolicy>,
}

/// `[noise]`: P' = (1 − cα) P + cα T with α = 1 − H(P) / log |P| (see [`crate::noise`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoisePolicy {
    /// Strength c in [0, 1]; 0 is off, 1 sends a one-hot posterior all the way to the prior.
    /// Required: choose it by cross-validation (the paper finds about 0.5).
    pub c: f64,
    /// The noise posterior T: the training set's class prior, one entry per class, summing to
    /// 1 (within 1e-3; it is renormalised). Absent: uniform over the model's classes, which
    /// never changes the predicted label for c < 1.
    #[serde(default)]
    pub prior: Option<Vec<f64>>,
}

/// `[output]`: what of the (noised) posterior is released. All fields default to "off".
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputPolicy {
    /// Reverse sigmoid perturbation (Lee et al. 2019). Absent: off.
    #[serde(default)]
    pub reverse_sigmoid: Option<ReverseSigmoid>,
    /// Keep only the k largest entries in place and set the others to 0, without
    /// renormalising. Absent: keep all.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Release only the label: a one-hot vector at the argmax. Default false. Excludes `top_k`.
    #[serde(default)]
    pub label_only: bool,
    /// Round every entry to this many decimals (0..=8), half away from zero, without
    /// renormalising. Absent: full precision.
    #[serde(default)]
    pub round: Option<u32>,
}

/// Reverse sigmoid parameters: r(y) = β (s(γ s⁻¹(y)) − ½), ỹ ∝ clip(y − r(y), 0, 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReverseSigmoid {
    /// Magnitude β in (0, 100]. Default 1.0 (IBM ART's default).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Slope γ in (0, 100]. Default 0.1 (IBM ART's default).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
}

impl Default for ReverseSigmoid {
    fn default() -> Self {
        ReverseSigmoid {
            beta: default_beta(),
            gamma: default_gamma(),
        }
    }
}

/// `[prada]`: PRADA (Juuti et al. 2019) per enclave instance, see [`crate::Prada`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PradaPolicy {
    /// Alarm when the Shapiro–Wilk W of the distances is below δ, in (0, 1). Required:
    /// calibrate it on benign streams (PRADA picks the largest value with no benign alarm;
    /// typical values 0.90 to 0.96).
    pub delta: f64,
    /// What an alarm does. Required.
    pub action: PradaAction,
    /// Test only when more than this many distances remain after trimming (PRADA: 100).
    /// At least 2, since Shapiro–Wilk needs 3 values.
    #[serde(default = "default_min_distances")]
    pub min_distances: usize,
    /// Only classes with at least this many recorded distances feed the test (PRADA's code:
    /// 10).
    #[serde(default = "default_min_class_distances")]
    pub min_class_distances: usize,
    /// Run the test on every n-th query (PRADA's code: 10; 1 tests every query).
    #[serde(default = "default_test_every")]
    pub test_every: u64,
    /// Before the test, drop distances more than this many standard deviations from their
    /// mean (PRADA: 3).
    #[serde(default = "default_trim_sigmas")]
    pub trim_sigmas: f64,
    /// Most queries kept in the growing sets, all classes together; when full, the oldest
    /// stored query is forgotten. Default 3000 (the MLCapsule paper's set size).
    #[serde(default = "default_max_stored")]
    pub max_stored: usize,
    /// Most distances kept for the test, all classes together; when full, the oldest is
    /// forgotten. Default 5000 (the largest n Royston validated).
    #[serde(default = "default_max_distances")]
    pub max_distances: usize,
    /// Start each class's DG (the distances of stored queries) with a 0, as the PRADA authors'
    /// code does, instead of empty, as the paper does. Default false. With `true` the
    /// threshold rises more slowly and the growing sets grow several times faster (on MNIST
    /// about two thirds of benign queries are stored instead of one in fifteen), which costs
    /// memory and time per query; see spec/policy.md for measured effects on W.
    #[serde(default)]
    pub dg_initial_zero: bool,
    /// How stored queries are kept. Default `u8`.
    #[serde(default)]
    pub storage: Storage,
}

/// What a PRADA alarm does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PradaAction {
    /// Refuse the query that raised the alarm and every later one (the alarm latches).
    Deny,
    /// Answer as usual; the alarm is recorded in the state for the provider to see.
    Record,
}

/// How PRADA keeps its stored queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// Exact `f32` values: 4 bytes a value.
    F32,
    /// Each query quantised to 8 bits between its own minimum and maximum: 1 byte a value plus
    /// 8 bytes a query. The error is at most (max − min) / 510 per value, which moves an L2
    /// distance over 784 values by well under 1 % of a typical distance between images; an
    /// image of 8-bit pixels scaled to [0, 1] is stored exactly when it uses both 0 and 255.
    #[default]
    U8,
}

/// `[detector]`: the decision rule for the input detector network sealed in the capsule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectorPolicy {
    /// Run the detector. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Refuse a query when the detector's probability of "crafted" is at least this, in
    /// (0, 1]. Default 0.5.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Index of the "crafted input" class in the detector's output. Default 1. Ignored when
    /// the detector has a single output (then that output is the probability or logit).
    #[serde(default = "default_crafted_class")]
    pub crafted_class: usize,
    /// Whether the detector's outputs are probabilities or logits. Default `probabilities`.
    #[serde(default)]
    pub scores: DetectorScores,
}

/// What the detector network's outputs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectorScores {
    /// Probabilities: the graph ends in softmax (or sigmoid, for one output).
    #[default]
    Probabilities,
    /// Logits: softmax (or sigmoid, for one output) is applied here.
    Logits,
}

fn default_beta() -> f64 {
    1.0
}
fn default_gamma() -> f64 {
    0.1
}
fn default_min_distances() -> usize {
    100
}
fn default_min_class_distances() -> usize {
    10
}
fn default_test_every() -> u64 {
    10
}
fn default_trim_sigmas() -> f64 {
    3.0
}
fn default_max_stored() -> usize {
    3000
}
fn default_max_distances() -> usize {
    5000
}
fn default_true() -> bool {
    true
}
fn default_threshold() -> f64 {
    0.5
}
fn default_crafted_class() -> usize {
    1
}

/// Largest `max_stored`: bounds PRADA's memory whatever the provider writes.
pub const MAX_STORED_LIMIT: usize = 100_000;
/// Largest `max_distances`.
pub const MAX_DISTANCES_LIMIT: usize = 100_000;
/// Largest `round`: more decimals than `f32` holds near 1.
pub const MAX_ROUND_DECIMALS: u32 = 8;
/// Largest reverse sigmoid β and γ: beyond, the output is noise.
pub const MAX_REVERSE_SIGMOID: f64 = 100.0;
/// How far the prior's sum may be from 1.
pub const PRIOR_SUM_TOLERANCE: f64 = 1e-3;

fn invalid(field: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidPolicy {
        field,
        reason: reason.into(),
    }
}

impl Policy {
    /// Parses the provider's `policy.toml` and validates it.
    ///
    /// ```
    /// let policy = capsule_defense::Policy::from_toml(r#"
    ///     [noise]
    ///     c = 0.5
    ///     [output]
    ///     round = 3
    ///     [prada]
    ///     delta = 0.95
    ///     action = "deny"
    /// "#)?;
    /// assert_eq!(policy.prada.unwrap().max_stored, 3000);
    /// # Ok::<(), capsule_defense::Error>(())
    /// ```
    #[cfg(feature = "toml")]
    pub fn from_toml(text: &str) -> Result<Policy, Error> {
        let policy: Policy = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| {
                let before = text.get(..span.start).unwrap_or(text);
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            Error::PolicySyntax {
                message: format!("{}{}", at.unwrap_or_default(), e.message().trim_end()),
            }
        })?;
        policy.validate()?;
        Ok(policy)
    }

    /// True when the policy changes nothing: no noise, no output restriction, no PRADA, no
    /// detector.
    pub fn is_empty(&self) -> bool {
        self.noise.is_none()
            && self.output == OutputPolicy::default()
            && self.prada.is_none()
            && self.detector.is_none()
    }

    /// Checks every value's range and the combinations (spec/policy.md). Independent of the
    /// model; [`Policy::validate_for_model`] adds the checks that need its class count.
    pub fn validate(&self) -> Result<(), Error> {
        if let Some(noise) = &self.noise {
            noise.validate()?;
        }
        self.output.validate()?;
        if let Some(prada) = &self.prada {
            prada.validate()?;
        }
        if let Some(detector) = &self.detector {
            detector.validate()?;
        }
        Ok(())
    }

    /// [`Policy::validate`], plus the checks against a model with `classes` outputs: the
    /// prior's length and `top_k`. `mlcapsule seal` calls it; so may the enclave at load.
    pub fn validate_for_model(&self, classes: usize) -> Result<(), Error> {
        self.validate()?;
        if let Some(prior) = self.noise.as_ref().and_then(|n| n.prior.as_ref())
            && prior.len() != classes
        {
            return Err(Error::ClassCountMismatch {
                what: "noise.prior",
                expected: classes,
                found: prior.len(),
            });
        }
        if let Some(k) = self.output.top_k
            && k > classes
        {
            return Err(invalid(
                "output.top_k",
                format!("{k} is more than the model's {classes} classes; lower it or remove it"),
            ));
        }
        Ok(())
    }
}

impl NoisePolicy {
    /// Checks `c` and the prior.
    pub fn validate(&self) -> Result<(), Error> {
        if !(0.0..=1.0).contains(&self.c) {
            return Err(invalid(
                "noise.c",
                format!("{} is outside 0..=1; use 0 (off) to 1 (strongest)", self.c),
            ));
        }
        if let Some(prior) = &self.prior {
            if prior.is_empty() {
                return Err(invalid(
                    "noise.prior",
                    "is empty; give one share per class, or omit it for a uniform prior",
                ));
            }
            if let Some(v) = prior.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                return Err(invalid(
                    "noise.prior",
                    format!("holds {v}; every share must be a number >= 0"),
                ));
            }
            let sum: f64 = prior.iter().sum();
            if (sum - 1.0).abs() > PRIOR_SUM_TOLERANCE {
                return Err(invalid(
                    "noise.prior",
                    format!(
                        "sums to {sum}, not 1; give the training set's class shares (count / total)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl OutputPolicy {
    /// Checks `top_k`, `round`, `reverse_sigmoid` and that `top_k` and `label_only` are not
    /// both set.
    pub fn validate(&self) -> Result<(), Error> {
        if self.top_k == Some(0) {
            return Err(invalid(
                "output.top_k",
                "0 would release nothing; use 1 or more, or label_only = true",
            ));
        }
        if self.label_only && self.top_k.is_some() {
            return Err(invalid(
                "output.top_k",
                "cannot be combined with label_only = true; keep one of them",
            ));
        }
        if let Some(d) = self.round
            && d > MAX_ROUND_DECIMALS
        {
            return Err(invalid(
                "output.round",
                format!(
                    "{d} decimals is below f32 precision; use 0..={MAX_ROUND_DECIMALS} or remove it"
                ),
            ));
        }
        if let Some(rs) = &self.reverse_sigmoid {
            if !(rs.beta > 0.0 && rs.beta <= MAX_REVERSE_SIGMOID) {
                return Err(invalid(
                    "output.reverse_sigmoid.beta",
                    format!(
                        "{} is outside (0, {MAX_REVERSE_SIGMOID}]; ART's default is 1.0",
                        rs.beta
                    ),
                ));
            }
            if !(rs.gamma > 0.0 && rs.gamma <= MAX_REVERSE_SIGMOID) {
                return Err(invalid(
                    "output.reverse_sigmoid.gamma",
                    format!(
                        "{} is outside (0, {MAX_REVERSE_SIGMOID}]; ART's default is 0.1",
                        rs.gamma
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl PradaPolicy {
    /// A policy with PRADA's own defaults and the given δ and action.
    pub fn new(delta: f64, action: PradaAction) -> PradaPolicy {
        PradaPolicy {
            delta,
            action,
            min_distances: default_min_distances(),
            min_class_distances: default_min_class_distances(),
            test_every: default_test_every(),
            trim_sigmas: default_trim_sigmas(),
            max_stored: default_max_stored(),
            max_distances: default_max_distances(),
            dg_initial_zero: false,
            storage: Storage::default(),
        }
    }

    /// Checks every value's range and that the test can ever run.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(invalid(
                "prada.delta",
                format!(
                    "{} is outside (0, 1); calibrate it on benign streams (typically 0.90 to 0.96)",
                    self.delta
                ),
            ));
        }
        if self.min_distances < 2 {
            return Err(invalid(
                "prada.min_distances",
                "must be at least 2 (Shapiro-Wilk needs 3 values; PRADA uses 100)",
            ));
        }
        if self.test_every == 0 {
            return Err(invalid(
                "prada.test_every",
                "must be at least 1 (1 tests every query; PRADA uses 10)",
            ));
        }
        if !(self.trim_sigmas.is_finite() && self.trim_sigmas > 0.0) {
            return Err(invalid(
                "prada.trim_sigmas",
                format!("{} must be a number > 0 (PRADA uses 3)", self.trim_sigmas),
            ));
        }
        if !(1..=MAX_STORED_LIMIT).contains(&self.max_stored) {
            return Err(invalid(
                "prada.max_stored",
                format!(
                    "{} is outside 1..={MAX_STORED_LIMIT}; 3000 suits about 5000 benign queries",
                    self.max_stored
                ),
            ));
        }
        if !(1..=MAX_DISTANCES_LIMIT).contains(&self.max_distances) {
            return Err(invalid(
                "prada.max_distances",
                format!(
                    "{} is outside 1..={MAX_DISTANCES_LIMIT}; 5000 is the default",
                    self.max_distances
                ),
            ));
        }
        if self.max_distances <= self.min_distances {
            return Err(invalid(
                "prada.max_distances",
                format!(
                    "{} keeps no more than min_distances = {}, so the test would never run; \
                     raise max_distances",
                    self.max_distances, self.min_distances
                ),
            ));
        }
        Ok(())
    }

    /// Upper bound, in bytes, of the memory a [`crate::Prada`] under this policy holds for
    /// queries of `dim` values: the stored queries with their bookkeeping, the distances and
    /// the per-class statistics of up to [`crate::MAX_CLASSES`] classes seen. Scratch space
    /// for one test (16 bytes a distance) comes on top while the test runs.
    ///
    /// For MNIST (784 values), 10 classes and the defaults: 3000 × (784 + 20) + 5000 × 8 +
    /// 10 × 96 ≈ 2.45 MB with `u8`; 3000 × (4 × 784 + 12) + … ≈ 9.5 MB with `f32`. Sealed as
    /// JSON the stored queries take 4/3 of that (base64).
    pub fn memory_bound(&self, dim: usize, classes: usize) -> usize {
        let per_query = match self.storage {
            Storage::F32 => 4 * dim,
            Storage::U8 => dim + 8,
        } + 4 // the query's class
          + 8; // its place in its class's slot list (lists may hold twice their length)
        self.max_stored * per_query
            + self.max_distances * 8
            + classes.min(crate::MAX_CLASSES) * CLASS_BYTES
    }
}

/// Bytes of per-class bookkeeping: statistics (32), distance count (4), slot list header (24)
/// and its slack (up to 8 entries, 32), rounded up.
pub(crate) const CLASS_BYTES: usize = 96;

impl DetectorPolicy {
    /// Checks `threshold`.
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(invalid(
                "detector.threshold",
                format!(
                    "{} is outside (0, 1]; it is the detector's probability of \"crafted\" \
                     at which a query is refused (0.5 is the default)",
                    self.threshold
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_prada_s() {
        let p = PradaPolicy::new(0.95, PradaAction::Deny);
        assert_eq!(
            (p.min_distances, p.min_class_distances, p.test_every),
            (100, 10, 10)
        );
        assert_eq!((p.max_stored, p.max_distances), (3000, 5000));
        assert_eq!(p.trim_sigmas, 3.0);
        p.validate().unwrap();
    }

    #[test]
    fn memory_bound_for_mnist() {
        let mut p = PradaPolicy::new(0.95, PradaAction::Deny);
        let u8_bound = p.memory_bound(784, 10);
        assert!((2_300_000..2_500_000).contains(&u8_bound), "{u8_bound}");
        p.storage = Storage::F32;
        let f32_bound = p.memory_bound(784, 10);
        assert!((9_400_000..9_600_000).contains(&f32_bound), "{f32_bound}");
    }

    #[test]
    fn ranges_are_checked() {
        let mut p = Policy {
            noise: Some(NoisePolicy {
                c: 1.5,
                prior: None,
            }),
            ..Policy::default()
        };
        assert!(matches!(
            p.validate(),
            Err(Error::InvalidPolicy {
                field: "noise.c",
                ..
            })
        ));
        p.noise = Some(NoisePolicy {
            c: 0.5,
            prior: Some(vec![0.5, 0.6]),
        });
        assert!(matches!(
            p.validate(),
            Err(Error::InvalidPolicy {
                field: "noise.prior",
                ..
            })
        ));
        p.noise = Some(NoisePolicy {
            c: 0.5,
            prior: Some(vec![0.5, 0.5]),
        });
        p.validate().unwrap();
        assert!(matches!(
            p.validate_for_model(3),
            Err(Error::ClassCountMismatch { .. })
        ));
        p.output.label_only = true;
        p.output.top_k = Some(2);
        assert!(matches!(
            p.validate(),
            Err(Error::InvalidPolicy {
                field: "output.top_k",
                ..
            })
        ));
        p.output.top_k = None;
        let mut prada = PradaPolicy::new(1.0, PradaAction::Record);
        p.prada = Some(prada.clone());
        assert!(p.validate().is_err());
        prada.delta = 0.9;
        prada.max_distances = 100;
        p.prada = Some(prada);
        assert!(matches!(
            p.validate(),
            Err(Error::InvalidPolicy {
                field: "prada.max_distances",
                ..
            })
        ));
    }
}
