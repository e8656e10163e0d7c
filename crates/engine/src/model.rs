//! A model: a [`Plan`] together with all the weights it reads, in memory.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::graph::{Graph, Node, ParamInfo};
use crate::plan::{Plan, WeightSource};
use crate::tensor::Tensor;

/// A graph and its weights, checked against each other once, ready to run.
///
/// To supply weights node by node instead (as the enclave does when it
/// unseals one layer at a time), run a [`Plan`] with a [`WeightSource`].
#[derive(Clone)]
pub struct Model {
    plan: Plan,
    /// In the order of [`Graph::params`].
    weights: Vec<Tensor>,
}

impl Model {
    /// Checks `graph` (see [`Plan::new`]) and `weights` against it.
    ///
    /// Fails with [`Error::InvalidGraph`] for a graph that cannot run, and
    /// with [`Error::InvalidWeights`] when a declared weight is missing, has
    /// another shape than declared, or when `weights` holds a name the
    /// graph does not declare.
    pub fn new(graph: Graph, mut weights: HashMap<String, Tensor>) -> Result<Model, Error> {
        let plan = Plan::new(graph)?;
        let mut ordered = Vec::with_capacity(plan.graph().params.len());
        for info in &plan.graph().params {
            let tensor = weights
                .remove(&info.name)
                .ok_or_else(|| Error::InvalidWeights {
                    reason: format!("weight '{}' is declared but not supplied", info.name),
                })?;
            if tensor.shape() != info.shape {
                return Err(Error::InvalidWeights {
                    reason: format!(
                        "weight '{}' has shape {:?} but the graph declares {:?}",
                        info.name,
                        tensor.shape(),
                        info.shape
                    ),
                });
            }
            ordered.push(tensor);
        }
        if !weights.is_empty() {
            let mut unknown: Vec<&str> = weights.keys().map(String::as_str).collect();
            unknown.sort_unstable();
            return Err(Error::InvalidWeights {
                reason: format!("the graph declares no weight named {}", unknown.join(", ")),
            });
        }
        Ok(Model {
            plan,
            weights: ordered,
        })
    }

    /// Runs the model on `inputs`, in the order of [`Graph::inputs`], and
    /// returns the values of [`Graph::outputs`].
    ///
    /// Fails with [`Error::ShapeMismatch`] when an input does not have its
    /// declared shape or an op cannot take its operands; the error names the
    /// input or the node.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, Error> {
        self.plan.run(inputs, &mut Resident(&self.weights))
    }

    /// [`Model::run`], also returning how long each node of [`Graph::nodes`]
    /// took, in order: the wall time from its weights' preparation to their
    /// release, which is its kernel's, waits for helper threads included (a
    /// node fused into the one before it takes almost none). For profiling;
    /// it reads the clock twice per node.
    pub fn run_timed(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Vec<Duration>), Error> {
        let mut timed = Timed {
            weights: Resident(&self.weights),
            started: Instant::now(),
            times: Vec::with_capacity(self.graph().nodes.len()),
        };
        let outputs = self.plan.run(inputs, &mut timed)?;
        Ok((outputs, timed.times))
    }

    /// The architecture.
    #[must_use]
    pub fn graph(&self) -> &Graph {
        self.plan.graph()
    }

    /// The compiled graph, to run on other weights.
    #[must_use]
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
}

impl fmt::Debug for Model {
    /// A summary: printing every weight would be of no use.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let graph = self.graph();
        f.debug_struct("Model")
            .field("inputs", &graph.inputs.len())
            .field("nodes", &graph.nodes.len())
            .field("outputs", &graph.outputs.len())
            .field("weights", &self.weights.len())
            .field("weight_values", &graph.param_count())
            .finish()
    }
}

/// The model's own weights, all in memory: nothing to prepare or release.
struct Resident<'a>(&'a [Tensor]);

impl WeightSource for Resident<'_> {
    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        self.0.get(index)
    }
}

