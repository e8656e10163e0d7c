//! The graph under construction: engine nodes plus the constants and shapes
//! known so far.
//!
//! Operator converters append nodes to a [`Draft`]; the folding and pruning
//! passes rewrite it; [`Draft::finish`] turns it into the engine's [`Graph`]
//! and its weights. Names are unique throughout: generated names are checked
//! against every value name of the source model, so a generated value can
//! never capture a later node's output.

use std::collections::{HashMap, HashSet};

use capsule_engine::{Graph, Node, ParamInfo, Tensor, ValueInfo};

use crate::Error;
use crate::constant::Constant;
use crate::shape::{self, Shape};

/// A graph being imported.
pub(crate) struct Draft {
    /// The default-domain opset the model was exported with.
    pub(crate) opset: i64,
    /// Graph inputs (the model's inputs that are not initializers).
    pub(crate) inputs: Vec<ValueInfo>,
    /// Engine nodes in topological order.
    pub(crate) nodes: Vec<Node>,
    /// Graph outputs.
    pub(crate) outputs: Vec<String>,
    constants: HashMap<String, Constant>,
    shapes: HashMap<String, Shape>,
    declared: HashMap<String, Shape>,
    defined: HashSet<String>,
    /// Every value name the source model uses or we generated.
    values_taken: HashSet<String>,
    /// Every node name given out so far (nodes and values are separate namespaces).
    nodes_taken: HashSet<String>,
    /// How many source nodes read each value (graph outputs count once).
    source_reads: HashMap<String, usize>,
}

impl Draft {
    /// An empty draft. `values_taken` holds every value name the source model
    /// uses; `source_reads` counts the readers of each value in the source model.
    pub(crate) fn new(
        opset: i64,
        values_taken: HashSet<String>,
        source_reads: HashMap<String, usize>,
    ) -> Draft {
        Draft {
            opset,
            inputs: Vec::new(),
            nodes: Vec::new(),
            outputs: Vec::new(),
            constants: HashMap::new(),
            shapes: HashMap::new(),
            declared: HashMap::new(),
            defined: HashSet::new(),
            values_taken,
            nodes_taken: HashSet::new(),
            source_reads,
        }
    }

    /// Declares a graph input.
    pub(crate) fn add_input(&mut self, info: ValueInfo) -> Result<(), Error> {
        self.define(&info.name)?;
        self.shapes.insert(info.name.clone(), info.shape.clone());
        self.inputs.push(info);
        Ok(())
    }

    /// Declares a constant value (an initializer or a folded `Constant` node).
    pub(crate) fn add_constant(&mut self, name: &str, value: Constant) -> Result<(), Error> {
        self.define(name)?;
        self.constants.insert(name.to_string(), value);
        Ok(())
    }

    /// Replaces the value of an existing constant (used by folding).
    pub(crate) fn set_constant(&mut self, name: &str, value: Constant) {
        self.constants.insert(name.to_string(), value);
    }

    /// Records a shape the model declares for a value (`value_info`, outputs).
    pub(crate) fn declare_shape(&mut self, name: &str, shape: Shape) {
        self.declared.insert(name.to_string(), shape);
    }

    /// The constant named `name`, if the value is one.
    pub(crate) fn constant(&self, name: &str) -> Option<&Constant> {
        self.constants.get(name)
    }

    /// The float constant named `name`, if the value is one.
    pub(crate) fn float_constant(&self, name: &str) -> Option<&Tensor> {
        match self.constants.get(name) {
            Some(Constant::Float(t)) => Some(t),
            _ => None,
        }
    }

    /// What is known of a value's shape.
    pub(crate) fn shape(&self, name: &str) -> Option<Shape> {
        if let Some(c) = self.constants.get(name) {
            return Some(c.shape().iter().map(|&d| Some(d)).collect());
        }
        self.shapes
            .get(name)
            .or_else(|| self.declared.get(name))
            .cloned()
    }

    /// True when some node of the source model, or the graph's outputs, read `name`.
    pub(crate) fn read_in_source(&self, name: &str) -> bool {
        self.source_reads.get(name).copied().unwrap_or(0) > 0
    }

