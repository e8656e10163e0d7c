//! Running a graph whose largest weights never exist whole in memory.
//!
//! A dense layer at small batch reads each weight once, so its weights can
//! arrive in pieces (the enclave unseals them chunk by chunk) and be
//! multiplied into the output as they come. Two pieces make that possible
//! without touching the executor:
//!
//! - [`StreamedGemm`]: a Gemm with `transB` (PyTorch's `Linear`) computed
//!   row of B by row of B, with the engine's own row-dot kernel and epilogue,
//!   so that at batch 8 or less its output is bit for bit what [`Plan::run`]
//!   gives (the engine takes the same kernel there);
//! - [`Staged`]: a graph cut into segments, each run by its own [`Plan`],
//!   around the nodes the caller computes itself.
//!
//! What this does not do: decrypt, decide which nodes to stream (the
//! caller's memory budget does), or stream any other op.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::OnceLock;

use crate::error::Error;
use crate::graph::{Graph, Node, Op, ParamInfo, ValueInfo};
use crate::kernels;
use crate::plan::{Plan, WeightSource};
use crate::tensor::Tensor;
use crate::threads::Pace;

/// Most rows of A for which the engine's Gemm uses the row-dot kernel
/// (`kernels::ROW_DOT_MAX_ROWS`); up to it [`StreamedGemm`] matches it bit for bit.
pub const STREAMED_GEMM_EXACT_ROWS: usize = 8;

/// Shortest row of B the engine's row-dot kernel takes.
const ROW_DOT_MIN_LEN: usize = 16;

/// A Gemm node `Y = alpha · A · Bᵀ + beta · C` whose B (`[N, K]`, a weight)
/// is supplied one row at a time: A is `[M, K]`, C (a weight, optional) a
/// scalar, `[N]` or `[1, N]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StreamedGemm {
    alpha: f32,
    beta: f32,
    /// B's rows (the output's columns).
    n: usize,
    /// B's row length (A's columns).
    k: usize,
}

impl StreamedGemm {
    /// The node as a streamable Gemm, given the declarations of its B and
    /// (if it has one) C; `None` when it is anything else (another op, A
    /// transposed, B not transposed, a C that depends on the batch, rows
    /// shorter than the row-dot kernel takes).
    #[must_use]
    pub fn of(node: &Node, b: &ParamInfo, c: Option<&ParamInfo>) -> Option<StreamedGemm> {
        let Op::Gemm {
            alpha,
            beta,
            trans_a: false,
            trans_b: true,
        } = node.op
        else {
            return None;
        };
        let &[n, k] = b.shape.as_slice() else {
            return None;
        };
        let c_fits = c.is_none_or(|c| match c.shape.as_slice() {
            [] => true,
            [len] | [1, len] => *len == n || *len == 1,
            _ => false,
        });
        (c_fits && k >= ROW_DOT_MIN_LEN).then_some(StreamedGemm { alpha, beta, n, k })
    }

    /// B's rows: the output's columns.
    #[must_use]
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Length of one row of B.
    #[must_use]
    pub fn row_len(&self) -> usize {
        self.k
    }

    /// Checks A and returns its rows (the batch).
    pub fn batch(&self, a: &Tensor) -> Result<usize, Error> {
        match a.shape() {
            &[m, k] if k == self.k => Ok(m),
            shape => Err(Error::ShapeMismatch {
                context: "streamed Gemm".into(),
                reason: format!("A must be [M, {}], got {shape:?}", self.k),
            }),
        }
    }

    /// Writes into `out` the dot products of every row of A with every row
    /// of B in `rows` (whole rows, consecutive): `out[j · M + i]` for row `j`
    /// of `rows` and row `i` of A. Several rows at a time run faster than
    /// one at a time (four are read at once).
    ///
    /// # Panics
    ///
    /// When `out` holds fewer than M values per row of `rows`.
    pub fn dots(&self, a: &Tensor, rows: &[f32], out: &mut [f32]) {
        let a_rows: Vec<&[f32]> = a.data().chunks_exact(self.k).collect();
        let b_rows: Vec<&[f32]> = rows.chunks_exact(self.k).collect();
        kernels::dots_into(&a_rows, &b_rows, out, false);
    }