/// [`Resident`] weights that time each node from `prepare` to `release`.
struct Timed<'a> {
    weights: Resident<'a>,
    started: Instant,
    times: Vec<Duration>,
}

impl WeightSource for Timed<'_> {
    fn prepare(&mut self, _node: &Node) -> Result<(), Error> {
        self.started = Instant::now();
        Ok(())
    }

    fn param(&self, index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.weights.param(index, info)
    }

    fn release(&mut self, _node: &Node) {
        self.times.push(self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Activation, ConvAttrs, Node, Op, PoolAttrs, ValueInfo};

    fn node(name: &str, op: Op, inputs: &[&str], output: &str) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: vec![output.into()],
        }
    }

    fn conv_attrs(group: usize) -> ConvAttrs {
        ConvAttrs {
            kernel: [3, 3],
            strides: [1, 1],
            pads: [1, 1, 1, 1],
            dilations: [1, 1],
            group,
            activation: Activation::Relu,
        }
    }

    fn param(name: &str, shape: &[usize]) -> ParamInfo {
        ParamInfo {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// x [?, 2, 6, 6] -> Conv(w, b) + Relu -> MaxPool -> Flatten -> Gemm -> Softmax
    fn small_cnn() -> (Graph, HashMap<String, Tensor>) {
        let graph = Graph {
            inputs: vec![ValueInfo {
                name: "x".into(),
                shape: vec![None, Some(2), Some(6), Some(6)],
            }],
            params: vec![
                param("w", &[4, 2, 3, 3]),
                param("b", &[4]),
                param("fc", &[36, 3]),
            ],
            nodes: vec![
                node("conv", Op::Conv(conv_attrs(1)), &["x", "w", "b"], "c"),
                node(
                    "pool",
                    Op::MaxPool(PoolAttrs {
                        kernel: [2, 2],
                        strides: [2, 2],
                        pads: [0; 4],
                        dilations: [1, 1],
                        ceil_mode: false,
                    }),
                    &["c"],
                    "p",
                ),
                node("flat", Op::Flatten { axis: 1 }, &["p"], "f"),
                node(
                    "fc",
                    Op::Gemm {
                        alpha: 1.0,
                        beta: 1.0,
                        trans_a: false,
                        trans_b: false,
                    },
                    &["f", "fc"],
                    "logits",
                ),
                node("softmax", Op::Softmax { axis: -1 }, &["logits"], "y"),
            ],
            outputs: vec!["y".into()],
        };
        let ramp = |shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|i| ((i * 7) % 13) as f32 * scale - 0.3)
                .collect();
            Tensor::new(shape.to_vec(), data).unwrap()
        };
        let weights = HashMap::from([
            ("w".to_string(), ramp(&[4, 2, 3, 3], 0.05)),
            ("b".to_string(), ramp(&[4], 0.1)),
            ("fc".to_string(), ramp(&[36, 3], 0.02)),
        ]);
        (graph, weights)
    }

    fn input(batch: usize) -> Tensor {
        let n = batch * 72;
        Tensor::new(
            vec![batch, 2, 6, 6],
            (0..n).map(|i| (i % 11) as f32 / 5.0 - 1.0).collect(),
        )
        .unwrap()
    }

    fn graph_error(graph: Graph) -> String {
        match Plan::new(graph) {
            Err(Error::InvalidGraph { reason }) => reason,
            other => panic!("expected InvalidGraph, got {other:?}"),
        }
    }

    #[test]
    fn runs_a_small_cnn_and_batches_independently() {
        let (graph, weights) = small_cnn();
        let model = Model::new(graph, weights).unwrap();
        let both = model.run(&[input(2)]).unwrap();
        assert_eq!(both[0].shape(), &[2, 3]);
        for row in both[0].data().chunks(3) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        // Each batch item alone gives its row of the batched result.
        let x = input(2);
        for (i, item) in x.data().chunks(72).enumerate() {
            let single = Tensor::new(vec![1, 2, 6, 6], item.to_vec()).unwrap();
            let y = model.run(&[single]).unwrap();
            for (a, b) in y[0].data().iter().zip(&both[0].data()[i * 3..]) {
                assert!((a - b).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn timed_runs_give_the_same_outputs_and_a_time_per_node() {
        let (graph, weights) = small_cnn();
        let nodes = graph.nodes.len();
        let model = Model::new(graph, weights).unwrap();
        let x = input(2);
        let (outputs, times) = model.run_timed(std::slice::from_ref(&x)).unwrap();
        assert_eq!(outputs, model.run(&[x]).unwrap());
        assert_eq!(times.len(), nodes);
        // A failed run reports the error, not times.
        assert!(model.run_timed(&[input(2), input(2)]).is_err());
    }

    #[test]
    fn weights_are_checked_against_declarations() {
        let err = |f: &dyn Fn(&mut HashMap<String, Tensor>)| {
            let (graph, mut weights) = small_cnn();
            f(&mut weights);
            match Model::new(graph, weights) {
                Err(Error::InvalidWeights { reason }) => reason,
                other => panic!("expected InvalidWeights, got {other:?}"),
            }
        };
        assert!(err(&|w| drop(w.remove("b"))).contains("'b' is declared but not supplied"));
        let wrong = |w: &mut HashMap<String, Tensor>| {
            w.insert("b".into(), Tensor::zeros(vec![5]));
        };
        assert!(err(&wrong).contains("'b' has shape [5] but the graph declares [4]"));
        let extra = |w: &mut HashMap<String, Tensor>| {
            w.insert("zz".into(), Tensor::zeros(vec![1]));
            w.insert("aa".into(), Tensor::zeros(vec![1]));
        };
        assert!(err(&extra).contains("no weight named aa, zz"));
    }

    #[test]
    fn inputs_are_checked_against_declarations() {
        let (graph, weights) = small_cnn();
        let model = Model::new(graph, weights).unwrap();
        match model.run(&[Tensor::zeros(vec![1, 3, 6, 6])]) {
            Err(Error::ShapeMismatch { context, reason }) => {
                assert_eq!(context, "input 'x'");
                assert!(reason.contains("expected shape [?, 2, 6, 6]"), "{reason}");
                assert!(reason.contains("got [1, 3, 6, 6]"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            model.run(&[Tensor::zeros(vec![2, 6, 6])]),
            Err(Error::ShapeMismatch { .. })
        ));
        match model.run(&[]) {
            Err(Error::ShapeMismatch { reason, .. }) => {
                assert!(reason.contains("takes 1 inputs (x)"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn op_shape_errors_name_the_node() {
        let (mut graph, mut weights) = small_cnn();
        // The weights now fit the declarations but not the Gemm after them.
        graph.params[2].shape = vec![35, 3];
        weights.insert("fc".into(), Tensor::zeros(vec![35, 3]));
        let model = Model::new(graph, weights).unwrap();
        match model.run(&[input(1)]) {
            Err(Error::ShapeMismatch { context, reason }) => {
                assert_eq!(context, "Gemm node 'fc'");
                assert!(reason.contains("inner dimensions"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn graph_errors() {
        let (base, _) = small_cnn();
        let with = |f: &dyn Fn(&mut Graph)| {
            let mut g = base.clone();
            f(&mut g);
            graph_error(g)
        };
        let e = with(&|g| g.nodes[1].inputs[0] = "nope".into());
        assert!(
            e.contains("MaxPool node 'pool': reads 'nope', which is neither"),
            "{e}"
        );
        // a node may not read a later node's output
        let e = with(&|g| g.nodes.swap(1, 2));
        assert!(e.contains("reads 'p'"), "{e}");
        let e = with(&|g| g.nodes[2].outputs[0] = "c".into());
        assert!(e.contains("'c' is defined twice"), "{e}");
        let e = with(&|g| g.params[0].name = "x".into());
        assert!(e.contains("'x' is defined twice"), "{e}");
        let e = with(&|g| g.nodes[0].inputs.truncate(1));
        assert!(
            e.contains("Conv node 'conv': takes 2 or 3 inputs, has 1"),
            "{e}"
        );
        let e = with(&|g| g.nodes[0].inputs[2] = String::new());
        assert!(e.contains("omitted optional input"), "{e}");
        let e = with(&|g| g.nodes[2].outputs.push("g".into()));
        assert!(e.contains("exactly one output, has 2"), "{e}");
        let e = with(&|g| g.outputs.clear());
        assert!(e.contains("no outputs"), "{e}");
        let e = with(&|g| g.outputs.push("w".into()));
        assert!(e.contains("returns 'w', a weight"), "{e}");
        let e = with(&|g| g.outputs.push("q".into()));
        assert!(e.contains("never computed"), "{e}");
    }

    #[test]
    fn attribute_errors() {
        let (base, _) = small_cnn();
        let with = |op: Op| {
            let mut g = base.clone();
            g.nodes[0].op = op;
            graph_error(g)
        };
        let mut conv = conv_attrs(1);
        conv.strides = [0, 1];
        assert!(with(Op::Conv(conv)).contains("strides [0, 1] contains a zero"));
        assert!(with(Op::Conv(conv_attrs(0))).contains("group is 0"));
        assert!(with(Op::Conv(conv_attrs(3))).contains("do not split into 3 groups"));
        let mut conv = conv_attrs(1);
        conv.kernel = [3, 2];
        assert!(with(Op::Conv(conv)).contains("3x3 kernel but kernel_shape is [3, 2]"));

        let mut g = base.clone();
        g.params[1].shape = vec![4, 1];
        assert!(graph_error(g).contains("bias 'b' must have shape [4]"));
        let mut g = base.clone();
        g.params[0].shape = vec![4, 2, 9];
        assert!(graph_error(g).contains("[M, C/group, kH, kW]"));
        let mut g = base.clone();
        g.params[2].shape = vec![36, 3, 1];
        assert!(graph_error(g).contains("B ('fc') must be a matrix"));

        let mut g = base.clone();
        g.nodes[1].op = Op::AveragePool {
            pool: PoolAttrs {
                kernel: [2, 2],
                strides: [2, 2],
                pads: [0, 2, 0, 0],
                dilations: [1, 1],
                ceil_mode: false,
            },
            count_include_pad: false,
        };
        assert!(graph_error(g).contains("must be smaller than the kernel"));

        let mut g = base.clone();
        g.nodes[2].op = Op::Reshape {
            shape: vec![-1, -1],
            allowzero: false,
        };
        assert!(graph_error(g).contains("more than one -1"));
        let mut g = base.clone();
        g.nodes[2].op = Op::Reshape {
            shape: vec![0, -1],
            allowzero: true,
        };
        assert!(graph_error(g).contains("ONNX forbids"));
        let mut g = base;
        g.nodes[2].op = Op::Reshape {
            shape: vec![-3],
            allowzero: false,
        };
        assert!(graph_error(g).contains("contains -3"));
    }

    #[test]
    fn json_round_trip_runs_the_same() {
        let (graph, weights) = small_cnn();
        let parsed = Graph::from_json(&graph.to_json()).unwrap();
        assert_eq!(parsed, graph);
        let a = Model::new(graph, weights.clone())
            .unwrap()
            .run(&[input(1)])
            .unwrap();
        let b = Model::new(parsed, weights)
            .unwrap()
            .run(&[input(1)])
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn debug_output_is_a_summary() {
        let (graph, weights) = small_cnn();
        let text = format!("{:?}", Model::new(graph, weights).unwrap());
        assert_eq!(
            text,
            "Model { inputs: 1, nodes: 5, outputs: 1, weights: 3, weight_values: 184 }"
        );
    }
}
