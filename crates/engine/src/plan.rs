//! The executor: a graph checked once and compiled into steps over numbered
//! slots, run on weights it reads through a [`WeightSource`].
//!
//! [`Plan::new`] resolves every value name to a slot or a weight index,
//! checks arities and attributes, and precomputes each value's last use.
//! [`Plan::run`] then looks nothing up by name: it walks the steps, hands a
//! value to its last reader by move (so that reader may reuse the buffer),
//! and frees every intermediate after its last use.
//!
//! Weights are not part of the plan. A [`WeightSource`] supplies them node
//! by node, with a hook before and after each node: a [`Model`](crate::Model)
//! keeps them all in memory, while the enclave can unseal one layer's
//! weights before the node runs and zeroize them right after, or hand a
//! weight over to a node that overwrites it as it reads it
//! ([`WeightSource::take`]).

use std::borrow::Cow;
use std::collections::HashMap;

use crate::buffers;
use crate::error::Error;
use crate::graph::{Activation, ConvAttrs, Graph, Node, Op, ParamInfo};
use crate::ops;
use crate::tensor::Tensor;
use crate::threads::Pace;

/// Supplies weight tensors to [`Plan::run`], node by node.
///
/// For each node in order, the executor calls [`prepare`](Self::prepare),
/// reads the node's weights with [`param`](Self::param), runs the node, and
/// calls [`release`](Self::release). Every supplied tensor is checked
/// against the shape the graph declares.
pub trait WeightSource {
    /// Makes the weights `node` reads available. A streaming source
    /// unseals them here; the default does nothing.
    fn prepare(&mut self, node: &Node) -> Result<(), Error> {
        let _ = node;
        Ok(())
    }

    /// The value of weight `index` in [`Graph::params`] (declared as
    /// `info`), or `None` when this source does not have it.
    fn param(&self, index: usize, info: &ParamInfo) -> Option<&Tensor>;

    /// Called once `node` has run, or failed: a streaming source drops (and
    /// zeroizes) its weights here. The default does nothing.
    fn release(&mut self, node: &Node) {
        let _ = node;
    }

    /// Weight `index` (declared as `info`), moved out of the source for
    /// the node about to run, which is the last to read it. The executor
    /// asks only where the node overwrites the weight with zeros as it reads
    /// it, while it is in cache (a Conv by Winograd's blocks of output
    /// channels, or by depth onto a 7x7 plane), and returns the zeroed buffer through
    /// [`give_back`](Self::give_back) before [`release`](Self::release), on
    /// success and failure alike. A streaming source that would zeroize the
    /// weight after the node saves that pass over memory.
    ///
    /// `None` (the default) leaves the weight to [`param`](Self::param).
    fn take(&mut self, index: usize, info: &ParamInfo) -> Option<Tensor> {
        let _ = (index, info);
        None
    }

    /// The buffer of weight `index`, taken with [`take`](Self::take), every
    /// value overwritten with zeros. The default drops it.
    fn give_back(&mut self, index: usize, zeroed: Vec<f32>) {
        let _ = (index, zeroed);
    }
}

/// Weights by name, all in memory.
impl WeightSource for HashMap<String, Tensor> {
    fn param(&self, _index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.get(&info.name)
    }
}

/// Weights in the order of [`Graph::params`], all in memory.
impl WeightSource for [Tensor] {
    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        self.get(index)
    }
}

/// A validated graph, ready to run on any weights that match its declarations.
#[derive(Clone, Debug)]
pub struct Plan {
    graph: Graph,
    steps: Vec<Step>,
    /// Which graph inputs some node or output reads; others are not kept.
    inputs_read: Vec<bool>,
    /// Slot of each graph output, and whether it may be moved out (its last
    /// mention in the output list) or must be cloned.
    outputs: Vec<(usize, bool)>,
    slots: usize,
    /// Whether the last run was quick enough to stay on its caller's thread.
    pace: Pace,
}

/// One node, resolved.
#[derive(Clone, Debug)]
struct Step {
    operands: Vec<Operand>,
    output: usize,
    /// Slots no later step reads, freed once this step is done.
    release: Vec<usize>,
    /// What the step runs instead of its node's op, after fusion.
    fused: Fused,
}

/// How [`fuse`] changed a step.
#[derive(Clone, Debug, PartialEq)]
enum Fused {
    /// The node's own op.
    No,
    /// A Conv that also applies the activation of the node that read it.
    Into(Op),
    /// A Conv (these attributes) that also adds its last operand, the other
    /// operand of the Add that read it, then applies the activation.
    WithResidual(ConvAttrs),
    /// An activation already applied by the Conv before it: hands its
    /// operand through unchanged.
    Forward,
    /// A Sigmoid or HardSigmoid whose output only a Mul by its own operand
    /// reads (SiLU, `x * sigmoid(x)`, or HardSwish): computes that product,
    /// and the Mul forwards it.
    SelfGated(Gate),
}

/// The gate of a [`Fused::SelfGated`] step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Gate {
    Sigmoid,
    Hard { alpha: f32, beta: f32 },
}

/// Where a node input comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operand {
    /// A graph input or node output, borrowed.
    Value(usize),
    /// A value read here for the last time, handed to the kernel by move.
    Last(usize),
    /// A weight, by index in [`Graph::params`].
    Param(usize),
}

/// A name as resolved while building the plan.
#[derive(Clone, Copy)]
enum Name {
    Slot(usize),
    Param(usize),
}

fn invalid(reason: String) -> Error {
    Error::InvalidGraph { reason }
}