    /// The output `[M, N]` from every row's dot products (`dots[j · M + i]`
    /// for row `j` of B and row `i` of A) and C, as the engine's Gemm
    /// finishes it.
    pub fn finish(&self, m: usize, dots: &[f32], c: Option<&Tensor>) -> Result<Tensor, Error> {
        let n = self.n;
        if dots.len() != m * n {
            return Err(Error::ShapeMismatch {
                context: "streamed Gemm".into(),
                reason: format!("{} dot products for a {m}x{n} output", dots.len()),
            });
        }
        let c = c.filter(|_| self.beta != 0.0).map(Tensor::data);
        let mut y = Vec::with_capacity(m * n);
        for i in 0..m {
            y.extend((0..n).map(|j| {
                let product = self.alpha * dots[j * m + i];
                match c {
                    // The engine fills Y with beta · C, then adds the product.
                    Some(c) => product + self.beta * c[if c.len() == 1 { 0 } else { j }],
                    None => product,
                }
            }));
        }
        Tensor::new(vec![m, n], y)
    }
}

/// A graph cut into [`Plan`] segments around nodes its caller runs itself.
///
/// [`Staged::run`] calls the [`WeightSource`]'s `prepare` and `release` for
/// every node in graph order, the caller's nodes included, exactly as
/// [`Plan::run`] does; the segments' plans are compiled at the first run
/// (their inputs' ranks are known then) and kept.
#[derive(Debug)]
pub struct Staged {
    graph: Graph,
    stages: Vec<Stage>,
    /// Per stage: values no later stage (nor the graph's outputs) reads.
    dead_after: Vec<Vec<String>>,
    /// Whether the last run was quick enough to stay on its caller's thread.
    pace: Pace,
}

#[derive(Debug)]
enum Stage {
    Segment {
        nodes: Range<usize>,
        inputs: Vec<String>,
        outputs: Vec<String>,
        plan: Box<OnceLock<Plan>>,
    },
    Own(usize),
}

impl Staged {
    /// Cuts `graph` (already checked by [`Plan::new`]) around the nodes `own`.
    #[must_use]
    pub fn new(graph: &Graph, own: &[usize]) -> Staged {
        let params: HashSet<&str> = graph.params.iter().map(|p| p.name.as_str()).collect();
        let own: HashSet<usize> = own.iter().copied().collect();
        let mut ranges = Vec::new();
        let mut start = 0;
        for j in 0..graph.nodes.len() {
            if own.contains(&j) {
                if start < j {
                    ranges.push((start..j, false));
                }
                ranges.push((j..j + 1, true));
                start = j + 1;
            }
        }
        if start < graph.nodes.len() {
            ranges.push((start..graph.nodes.len(), false));
        }
        let reads = |range: &Range<usize>| -> Vec<String> {
            let made: HashSet<&str> = graph.nodes[range.clone()]
                .iter()
                .flat_map(|n| n.outputs.iter().map(String::as_str))
                .collect();
            let mut seen = HashSet::new();
            graph.nodes[range.clone()]
                .iter()
                .flat_map(|n| n.inputs.iter())
                .filter(|name| {
                    !name.is_empty()
                        && !params.contains(name.as_str())
                        && !made.contains(name.as_str())
                })
                .filter(|name| seen.insert(name.as_str()))
                .cloned()
                .collect()
        };
        let stage_reads: Vec<Vec<String>> = ranges.iter().map(|(r, _)| reads(r)).collect();
        let mut stages = Vec::with_capacity(ranges.len());
        for (s, (range, own)) in ranges.iter().enumerate() {
            if *own {
                stages.push(Stage::Own(range.start));
                continue;
            }
            let later: HashSet<&str> = stage_reads[s + 1..]
                .iter()
                .flatten()
                .map(String::as_str)
                .chain(graph.outputs.iter().map(String::as_str))
                .collect();
            let mut outputs: Vec<String> = graph.nodes[range.clone()]
                .iter()
                .flat_map(|n| n.outputs.iter())
                .filter(|o| later.contains(o.as_str()))
                .cloned()
                .collect();
            if outputs.is_empty() {
                // Nothing after it reads this segment; it still runs, as in Plan::run.
                outputs.extend(graph.nodes[range.end - 1].outputs.first().cloned());
            }
            stages.push(Stage::Segment {
                nodes: range.clone(),
                inputs: stage_reads[s].clone(),
                outputs,
                plan: Box::default(),
            });
        }
        let mut dead_after = vec![Vec::new(); stages.len()];
        let mut last_read: HashMap<&str, usize> = HashMap::new();
        for (s, names) in stage_reads.iter().enumerate() {
            for name in names {
                last_read.insert(name.as_str(), s);
            }
        }
        for output in &graph.outputs {
            last_read.remove(output.as_str());
        }
        for (name, s) in last_read {
            dead_after[s].push(name.to_owned());
        }
        Staged {
            graph: graph.clone(),
            stages,
            dead_after,
            pace: Pace::default(),
        }
    }

