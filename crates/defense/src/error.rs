//! The crate's one error type.

use std::fmt;

/// Why a policy was rejected or a defense could not process a query.
///
/// Every message says what to do next. None of them carries a query's values, so an error
/// may be shown to the client without leaking an input or a posterior.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// The policy file is not valid TOML, or does not have the shape of spec/policy.md
    /// (unknown table or key, wrong type, missing required key).
    PolicySyntax {
        /// The parser's message, with line and column where it has them.
        message: String,
    },
    /// A policy value is out of its range or contradicts another (spec/policy.md).
    InvalidPolicy {
        /// The key concerned, e.g. `noise.c`.
        field: &'static str,
        /// What is wrong with it and what to write instead.
        reason: String,
    },
    /// A vector has another number of classes than the policy or the model expects.
    ClassCountMismatch {
        /// What was compared, e.g. "the noise prior".
        what: &'static str,
        /// Classes expected.
        expected: usize,
        /// Classes found.
        found: usize,
    },
    /// A PRADA query has another number of values than the earlier queries of this state.
    DimensionMismatch {
        /// Values per query in this state.
        expected: usize,
        /// Values in this query.
        found: usize,
    },
    /// A PRADA query is empty or holds a NaN or an infinity.
    NonFiniteInput,
    /// A predicted class index is larger than this crate handles ([`crate::MAX_CLASSES`]).
    ClassOutOfRange {
        /// The class index given.
        class: usize,
    },
    /// Shapiro–Wilk needs at least 3 values.
    TooFewSamples {
        /// Values given.
        n: usize,
    },
    /// Every value of a Shapiro–Wilk sample is the same, so W is undefined.
    ZeroRange,
    /// A restored PRADA state contradicts itself or the policy it is used with.
    InvalidState {
        /// What is inconsistent.
        reason: String,
    },
    /// The input detector's output does not have the class the policy names.
    DetectorOutput {
        /// Values in the detector's output.
        len: usize,
        /// The policy's `detector.crafted_class`.
        crafted_class: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::PolicySyntax { message } => write!(
                f,
                "the policy does not parse: {message}; fix it as spec/policy.md describes"
            ),
            Error::InvalidPolicy { field, reason } => {
                write!(f, "invalid policy value `{field}`: {reason}")
            }
            Error::ClassCountMismatch {
                what,
                expected,
                found,
            } => write!(
                f,
                "{what} has {found} classes but {expected} were expected; \
                 make the policy match the model's output (spec/policy.md)"
            ),
            Error::DimensionMismatch { expected, found } => write!(
                f,
                "PRADA query has {found} values but earlier queries had {expected}; \
                 send inputs of the model's input shape"
            ),
            Error::NonFiniteInput => write!(
                f,
                "PRADA query is empty or holds NaN or infinity; send finite inputs"
            ),
            Error::ClassOutOfRange { class } => write!(
                f,
                "predicted class {class} is above the supported maximum {}; \
                 models with more classes are not supported by PRADA",
                crate::MAX_CLASSES - 1
            ),
            Error::TooFewSamples { n } => write!(
                f,
                "Shapiro-Wilk needs at least 3 values, got {n}; collect more before testing"
            ),
            Error::ZeroRange => write!(
                f,
                "Shapiro-Wilk sample has zero range (all values equal), so W is undefined"
            ),
            Error::InvalidState { reason } => write!(
                f,
                "PRADA state is inconsistent: {reason}; it was made for another capsule \
                 or policy, start from a fresh state"
            ),
            Error::DetectorOutput { len, crafted_class } => write!(
                f,
                "the input detector returned {len} values, so it has no class {crafted_class}; \
                 set `detector.crafted_class` to the detector's \"crafted\" output index"
            ),
        }
    }
}

impl std::error::Error for Error {}