fn node_error(node: &Node, what: impl std::fmt::Display) -> Error {
    invalid(format!("{} node '{}': {what}", node.op.name(), node.name))
}

impl Plan {
    /// Checks `graph` and compiles it.
    ///
    /// Fails with [`Error::InvalidGraph`] when a node reads a value that is
    /// neither a graph input, a weight, nor an earlier node's output; when a
    /// name is defined twice; when an op gets the wrong number of inputs or
    /// outputs or an attribute out of range (zero strides or kernel, groups
    /// that do not divide the weight's channels, pooling pads as large as
    /// the kernel, ...); when a weight's declared shape does not fit the op
    /// reading it; or when the graph returns nothing or a weight.
    pub fn new(graph: Graph) -> Result<Plan, Error> {
        let (mut steps, names) = compile_nodes(&graph)?;
        let outputs = compile_outputs(&graph, &names)?;
        let slots = graph.inputs.len() + graph.nodes.len();
        fuse_residuals(&graph, &mut steps, &outputs);
        fuse_self_gated(&graph, &mut steps, &outputs);
        let read = schedule(&mut steps, &outputs, slots);
        fuse(&graph, &mut steps);
        let inputs_read = read[..graph.inputs.len()].to_vec();
        Ok(Plan {
            graph,
            steps,
            inputs_read,
            outputs,
            slots,
            pace: Pace::default(),
        })
    }

    /// The graph this plan runs.
    #[must_use]
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the graph on `inputs` (in the order of [`Graph::inputs`]) with
    /// weights from `weights`, and returns the values of [`Graph::outputs`].
    ///
    /// Fails with [`Error::ShapeMismatch`] when an input does not have its
    /// declared shape (the context names the input) or a node cannot take
    /// its operands (the context names the node), and with
    /// [`Error::InvalidWeights`] when `weights` lacks a weight or supplies
    /// one of another shape. Errors from `weights.prepare` pass through.
    ///
    /// With more than one [thread](crate::set_threads) the run moves to
    /// one of rayon's workers while others stay awake to help it, unless
    /// the plan's last run took under 100 µs.
    pub fn run<W: WeightSource + Send + ?Sized>(
        &self,
        inputs: &[Tensor],
        weights: &mut W,
    ) -> Result<Vec<Tensor>, Error> {
        crate::threads::as_team(&self.pace, || self.run_here(inputs, weights))
    }

    /// [`Plan::run`] on the calling thread, as part of a run that has its
    /// helpers already.
    pub(crate) fn run_here<W: WeightSource + ?Sized>(
        &self,
        inputs: &[Tensor],
        weights: &mut W,
    ) -> Result<Vec<Tensor>, Error> {
        self.check_inputs(inputs)?;
        let mut values: Vec<Option<Cow<'_, Tensor>>> = (0..self.slots).map(|_| None).collect();
        for ((value, input), &read) in values.iter_mut().zip(inputs).zip(&self.inputs_read) {
            if read {
                *value = Some(Cow::Borrowed(input));
            }
        }
        let result = self.run_steps(&mut values, weights);
        buffers::trim();
        result?;
        self.outputs
            .iter()
            .map(|&(slot, last)| {
                let value = if last {
                    values[slot].take()
                } else {
                    values[slot].clone()
                };
                value.map(Cow::into_owned).ok_or_else(|| freed_early(slot))
            })
            .collect()
    }

    /// Runs every step, recycling the buffers of values it frees.
    fn run_steps<'v, W: WeightSource + ?Sized>(
        &self,
        values: &mut [Option<Cow<'v, Tensor>>],
        weights: &mut W,
    ) -> Result<(), Error> {
        for (j, (step, node)) in self.steps.iter().zip(&self.graph.nodes).enumerate() {
            weights.prepare(node)?;
            let mut spent = self.spendable(j, node, values).and_then(|index| {
                let tensor = weights.take(index, &self.graph.params[index])?;
                Some((index, tensor))
            });
            let result = self.run_step(step, node, values, &*weights, spent.as_mut());
            if let Some((index, mut tensor)) = spent {
                if result.is_err() {
                    // Failed before the Conv overwrote it (or in it).
                    tensor.data_mut().fill(0.0);
                }
                weights.give_back(index, tensor.into_parts().1);
            }
            weights.release(node);
            values[step.output] = Some(Cow::Owned(result?));
            for &slot in &step.release {
                if let Some(Cow::Owned(value)) = values[slot].take() {
                    buffers::give(value.into_parts().1);
                }
            }
        }
        Ok(())
    }

    fn check_inputs(&self, inputs: &[Tensor]) -> Result<(), Error> {
        let declared = &self.graph.inputs;
        if inputs.len() != declared.len() {
            let names: Vec<&str> = declared.iter().map(|i| i.name.as_str()).collect();
            return Err(Error::ShapeMismatch {
                context: "model inputs".into(),
                reason: format!(
                    "the graph takes {} inputs ({}) but {} were given",
                    declared.len(),
                    names.join(", "),
                    inputs.len()
                ),
            });
        }
        for (info, x) in declared.iter().zip(inputs) {
            let fits = info.shape.len() == x.shape().len()
                && info
                    .shape
                    .iter()
                    .zip(x.shape())
                    .all(|(want, &got)| want.is_none_or(|w| w == got));
            if !fits {
                let dims: Vec<String> = info
                    .shape
                    .iter()
                    .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                    .collect();
                return Err(Error::ShapeMismatch {
                    context: format!("input '{}'", info.name),
                    reason: format!(
                        "expected shape [{}] (? is any size), got {:?}",
                        dims.join(", "),
                        x.shape()
                    ),
                });
            }
        }
        Ok(())
    }