    /// Runs the graph on `inputs` with weights from `weights`; `own(j,
    /// operands, weights)` computes node `j` of the caller's from its value
    /// operands (not its weights), in the node's input order. Like
    /// [`Plan::run`], the run moves to one of rayon's workers when more
    /// than one thread is allowed and the last run was not quick.
    pub fn run<W, F>(
        &self,
        inputs: &[Tensor],
        weights: &mut W,
        own: &mut F,
    ) -> Result<Vec<Tensor>, Error>
    where
        W: WeightSource + Send + ?Sized,
        F: FnMut(usize, &[&Tensor], &mut W) -> Result<Tensor, Error> + Send,
    {
        crate::threads::as_team(&self.pace, || self.run_here(inputs, weights, own))
    }

    fn run_here<W, F>(
        &self,
        inputs: &[Tensor],
        weights: &mut W,
        own: &mut F,
    ) -> Result<Vec<Tensor>, Error>
    where
        W: WeightSource + ?Sized,
        F: FnMut(usize, &[&Tensor], &mut W) -> Result<Tensor, Error>,
    {
        if inputs.len() != self.graph.inputs.len() {
            return Err(Error::ShapeMismatch {
                context: "model inputs".into(),
                reason: format!(
                    "the graph takes {} inputs but {} were given",
                    self.graph.inputs.len(),
                    inputs.len()
                ),
            });
        }
        let mut values: HashMap<String, Tensor> = self
            .graph
            .inputs
            .iter()
            .zip(inputs)
            .map(|(info, x)| (info.name.clone(), x.clone()))
            .collect();
        let missing = |name: &str| Error::InvalidGraph {
            reason: format!("'{name}' is read before it is computed"),
        };
        for (stage, dead) in self.stages.iter().zip(&self.dead_after) {
            match stage {
                Stage::Own(j) => {
                    let node = &self.graph.nodes[*j];
                    let operands = node
                        .inputs
                        .iter()
                        .filter(|name| values.contains_key(name.as_str()))
                        .map(|name| &values[name.as_str()])
                        .collect::<Vec<_>>();
                    weights.prepare(node)?;
                    let result = own(*j, &operands, weights);
                    weights.release(node);
                    let output = node.outputs.first().ok_or_else(|| missing(&node.name))?;
                    values.insert(output.clone(), result?);
                }
                Stage::Segment {
                    nodes,
                    inputs,
                    outputs,
                    plan,
                } => {
                    let operands = inputs
                        .iter()
                        .map(|name| values.get(name).cloned().ok_or_else(|| missing(name)))
                        .collect::<Result<Vec<_>, _>>()?;
                    let plan = match plan.get() {
                        Some(plan) => plan,
                        None => {
                            let compiled = self.segment(nodes, inputs, outputs, &operands)?;
                            plan.get_or_init(|| compiled)
                        }
                    };
                    let results = plan.run_here(&operands, weights)?;
                    for (name, value) in outputs.iter().zip(results) {
                        values.insert(name.clone(), value);
                    }
                }
            }
            for name in dead {
                values.remove(name);
            }
        }
        self.graph
            .outputs
            .iter()
            .map(|name| values.get(name).cloned().ok_or_else(|| missing(name)))
            .collect()
    }

