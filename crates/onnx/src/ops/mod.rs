//! ONNX operator converters, registered per family in small tables.
//!
//! Each family module exports `OPS`, a table from ONNX `op_type` to a
//! converter. A converter reads one ONNX node through a [`NodeCx`], validates
//! its attributes (applying ONNX's defaults for the model's opset), folds its
//! constant operands into engine attributes, and appends engine nodes to the
//! [`Draft`]. An op type found in no table is [`Error::UnsupportedOp`].

mod batchnorm;
mod constant;
mod conv;
mod elementwise;
mod identity;
mod layout;
mod linear;
mod pool;
mod softmax;
mod window;

use capsule_engine::{Node, Op};

use crate::Error;
use crate::attributes::Attributes;
use crate::constant::Constant;
use crate::draft::Draft;

/// Converts one ONNX node into engine nodes appended to the draft.
pub(crate) type Convert = fn(&NodeCx<'_>, &mut Draft) -> Result<(), Error>;

/// Every family's table.
const FAMILIES: &[&[(&str, Convert)]] = &[
    conv::OPS,
    linear::OPS,
    pool::OPS,
    elementwise::OPS,
    layout::OPS,
    softmax::OPS,
    batchnorm::OPS,
    identity::OPS,
    constant::OPS,
];

/// The converter for an ONNX op type of the default domain, if we have one.
pub(crate) fn converter(op_type: &str) -> Option<Convert> {
    FAMILIES
        .iter()
        .flat_map(|family| family.iter())
        .find(|(name, _)| *name == op_type)
        .map(|&(_, convert)| convert)
}

/// The op types of the default domain that have a converter, for messages.
pub(crate) fn supported() -> impl Iterator<Item = &'static str> {
    FAMILIES
        .iter()
        .flat_map(|family| family.iter())
        .map(|&(name, _)| name)
}

/// One ONNX node as a converter sees it.
pub(crate) struct NodeCx<'a> {
    /// The node's unique name (generated when the model has none).
    pub(crate) name: &'a str,
    /// The ONNX op type.
    pub(crate) op: &'a str,
    /// The model's default-domain opset.
    pub(crate) opset: i64,
    /// Input value names; `""` marks an omitted optional input.
    pub(crate) inputs: &'a [String],
    /// Output value names; `""` marks an omitted optional output.
    pub(crate) outputs: &'a [String],
    /// The node's attributes.
    pub(crate) attrs: Attributes<'a>,
}

impl<'a> NodeCx<'a> {
    /// Input `i` when present (not omitted).
    pub(crate) fn input(&self, i: usize) -> Option<&'a str> {
        self.inputs
            .get(i)
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    /// Input `i`, which the operator requires; `what` is its name in the spec.
    pub(crate) fn required(&self, i: usize, what: &str) -> Result<&'a str, Error> {
        self.input(i)
            .ok_or_else(|| self.invalid(format!("its required input {what} (#{i}) is missing")))
    }

    /// The first output, which every supported operator must have.
    pub(crate) fn output(&self) -> Result<&'a str, Error> {
        self.outputs
            .first()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.invalid("it has no output".into()))
    }

    /// Checks that no output after the first is read; `what` names it in messages.
    pub(crate) fn only_first_output_used(&self, draft: &Draft, what: &str) -> Result<(), Error> {
        for extra in self.outputs.iter().skip(1).filter(|o| !o.is_empty()) {
            if draft.read_in_source(extra) {
                return Err(self.unsupported(format!(
                    "its output '{extra}' ({what}) is used, but only the first output is \
                     computed at inference"
                )));
            }
        }
        Ok(())
    }

    /// Appends an engine node for one step of this node's computation (an
    /// ONNX operator the engine runs as several), named after this node and
    /// `step`, and returns the name of the value it writes, likewise named
    /// after this node's first output.
    pub(crate) fn push_step(
        &self,
        draft: &mut Draft,
        step: &str,
        op: Op,
        inputs: Vec<String>,
    ) -> Result<String, Error> {
        let value = draft.fresh_value(&format!("{}.{step}", self.output()?));
        let name = draft.fresh_node(&format!("{}.{step}", self.name));
        draft.push(Node {
            name,
            op,
            inputs,
            outputs: vec![value.clone()],
        })?;
        Ok(value)
    }

    /// Appends an engine node named after this node, writing its first output.
    pub(crate) fn emit(&self, draft: &mut Draft, op: Op, inputs: Vec<String>) -> Result<(), Error> {
        draft.push(Node {
            name: self.name.to_string(),
            op,
            inputs,
            outputs: vec![self.output()?.to_string()],
        })
    }

    /// The constant behind input `i`, or an error saying the input must be constant.
    pub(crate) fn constant_input<'d>(
        &self,
        draft: &'d Draft,
        i: usize,
        what: &str,
    ) -> Result<&'d Constant, Error> {
        let name = self.required(i, what)?;
        draft.constant(name).ok_or_else(|| {
            self.unsupported(format!(
                "its input {what} ('{name}') is computed at run time, but the engine needs \
                 it as a constant; re-export the model with constant folding enabled"
            ))
        })
    }

    /// An [`Error::UnsupportedNode`] for this node.
    pub(crate) fn unsupported(&self, reason: String) -> Error {
        Error::UnsupportedNode {
            op: self.op.to_string(),
            node: self.name.to_string(),
            reason,
        }
    }

    /// An [`Error::InvalidModel`] about this node.
    pub(crate) fn invalid(&self, reason: String) -> Error {
        Error::invalid(format!("node '{}' ({}): {reason}", self.name, self.op))
    }
}

/// Converts ONNX integers (attribute values) to sizes, with `what` in messages.
pub(crate) fn to_usize(cx: &NodeCx<'_>, what: &str, value: i64) -> Result<usize, Error> {
    usize::try_from(value)
        .map_err(|_| cx.invalid(format!("{what} must not be negative, got {value}")))
}