    /// The weight step `j` (a Conv) may be handed ([`WeightSource::take`]):
    /// its W, when no other operand of this step or a later one reads it and
    /// the Conv overwrites it block by block on these operands
    /// ([`ops::conv_spends`]).
    fn spendable(
        &self,
        j: usize,
        node: &Node,
        values: &[Option<Cow<'_, Tensor>>],
    ) -> Option<usize> {
        let step = &self.steps[j];
        let (attrs, _) = conv_of(step, node)?;
        let (&x, &Operand::Param(index)) = (step.operands.first()?, step.operands.get(1)?) else {
            return None;
        };
        let (Operand::Value(x) | Operand::Last(x)) = x else {
            return None;
        };
        let x = values[x].as_ref()?.shape();
        let w = &self.graph.params[index].shape;
        if !ops::conv_spends(attrs, x, w, None) {
            return None;
        }
        // Only then, as few Convs go by blocks: the scan is over all later steps.
        let reads = |s: &Step| {
            (s.operands.iter())
                .filter(|&&o| o == Operand::Param(index))
                .count()
        };
        let read_again = reads(step) > 1 || self.steps[j + 1..].iter().any(|s| reads(s) > 0);
        (!read_again).then_some(index)
    }

    /// Gathers a step's operands, runs its kernel, and names the node in
    /// any shape error. `spent`, when given, is the step's W
    /// ([`Plan::spendable`]), handed over by the source: when this returns
    /// `Ok`, it reads as zeros.
    fn run_step<'v, W: WeightSource + ?Sized>(
        &self,
        step: &Step,
        node: &Node,
        values: &mut [Option<Cow<'v, Tensor>>],
        weights: &W,
        spent: Option<&mut (usize, Tensor)>,
    ) -> Result<Tensor, Error> {
        if let Some((index, w)) = &spent {
            as_declared(&self.graph.params[*index], w)?;
        }
        // Take the moved values first: the borrowed ones then borrow
        // `values` for as long as the kernel runs.
        let mut moved: Vec<Option<Cow<'v, Tensor>>> = step
            .operands
            .iter()
            .map(|operand| match *operand {
                Operand::Last(slot) => values[slot].take(),
                _ => None,
            })
            .collect();
        let values = &*values;
        let mut args = Vec::with_capacity(step.operands.len());
        for (i, (operand, moved)) in step.operands.iter().zip(&mut moved).enumerate() {
            if spent.is_some() && i == 1 {
                continue;
            }
            let arg = match *operand {
                Operand::Last(slot) => moved.take().ok_or_else(|| freed_early(slot))?,
                Operand::Value(slot) => {
                    let value = values[slot].as_ref().ok_or_else(|| freed_early(slot))?;
                    Cow::Borrowed(&**value)
                }
                Operand::Param(index) => Cow::Borrowed(self.weight(weights, index, node)?),
            };
            args.push(arg);
        }
        if let (Some((_, w)), Some((attrs, with_residual))) = (spent, conv_of(step, node)) {
            return ops::conv_spending(attrs, with_residual, args, w).map_err(
                |ops::Mismatch(reason)| Error::ShapeMismatch {
                    context: format!("{} node '{}'", node.op.name(), node.name),
                    reason,
                },
            );
        }
        let op = match &step.fused {
            Fused::No => &node.op,
            Fused::Into(op) => op,
            Fused::WithResidual(attrs) => {
                return ops::conv_add(attrs, args).map_err(|ops::Mismatch(reason)| {
                    Error::ShapeMismatch {
                        context: format!("{} node '{}'", node.op.name(), node.name),
                        reason,
                    }
                });
            }
            Fused::SelfGated(gate) => {
                let mut args = args;
                let x = args.pop().unwrap_or_else(|| {
                    unreachable!("fuse_self_gated keeps the gate's one operand")
                });
                return Ok(match *gate {
                    Gate::Sigmoid => ops::silu(x),
                    Gate::Hard { alpha, beta } => ops::hard_swish(x, alpha, beta),
                });
            }
            Fused::Forward => {
                let mut args = args;
                return Ok(args
                    .pop()
                    .map(Cow::into_owned)
                    .unwrap_or_else(|| unreachable!("fuse only forwards one-operand steps")));
            }
        };
        ops::execute(op, args).map_err(|ops::Mismatch(reason)| Error::ShapeMismatch {
            context: format!("{} node '{}'", node.op.name(), node.name),
            reason,
        })
    }

    /// Weight `index` from `weights`, checked against its declaration.
    fn weight<'w, W: WeightSource + ?Sized>(
        &self,
        weights: &'w W,
        index: usize,
        node: &Node,
    ) -> Result<&'w Tensor, Error> {
        let info = &self.graph.params[index];
        let tensor = weights
            .param(index, info)
            .ok_or_else(|| Error::InvalidWeights {
                reason: format!(
                    "weight '{}' (read by {} node '{}') was not supplied",
                    info.name,
                    node.op.name(),
                    node.name
                ),
            })?;
        as_declared(info, tensor)?;
        Ok(tensor)
    }
}

/// Checks a supplied weight against its declaration.
fn as_declared(info: &ParamInfo, tensor: &Tensor) -> Result<(), Error> {
    if tensor.shape() == info.shape {
        return Ok(());
    }
    Err(Error::InvalidWeights {
        reason: format!(
            "weight '{}' has shape {:?} but the graph declares {:?}",
            info.name,
            tensor.shape(),
            info.shape
        ),
    })
}