    /// The plan of one segment, its inputs declared with the ranks of `operands`.
    fn segment(
        &self,
        nodes: &Range<usize>,
        inputs: &[String],
        outputs: &[String],
        operands: &[Tensor],
    ) -> Result<Plan, Error> {
        let declared = inputs
            .iter()
            .zip(operands)
            .map(|(name, x)| {
                self.graph
                    .inputs
                    .iter()
                    .find(|i| &i.name == name)
                    .cloned()
                    .unwrap_or_else(|| ValueInfo {
                        name: name.clone(),
                        shape: vec![None; x.shape().len()],
                    })
            })
            .collect();
        Plan::new(Graph {
            inputs: declared,
            params: self.graph.params.clone(),
            nodes: self.graph.nodes[nodes.clone()].to_vec(),
            outputs: outputs.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::ValueInfo;

    fn ramp(shape: &[usize], seed: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let data = (0..n)
            .map(|i| ((i * 7 + seed * 3) % 23) as f32 / 11.0 - 1.0)
            .collect();
        Tensor::new(shape.to_vec(), data).unwrap()
    }

    /// x -> Relu -> Gemm(w, b) -> Relu -> Gemm(w2) -> y
    fn mlp(k: usize, n: usize) -> (Graph, Vec<Tensor>) {
        let gemm = Op::Gemm {
            alpha: 0.5,
            beta: 2.0,
            trans_a: false,
            trans_b: true,
        };
        let node = |name: &str, op: Op, inputs: &[&str], out: &str| Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![out.into()],
        };
        let param = |name: &str, shape: &[usize]| ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
        };
        let graph = Graph {
            inputs: vec![ValueInfo {
                name: "x".into(),
                shape: vec![None, Some(k)],
            }],
            params: vec![param("w", &[n, k]), param("b", &[n]), param("w2", &[3, n])],
            nodes: vec![
                node("r0", Op::Relu, &["x"], "h0"),
                node("fc", gemm.clone(), &["h0", "w", "b"], "h1"),
                node("r1", Op::Relu, &["h1"], "h2"),
                node("fc2", gemm, &["h2", "w2"], "y"),
            ],
            outputs: vec!["y".into()],
        };
        let weights = vec![ramp(&[n, k], 1), ramp(&[n], 2), ramp(&[3, n], 3)];
        (graph, weights)
    }

    #[test]
    fn streamed_nodes_give_the_plans_bits() {
        let (graph, weights) = mlp(40, 19);
        let plan = Plan::new(graph.clone()).unwrap();
        let staged = Staged::new(&graph, &[1, 3]);
        for m in [1, 3, 8] {
            let x = ramp(&[m, 40], m);
            let mut resident = weights.clone();
            let want = plan
                .run(std::slice::from_ref(&x), resident.as_mut_slice())
                .unwrap();
            let mut calls = Vec::new();
            let got = staged
                .run(
                    std::slice::from_ref(&x),
                    resident.as_mut_slice(),
                    &mut |j, operands, w| {
                        calls.push(j);
                        let node = &graph.nodes[j];
                        let index = |name: &str| graph.params.iter().position(|p| p.name == name);
                        let b = index(&node.inputs[1]).unwrap();
                        let c = node.inputs.get(2).and_then(|n| index(n));
                        let gemm =
                            StreamedGemm::of(node, &graph.params[b], c.map(|c| &graph.params[c]))
                                .unwrap();
                        let a = operands[0];
                        let m = gemm.batch(a)?;
                        let mut dots = vec![0.0; m * gemm.rows()];
                        gemm.dots(a, w[b].data(), &mut dots);
                        gemm.finish(m, &dots, c.map(|c| &w[c]))
                    },
                )
                .unwrap();
            assert_eq!(calls, [1, 3]);
            assert_eq!(got, want, "batch {m}");
        }
    }

    #[test]
    fn only_transposed_b_with_a_row_shaped_c_streams() {
        let (graph, _) = mlp(40, 19);
        let p = &graph.params;
        assert!(StreamedGemm::of(&graph.nodes[1], &p[0], Some(&p[1])).is_some());
        assert!(StreamedGemm::of(&graph.nodes[0], &p[0], None).is_none());
        let mut node = graph.nodes[1].clone();
        node.op = Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: false,
        };
        assert!(StreamedGemm::of(&node, &p[0], None).is_none());
        let batch_c = ParamInfo {
            name: "c".into(),
            shape: vec![2, 19],
        };
        assert!(StreamedGemm::of(&graph.nodes[1], &p[0], Some(&batch_c)).is_none());
    }
}
