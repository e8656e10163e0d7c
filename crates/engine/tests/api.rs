//! A MobileNet-style network through the public API: weights in a `Model`
//! or streamed by a `WeightSource`, batches, and `.npy` round trips.

use std::collections::HashMap;

use capsule_engine::{
    Activation, ConvAttrs, Error, Graph, Model, Node, Op, ParamInfo, Plan, Tensor, ValueInfo,
    WeightSource, read_npy, write_npy,
};

fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: vec![name.into()],
    }
}

fn conv(kernel: usize, stride: usize, group: usize, activation: Activation) -> Op {
    let pad = kernel / 2;
    Op::Conv(ConvAttrs {
        kernel: [kernel, kernel],
        strides: [stride, stride],
        pads: [pad; 4],
        dilations: [1, 1],
        group,
        activation,
    })
}

/// stem conv -> depthwise -> pointwise, a residual Add, Clip (ReLU6),
/// GlobalAveragePool, Flatten, Gemm, Softmax.
fn network() -> (Graph, HashMap<String, Tensor>) {
    let relu6 = Activation::Clip { min: 0.0, max: 6.0 };
    let params = [
        ("stem.w", vec![8, 3, 3, 3]),
        ("stem.b", vec![8]),
        ("dw.w", vec![8, 1, 3, 3]),
        ("dw.b", vec![8]),
        ("pw.w", vec![8, 8, 1, 1]),
        ("fc.w", vec![5, 8]),
        ("fc.b", vec![5]),
    ];
    let graph = Graph {
        inputs: vec![ValueInfo {
            name: "image".into(),
            shape: vec![None, Some(3), Some(16), Some(16)],
        }],
        params: params
            .iter()
            .map(|(name, shape)| ParamInfo {
                name: name.to_string(),
                shape: shape.clone(),
            })
            .collect(),
        nodes: vec![
            node("stem", conv(3, 2, 1, relu6), &["image", "stem.w", "stem.b"]),
            node("dw", conv(3, 1, 8, relu6), &["stem", "dw.w", "dw.b"]),
            node("pw", conv(1, 1, 1, Activation::None), &["dw", "pw.w"]),
            node("residual", Op::Add, &["stem", "pw"]),
            node("act", Op::Clip { min: 0.0, max: 6.0 }, &["residual"]),
            node("gap", Op::GlobalAveragePool, &["act"]),
            node("flat", Op::Flatten { axis: 1 }, &["gap"]),
            node(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["flat", "fc.w", "fc.b"],
            ),
            node("probs", Op::Softmax { axis: 1 }, &["fc"]),
        ],
        outputs: vec!["probs".into(), "fc".into()],
    };
    let weights = params
        .iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let n = shape.iter().product();
            let data = (0..n)
                .map(|i| ((i * 13 + k * 7) % 17) as f32 / 17.0 - 0.4)
                .collect();
            (name.to_string(), Tensor::new(shape.clone(), data).unwrap())
        })
        .collect();
    (graph, weights)
}

fn images(batch: usize) -> Tensor {
    let n = batch * 3 * 16 * 16;
    let data = (0..n).map(|i| ((i * 31) % 29) as f32 / 10.0).collect();
    Tensor::new(vec![batch, 3, 16, 16], data).unwrap()
}

#[test]
fn batch_items_are_independent() {
    let (graph, weights) = network();
    let model = Model::new(graph, weights).unwrap();
    let batch = model.run(&[images(3)]).unwrap();
    assert_eq!(batch[0].shape(), &[3, 5]);
    assert_eq!(batch[1].shape(), &[3, 5]);
    for (i, image) in images(3).data().chunks(3 * 16 * 16).enumerate() {
        let one = Tensor::new(vec![1, 3, 16, 16], image.to_vec()).unwrap();
        let out = model.run(&[one]).unwrap();
        let row = &batch[0].data()[i * 5..][..5];
        for (a, b) in out[0].data().iter().zip(row) {
            assert!((a - b).abs() < 1e-6, "item {i}: {a} vs {b}");
        }
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

/// Loads a node's weights from `.npy` bytes right before it runs, and
/// drops them right after: the shape of the enclave's layer streaming.
struct NpyLayers {
    files: HashMap<String, Vec<u8>>,
    loaded: HashMap<String, Tensor>,
    peak: usize,
}

impl WeightSource for NpyLayers {
    fn prepare(&mut self, node: &Node) -> Result<(), Error> {
        for input in &node.inputs {
            if let Some(bytes) = self.files.get(input) {
                self.loaded.insert(input.clone(), read_npy(bytes)?);
            }
        }
        self.peak = self.peak.max(self.loaded.len());
        Ok(())
    }

    fn param(&self, _index: usize, info: &ParamInfo) -> Option<&Tensor> {
        self.loaded.get(&info.name)
    }

    fn release(&mut self, _node: &Node) {
        self.loaded.clear();
    }
}

#[test]
fn streamed_weights_give_the_same_outputs() {
    let (graph, weights) = network();
    let files = weights
        .iter()
        .map(|(name, t)| (name.clone(), write_npy(t)))
        .collect();
    let model = Model::new(graph.clone(), weights).unwrap();
    let plan = Plan::new(graph).unwrap();
    let mut source = NpyLayers {
        files,
        loaded: HashMap::new(),
        peak: 0,
    };
    let streamed = plan.run(&[images(2)], &mut source).unwrap();
    assert_eq!(streamed, model.run(&[images(2)]).unwrap());
    // Never more than one node's weights (a weight and a bias) at a time.
    assert_eq!(source.peak, 2);
    assert!(source.loaded.is_empty());
}

#[test]
fn a_corrupt_weight_file_fails_the_run() {
    let (graph, weights) = network();
    let mut files: HashMap<String, Vec<u8>> = weights
        .iter()
        .map(|(name, t)| (name.clone(), write_npy(t)))
        .collect();
    files.get_mut("pw.w").unwrap().truncate(100);
    let mut source = NpyLayers {
        files,
        loaded: HashMap::new(),
        peak: 0,
    };
    let err = Plan::new(graph)
        .unwrap()
        .run(&[images(1)], &mut source)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidNpy { .. }), "{err}");
}

#[test]
fn outputs_round_trip_through_npy() {
    let (graph, weights) = network();
    let out = Model::new(graph, weights)
        .unwrap()
        .run(&[images(2)])
        .unwrap();
    for t in out {
        assert_eq!(read_npy(&write_npy(&t)).unwrap(), t);
    }
}