/// The Conv a step runs (a Conv node, maybe with an activation fused into
/// it), and whether it also adds a residual; `None` for other steps.
fn conv_of<'s>(step: &'s Step, node: &'s Node) -> Option<(&'s ConvAttrs, bool)> {
    match (&step.fused, &node.op) {
        (Fused::WithResidual(attrs), _) => Some((attrs, true)),
        (Fused::Into(Op::Conv(attrs)), _) | (Fused::No, Op::Conv(attrs)) => Some((attrs, false)),
        _ => None,
    }
}

/// Resolves every node's inputs, in order, to slots and weights, checking
/// arities and attributes on the way. Returns the steps (without their
/// schedule) and every name's meaning.
fn compile_nodes(graph: &Graph) -> Result<(Vec<Step>, HashMap<&str, Name>), Error> {
    let mut names: HashMap<&str, Name> = HashMap::new();
    let inputs = (graph.inputs.iter().enumerate()).map(|(i, v)| (v.name.as_str(), Name::Slot(i)));
    let params = (graph.params.iter().enumerate()).map(|(i, p)| (p.name.as_str(), Name::Param(i)));
    for (name, what) in inputs.chain(params) {
        if names.insert(name, what).is_some() {
            return Err(invalid(format!("the name '{name}' is defined twice")));
        }
    }

    let mut steps = Vec::with_capacity(graph.nodes.len());
    for (j, node) in graph.nodes.iter().enumerate() {
        if !ops::arity(&node.op).contains(&node.inputs.len()) {
            let expected = ops::expected_inputs(&node.op);
            let got = node.inputs.len();
            return Err(node_error(
                node,
                format!("takes {expected} inputs, has {got}"),
            ));
        }
        let [output] = node.outputs.as_slice() else {
            let got = node.outputs.len();
            return Err(node_error(
                node,
                format!("must have exactly one output, has {got}"),
            ));
        };
        let operands = node
            .inputs
            .iter()
            .enumerate()
            .map(|(k, input)| match names.get(input.as_str()) {
                Some(&Name::Slot(s)) => Ok(Operand::Value(s)),
                Some(&Name::Param(p)) => Ok(Operand::Param(p)),
                None if input.is_empty() => Err(node_error(
                    node,
                    format!("input {k} is an omitted optional input ('')"),
                )),
                None => Err(node_error(
                    node,
                    format!(
                        "reads '{input}', which is neither a graph input, a weight, \
                         nor the output of an earlier node"
                    ),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let param = |k: usize| match operands.get(k) {
            Some(&Operand::Param(p)) => graph.params.get(p),
            _ => None,
        };
        check_attributes(node, param)?;
        let slot = graph.inputs.len() + j;
        if names.insert(output, Name::Slot(slot)).is_some() {
            return Err(invalid(format!("the name '{output}' is defined twice")));
        }
        steps.push(Step {
            operands,
            output: slot,
            release: Vec::new(),
            fused: Fused::No,
        });
    }
    Ok((steps, names))
}

/// The slot of each graph output, and whether it is that slot's last
/// mention in the list (moved out) or not (cloned).
fn compile_outputs(
    graph: &Graph,
    names: &HashMap<&str, Name>,
) -> Result<Vec<(usize, bool)>, Error> {
    if graph.outputs.is_empty() {
        return Err(invalid("the graph has no outputs".into()));
    }
    let slots = graph
        .outputs
        .iter()
        .map(|name| match names.get(name.as_str()) {
            Some(&Name::Slot(s)) => Ok(s),
            Some(Name::Param(_)) => Err(invalid(format!(
                "the graph returns '{name}', a weight; the engine never returns weights"
            ))),
            None => Err(invalid(format!(
                "the graph returns '{name}', which is never computed"
            ))),
        })
        .collect::<Result<Vec<usize>, _>>()?;
    Ok(slots
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, !slots[i + 1..].contains(&s)))
        .collect())
}

/// Decides, for each step, which values it may take by move and which it
/// frees afterwards: a value is moved into its last reader when that
/// reader reads it once, freed after it otherwise, and dropped as soon as
/// it is computed when nobody reads it. Graph outputs are never moved or
/// freed. Returns which slots some step or output reads.
fn schedule(steps: &mut [Step], outputs: &[(usize, bool)], slots: usize) -> Vec<bool> {
    let mut pinned = vec![false; slots];
    for &(s, _) in outputs {
        pinned[s] = true;
    }
    let mut last_read: Vec<Option<usize>> = vec![None; slots];
    for (j, step) in steps.iter().enumerate() {
        for operand in &step.operands {
            if let Operand::Value(s) = *operand {
                last_read[s] = Some(j);
            }
        }
    }
    for (j, step) in steps.iter_mut().enumerate() {
        for i in 0..step.operands.len() {
            let Operand::Value(s) = step.operands[i] else {
                continue;
            };
            if last_read[s] != Some(j) || pinned[s] {
                continue;
            }
            let reads = step.operands.iter().filter(|&&o| o == Operand::Value(s));
            if reads.count() == 1 {
                step.operands[i] = Operand::Last(s);
            } else if !step.release.contains(&s) {
                step.release.push(s);
            }
        }
        if last_read[step.output].is_none() && !pinned[step.output] {
            step.release.push(step.output);
        }
    }
    (0..slots)
        .map(|s| last_read[s].is_some() || pinned[s])
        .collect()
}

/// How many times each slot is read by a step before [`schedule`] (which
/// turns last reads into moves).
fn value_readers(graph: &Graph, steps: &[Step]) -> Vec<usize> {
    let mut readers = vec![0usize; graph.inputs.len() + steps.len()];
    for step in steps {
        for operand in &step.operands {
            if let Operand::Value(s) = *operand {
                readers[s] += 1;
            }
        }
    }
    readers
}

/// Folds each Add into the Conv that computes one of its operands, when the
/// Add is the only reader of that Conv output (which is no graph output)
/// and its other operand is computed before the Conv runs: the Conv adds
/// it to each output block while it is in cache, and the Add's step hands
/// the Conv's output through. A residual connection's Add, computed apart,
/// reads two tensors that two threads' tasks left in two cores' caches.
/// Runs before [`schedule`], which then sees the residual read by the Conv.
fn fuse_residuals(graph: &Graph, steps: &mut [Step], outputs: &[(usize, bool)]) {
    let readers = value_readers(graph, steps);
    let producer = |slot: usize| slot.checked_sub(graph.inputs.len());
    for j in 0..steps.len() {
        if !matches!(graph.nodes[j].op, Op::Add) {
            continue;
        }
        let [Operand::Value(a), Operand::Value(b)] = steps[j].operands[..] else {
            continue;
        };
        for (sum, residual) in [(a, b), (b, a)] {
            let Some(p) = producer(sum) else { continue };
            let Op::Conv(attrs) = &graph.nodes[p].op else {
                continue;
            };
            let ready = producer(residual).is_none_or(|q| q < p);
            let output = outputs.iter().any(|&(s, _)| s == sum);
            if sum == residual
                || !ready
                || output
                || readers[sum] != 1
                || steps[p].fused != Fused::No
                || attrs.activation != Activation::None
            {
                continue;
            }
            steps[p].operands.push(Operand::Value(residual));
            steps[p].fused = Fused::WithResidual(attrs.clone());
            steps[j].operands = vec![Operand::Value(sum)];
            steps[j].fused = Fused::Forward;
            break;
        }
    }
}

/// Folds each Mul of a value `x` by `Sigmoid(x)` or `HardSigmoid(x)` (SiLU,
/// EfficientNet's activation, and HardSwish, MobileNetV3's) into the gate,
/// when the Mul is the gate output's only reader and that output is no graph
/// output: the gate's step computes `x * gate(x)` in one pass, in place when
/// it reads `x` last, and the Mul's step hands it through. Apart, the gate
/// wrote a second tensor as large as `x` and the Mul read both back. The
/// product is the same bits either way. Runs before [`schedule`], which then
/// sees the Mul no longer reading `x`.
fn fuse_self_gated(graph: &Graph, steps: &mut [Step], outputs: &[(usize, bool)]) {
    let readers = value_readers(graph, steps);
    let producer = |slot: usize| slot.checked_sub(graph.inputs.len());
    for m in 0..steps.len() {
        if !matches!(graph.nodes[m].op, Op::Mul) || steps[m].fused != Fused::No {
            continue;
        }
        let [Operand::Value(a), Operand::Value(b)] = steps[m].operands[..] else {
            continue;
        };
        for (gated, x) in [(a, b), (b, a)] {
            let Some(j) = producer(gated) else { continue };
            let output = outputs.iter().any(|&(s, _)| s == gated);
            let gate = match graph.nodes[j].op {
                Op::Sigmoid => Gate::Sigmoid,
                Op::HardSigmoid { alpha, beta } => Gate::Hard { alpha, beta },
                _ => continue,
            };
            if steps[j].fused != Fused::No
                || steps[j].operands[..] != [Operand::Value(x)]
                || readers[gated] != 1
                || output
            {
                continue;
            }
            steps[j].fused = Fused::SelfGated(gate);
            steps[m].operands = vec![Operand::Value(gated)];
            steps[m].fused = Fused::Forward;
            break;
        }
    }
}

/// Folds each Relu or Clip into the Conv before it when the activation is
/// the Conv output's only reader and takes it by move: the Conv then
/// applies the activation to each output block while it is in cache, and
/// the activation's step hands the value through. Every node keeps its
/// step, so [`WeightSource`] hooks still see every node, in order.
fn fuse(graph: &Graph, steps: &mut [Step]) {
    let mut readers = vec![0usize; graph.inputs.len() + steps.len()];
    for step in steps.iter() {
        for operand in &step.operands {
            if let Operand::Value(s) | Operand::Last(s) = *operand {
                readers[s] += 1;
            }
        }
    }
    let producer = |slot: usize| slot.checked_sub(graph.inputs.len());
    for j in 0..steps.len() {
        let activation = match graph.nodes[j].op {
            Op::Relu => Activation::Relu,
            Op::Clip { min, max } => Activation::Clip { min, max },
            _ => continue,
        };
        let [Operand::Last(slot)] = steps[j].operands[..] else {
            continue;
        };
        let Some(p) = producer(slot) else { continue };
        if readers[slot] != 1 {
            continue;
        }
        // An Add folded into a Conv: the activation goes to that Conv too.
        if steps[p].fused == Fused::Forward
            && let [Operand::Last(sum)] = steps[p].operands[..]
            && let Some(q) = producer(sum)
            && let Fused::WithResidual(attrs) = &mut steps[q].fused
            && attrs.activation == Activation::None
        {
            attrs.activation = activation;
            steps[j].fused = Fused::Forward;
            continue;
        }
        if steps[p].fused != Fused::No {
            continue;
        }
        let Op::Conv(attrs) = &graph.nodes[p].op else {
            continue;
        };
        if attrs.activation != Activation::None {
            continue;
        }
        steps[p].fused = Fused::Into(Op::Conv(ConvAttrs {
            activation,
            ..attrs.clone()
        }));
        steps[j].fused = Fused::Forward;
    }
}

/// A value missing when a step reads it: `Plan::new`'s schedule is wrong.
/// Reported rather than panicking, but it cannot happen on any graph.
fn freed_early(slot: usize) -> Error {
    invalid(format!(
        "internal error: value slot {slot} was read after being freed"
    ))
}

/// Static checks of a node's attributes, and of the shapes of the weights
/// it reads where the op constrains them. `param(k)` is the declaration of
/// input `k` when that input is a weight.
fn check_attributes<'g>(
    node: &Node,
    param: impl Fn(usize) -> Option<&'g ParamInfo>,
) -> Result<(), Error> {
    let fail = |what: String| Err(node_error(node, what));
    let nonzero = |name: &str, values: &[usize]| {
        if values.contains(&0) {
            Err(node_error(
                node,
                format!("{name} {values:?} contains a zero"),
            ))
        } else {
            Ok(())
        }
    };
    match &node.op {
        Op::Conv(attrs) => {
            nonzero("kernel", &attrs.kernel)?;
            nonzero("strides", &attrs.strides)?;
            nonzero("dilations", &attrs.dilations)?;
            if attrs.group == 0 {
                return fail("group is 0".into());
            }
            if let Some(w) = param(1) {
                let &[m, _, kh, kw] = w.shape.as_slice() else {
                    return fail(format!(
                        "weight '{}' must have shape [M, C/group, kH, kW], is declared {:?}",
                        w.name, w.shape
                    ));
                };
                if !m.is_multiple_of(attrs.group) {
                    return fail(format!(
                        "weight '{}' has {m} output channels, which do not split into {} groups",
                        w.name, attrs.group
                    ));
                }
                if [kh, kw] != attrs.kernel {
                    return fail(format!(
                        "weight '{}' has a {kh}x{kw} kernel but kernel_shape is {:?}",
                        w.name, attrs.kernel
                    ));
                }
                if let Some(b) = param(2)
                    && b.shape != [m]
                {
                    return fail(format!(
                        "bias '{}' must have shape [{m}], is declared {:?}",
                        b.name, b.shape
                    ));
                }
            }
        }
        Op::MaxPool(pool) | Op::AveragePool { pool, .. } => {
            nonzero("kernel", &pool.kernel)?;
            nonzero("strides", &pool.strides)?;
            nonzero("dilations", &pool.dilations)?;
            let [top, left, bottom, right] = pool.pads;
            let [kh, kw] = pool.kernel;
            if top.max(bottom) >= kh || left.max(right) >= kw {
                return fail(format!(
                    "pads {:?} must be smaller than the kernel {:?}",
                    pool.pads, pool.kernel
                ));
            }
        }
        Op::Gemm { .. } => {
            for (k, operand) in ["A", "B"].iter().enumerate() {
                if let Some(p) = param(k)
                    && p.shape.len() != 2
                {
                    return fail(format!(
                        "{operand} ('{}') must be a matrix, is declared {:?}",
                        p.name, p.shape
                    ));
                }
            }
        }
        Op::Reshape { shape, allowzero } => {
            if let Some(d) = shape.iter().find(|&&d| d < -1) {
                return fail(format!("shape {shape:?} contains {d}"));
            }
            if shape.iter().filter(|&&d| d == -1).count() > 1 {
                return fail(format!("shape {shape:?} has more than one -1"));
            }
            if *allowzero && shape.contains(&0) && shape.contains(&-1) {
                return fail(format!(
                    "shape {shape:?} has both 0 and -1 with allowzero, which ONNX forbids"
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ValueInfo;

    fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![name.into()],
        }
    }

    fn input(name: &str, dims: usize) -> ValueInfo {
        ValueInfo {
            name: name.into(),
            shape: vec![None; dims],
        }
    }

    /// x, y -> a = relu(x); b = add(a, a); c = mul(b, x); d = sigmoid(y) (unused);
    /// outputs [c, a, c]
    fn graph() -> Graph {
        Graph {
            inputs: vec![input("x", 1), input("y", 1)],
            params: vec![ParamInfo {
                name: "k".into(),
                shape: vec![3],
            }],
            nodes: vec![
                node("a", Op::Relu, &["x"]),
                node("b", Op::Add, &["a", "a"]),
                node("c", Op::Mul, &["b", "k"]),
                node("d", Op::Sigmoid, &["b"]),
                node("e", Op::Identity, &["x"]),
            ],
            outputs: vec!["c".into(), "a".into(), "c".into()],
        }
    }

    #[test]
    fn schedule_moves_last_reads_and_frees_dead_values() {
        let plan = Plan::new(graph()).unwrap();
        // slots: x 0, y 1, a 2, b 3, c 4, d 5, e 6
        let ops: Vec<&[Operand]> = plan.steps.iter().map(|s| s.operands.as_slice()).collect();
        assert_eq!(ops[0], [Operand::Value(0)]); // x is read again by e
        assert_eq!(ops[1], [Operand::Value(2), Operand::Value(2)]); // a is an output
        assert_eq!(ops[2], [Operand::Value(3), Operand::Param(0)]); // b is read by d
        assert_eq!(ops[3], [Operand::Last(3)]);
        assert_eq!(ops[4], [Operand::Last(0)]);
        // d and e are never read: dropped as soon as computed
        assert_eq!(plan.steps[3].release, [5]);
        assert_eq!(plan.steps[4].release, [6]);
        assert!(plan.steps[..3].iter().all(|s| s.release.is_empty()));
        // y is never read: not kept
        assert_eq!(plan.inputs_read, [true, false]);
        // c is returned twice: cloned first, moved last
        assert_eq!(plan.outputs, [(4, false), (2, true), (4, true)]);
    }

    #[test]
    fn a_value_read_twice_by_its_last_reader_is_freed_after_it() {
        let mut g = graph();
        g.outputs = vec!["c".into()];
        let plan = Plan::new(g).unwrap();
        assert_eq!(
            plan.steps[1].operands,
            [Operand::Value(2), Operand::Value(2)]
        );
        assert_eq!(plan.steps[1].release, [2]);
    }

    #[test]
    fn runs_with_outputs_listed_twice() {
        let plan = Plan::new(graph()).unwrap();
        let x = Tensor::new(vec![3], vec![-1.0, 2.0, 3.0]).unwrap();
        let y = Tensor::new(vec![3], vec![0.0; 3]).unwrap();
        let mut weights = [Tensor::new(vec![3], vec![1.0, 10.0, 100.0]).unwrap()];
        let out = plan.run(&[x, y], &mut weights[..]).unwrap();
        assert_eq!(out[0].data(), &[0.0, 40.0, 600.0]);
        assert_eq!(out[1].data(), &[0.0, 2.0, 3.0]);
        assert_eq!(out[0], out[2]);
    }

    /// A source that holds one node's weights at a time, as the enclave's
    /// layer-by-layer unsealing does, and records the calls it gets.
    struct Streaming {
        store: HashMap<String, Tensor>,
        loaded: HashMap<String, Tensor>,
        log: Vec<String>,
    }

    impl WeightSource for Streaming {
        fn prepare(&mut self, node: &Node) -> Result<(), Error> {
            self.log.push(format!("prepare {}", node.name));
            for name in &node.inputs {
                if let Some(t) = self.store.get(name) {
                    self.loaded.insert(name.clone(), t.clone());
                }
            }
            Ok(())
        }

        fn param(&self, _index: usize, info: &ParamInfo) -> Option<&Tensor> {
            self.loaded.get(&info.name)
        }

        fn release(&mut self, node: &Node) {
            self.log.push(format!("release {}", node.name));
            self.loaded.clear();
        }
    }

    #[test]
    fn streams_weights_node_by_node() {
        let mut g = graph();
        g.outputs = vec!["c".into()];
        let plan = Plan::new(g).unwrap();
        let k = Tensor::new(vec![3], vec![1.0, 2.0, 3.0]).unwrap();
        let mut source = Streaming {
            store: HashMap::from([("k".to_string(), k)]),
            loaded: HashMap::new(),
            log: Vec::new(),
        };
        let x = Tensor::new(vec![3], vec![1.0, 1.0, 1.0]).unwrap();
        let out = plan.run(&[x.clone(), x], &mut source).unwrap();
        assert_eq!(out[0].data(), &[2.0, 4.0, 6.0]);
        let expected: Vec<String> = ["a", "b", "c", "d", "e"]
            .iter()
            .flat_map(|n| [format!("prepare {n}"), format!("release {n}")])
            .collect();
        assert_eq!(source.log, expected);
        assert!(source.loaded.is_empty());
    }

    /// A 1x1 Conv of one channel: multiplies by its weight `w`.
    fn scaling_conv() -> Op {
        Op::Conv(ConvAttrs {
            kernel: [1, 1],
            strides: [1, 1],
            pads: [0; 4],
            dilations: [1, 1],
            group: 1,
            activation: Activation::None,
        })
    }

    /// `nodes` over input `x` (rank 4) and the weight `w` of a [`scaling_conv`].
    fn with_scaling_weight(nodes: Vec<Node>, outputs: &[&str]) -> Graph {
        Graph {
            inputs: vec![input("x", 4)],
            params: vec![ParamInfo {
                name: "w".into(),
                shape: vec![1, 1, 1, 1],
            }],
            nodes,
            outputs: outputs.iter().map(|&o| o.into()).collect(),
        }
    }

    #[test]
    fn fuses_an_activation_into_the_conv_before_it_only_when_alone() {
        let conv = scaling_conv();
        let g = with_scaling_weight(
            vec![
                node("c", conv.clone(), &["x", "w"]),
                node("r", Op::Relu, &["c"]),
                node("d", conv, &["x", "w"]),
                node("e", Op::Clip { min: 0.0, max: 1.5 }, &["d"]),
                node("f", Op::Add, &["d", "e"]),
            ],
            &["r", "f"],
        );
        let plan = Plan::new(g).unwrap();
        let fused: Vec<&Fused> = plan.steps.iter().map(|s| &s.fused).collect();
        assert!(matches!(
            fused[0],
            Fused::Into(Op::Conv(ConvAttrs {
                activation: Activation::Relu,
                ..
            }))
        ));
        assert_eq!(fused[1], &Fused::Forward);
        // d is also read by f: the Clip must see it unclipped.
        assert!(fused[2..].iter().all(|f| **f == Fused::No));
        let x = Tensor::new(vec![1, 1, 1, 3], vec![-1.0, 1.0, 2.0]).unwrap();
        let mut weights = [Tensor::new(vec![1, 1, 1, 1], vec![2.0]).unwrap()];
        let out = plan.run(&[x], &mut weights[..]).unwrap();
        assert_eq!(out[0].data(), &[0.0, 2.0, 4.0]);
        assert_eq!(out[1].data(), &[-2.0, 3.5, 5.5]);
    }

    #[test]
    fn fuses_self_gated_products_only_when_the_mul_alone_reads_the_gate() {
        let conv = scaling_conv();
        let hard = Op::HardSigmoid {
            alpha: 1.0 / 6.0,
            beta: 0.5,
        };
        let g = with_scaling_weight(
            vec![
                // x * sigmoid(x) on a Conv's output, read last: in place.
                node("c", conv.clone(), &["x", "w"]),
                node("s", Op::Sigmoid, &["c"]),
                node("m", Op::Mul, &["s", "c"]),
                // The Sigmoid is a graph output too: not fused.
                node("t", Op::Sigmoid, &["m"]),
                node("n", Op::Mul, &["m", "t"]),
                // Sigmoid of another value: not SiLU.
                node("u", Op::Sigmoid, &["x"]),
                node("v", Op::Mul, &["n", "u"]),
                // HardSwish, the gate second.
                node("h", hard, &["v"]),
                node("k", Op::Mul, &["v", "h"]),
            ],
            &["k", "t"],
        );
        let plan = Plan::new(g).unwrap();
        let fused: Vec<&Fused> = plan.steps.iter().map(|s| &s.fused).collect();
        assert_eq!(fused[1], &Fused::SelfGated(Gate::Sigmoid));
        assert_eq!(fused[2], &Fused::Forward);
        assert_eq!(plan.steps[1].operands, [Operand::Last(1)]); // c, in place
        assert!(fused[3..7].iter().all(|f| **f == Fused::No), "{fused:?}");
        let (alpha, beta) = (1.0 / 6.0, 0.5);
        assert_eq!(fused[7], &Fused::SelfGated(Gate::Hard { alpha, beta }));
        assert_eq!(fused[8], &Fused::Forward);
        let x = Tensor::new(vec![1, 1, 1, 3], vec![-1.0, 0.5, 3.0]).unwrap();
        let mut weights = [Tensor::new(vec![1, 1, 1, 1], vec![2.0]).unwrap()];
        let out = plan
            .run(std::slice::from_ref(&x), &mut weights[..])
            .unwrap();
        let logistic = |v: f32| {
            crate::ops::sigmoid(Cow::Owned(Tensor::new(vec![1], vec![v]).unwrap())).data()[0]
        };
        for (i, &x) in x.data().iter().enumerate() {
            let m = (2.0 * x) * logistic(2.0 * x);
            let (t, u) = (logistic(m), logistic(x));
            assert_eq!(out[1].data()[i].to_bits(), t.to_bits());
            let v = (m * t) * u;
            let k = v * crate::ops::hard_sigmoid(v, alpha, beta);
            assert_eq!(out[0].data()[i].to_bits(), k.to_bits());
        }
    }

    #[test]
    fn fuses_a_residual_add_and_its_activation_into_the_conv() {
        let conv = scaling_conv();
        let g = with_scaling_weight(
            vec![
                // Conv, Add (residual first), Relu: one step does all three.
                node("c", conv.clone(), &["x", "w"]),
                node("s", Op::Add, &["x", "c"]),
                node("r", Op::Relu, &["s"]),
                // A Conv that is also a graph output keeps its own value.
                node("d", conv.clone(), &["x", "w"]),
                node("t", Op::Add, &["d", "x"]),
                // The residual is computed after the Conv: not folded.
                node("e", conv, &["x", "w"]),
                node("f", Op::Relu, &["x"]),
                node("u", Op::Add, &["e", "f"]),
            ],
            &["r", "d", "t", "u"],
        );
        let plan = Plan::new(g).unwrap();
        let fused: Vec<&Fused> = plan.steps.iter().map(|s| &s.fused).collect();
        assert!(matches!(
            fused[0],
            Fused::WithResidual(ConvAttrs {
                activation: Activation::Relu,
                ..
            })
        ));
        assert_eq!(fused[1..3], [&Fused::Forward, &Fused::Forward]);
        assert!(fused[3..].iter().all(|f| **f == Fused::No));
        let x = Tensor::new(vec![1, 1, 1, 3], vec![-1.0, 1.0, 2.0]).unwrap();
        let mut weights = [Tensor::new(vec![1, 1, 1, 1], vec![2.0]).unwrap()];
        let out = plan.run(&[x], &mut weights[..]).unwrap();
        assert_eq!(out[0].data(), &[0.0, 3.0, 6.0]);
        assert_eq!(out[1].data(), &[-2.0, 2.0, 4.0]);
        assert_eq!(out[2].data(), &[-3.0, 3.0, 6.0]);
        assert_eq!(out[3].data(), &[-2.0, 3.0, 6.0]);
    }

    #[test]
    fn weights_supplied_at_run_time_are_checked() {
        let plan = Plan::new(graph()).unwrap();
        let x = Tensor::new(vec![3], vec![1.0; 3]).unwrap();
        let inputs = [x.clone(), x];
        match plan.run(&inputs, &mut HashMap::new()) {
            Err(Error::InvalidWeights { reason }) => {
                assert!(
                    reason.contains("'k' (read by Mul node 'c') was not supplied"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut wrong = HashMap::from([("k".to_string(), Tensor::zeros(vec![1, 3]))]);
        match plan.run(&inputs, &mut wrong) {
            Err(Error::InvalidWeights { reason }) => assert!(reason.contains("declares [3]")),
            other => panic!("{other:?}"),
        }
    }
}