    /// True when `name` is defined so far (input, constant or node output).
    pub(crate) fn is_defined(&self, name: &str) -> bool {
        self.defined.contains(name)
    }

    /// A value name starting with `hint` that no value uses yet.
    pub(crate) fn fresh_value(&mut self, hint: &str) -> String {
        fresh(&mut self.values_taken, hint)
    }

    /// Takes the node name `name` if it is free; false if it was taken.
    pub(crate) fn reserve_node(&mut self, name: &str) -> bool {
        self.nodes_taken.insert(name.to_string())
    }

    /// A node name starting with `hint` that no node uses yet.
    pub(crate) fn fresh_node(&mut self, hint: &str) -> String {
        fresh(&mut self.nodes_taken, hint)
    }

    /// Appends a node, checking that its inputs exist and its outputs are
    /// new, and records its output's shape.
    pub(crate) fn push(&mut self, node: Node) -> Result<(), Error> {
        for input in &node.inputs {
            if !self.defined.contains(input) {
                return Err(Error::invalid(format!(
                    "node '{}' reads '{input}', which no earlier node, input or initializer \
                     defines (the nodes must be in topological order)",
                    node.name
                )));
            }
        }
        let input_shapes: Vec<Option<Shape>> = node.inputs.iter().map(|i| self.shape(i)).collect();
        let refs: Vec<Option<&Shape>> = input_shapes.iter().map(Option::as_ref).collect();
        let inferred = shape::infer(&node.op, &refs);
        for (i, output) in node.outputs.iter().enumerate() {
            self.define(output)?;
            let declared = self.declared.get(output);
            let known = match (i, &inferred, declared) {
                (0, Some(inf), Some(dec)) if inf.len() == dec.len() => Some(
                    inf.iter()
                        .zip(dec)
                        .map(|(a, b)| a.or(*b))
                        .collect::<Shape>(),
                ),
                (0, Some(inf), _) => Some(inf.clone()),
                (_, _, dec) => dec.cloned(),
            };
            if let Some(known) = known {
                self.shapes.insert(output.clone(), known);
            }
        }
        self.nodes.push(node);
        Ok(())
    }

    fn define(&mut self, name: &str) -> Result<(), Error> {
        if !self.defined.insert(name.to_string()) {
            return Err(Error::invalid(format!(
                "value '{name}' is defined twice (by two nodes, or by a node and an \
                 input or initializer)"
            )));
        }
        self.values_taken.insert(name.to_string());
        Ok(())
    }

    /// The finished graph and its weights: every float constant a node reads
    /// becomes a param, in order of first use; other constants are dropped.
    pub(crate) fn finish(mut self) -> Result<(Graph, HashMap<String, Tensor>), Error> {
        let mut params = Vec::new();
        let mut weights = HashMap::new();
        let reads = self.nodes.iter().flat_map(|n| &n.inputs);
        for value in reads.chain(&self.outputs) {
            if weights.contains_key(value) {
                continue;
            }
            // Moved, not cloned: weights can be most of the memory in use.
            match self.constants.remove(value) {
                Some(Constant::Float(t)) => {
                    params.push(ParamInfo {
                        name: value.clone(),
                        shape: t.shape().to_vec(),
                    });
                    weights.insert(value.clone(), t);
                }
                Some(c @ Constant::Int { .. }) => {
                    // Integer constants may only feed attributes (shapes, bounds).
                    return Err(Error::UnsupportedDataType {
                        value: value.clone(),
                        data_type: c.type_name().to_string(),
                    });
                }
                None if self.defined.contains(value) => {}
                None => {
                    return Err(Error::invalid(format!(
                        "graph output '{value}' is not produced by any node"
                    )));
                }
            }
        }
        let graph = Graph {
            inputs: self.inputs,
            params,
            nodes: self.nodes,
            outputs: self.outputs,
        };
        Ok((graph, weights))
    }
}

/// `hint`, or `hint_1`, `hint_2`, ... : the first that `taken` lacks, which is then taken.
fn fresh(taken: &mut HashSet<String>, hint: &str) -> String {
    let mut name = hint.to_string();
    let mut n = 1;
    while taken.contains(&name) {
        name = format!("{hint}_{n}");
        n += 1;
    }
    taken.insert(name.clone());
    name
}
