//! One thread or several: the same network gives the same outputs. Its own
//! test binary, because [`set_threads`] is process-wide.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use capsule_engine::{
    Activation, ConvAttrs, Graph, Model, Node, Op, ParamInfo, Plan, Tensor, ValueInfo,
    WeightSource, set_threads, threads,
};

fn node(name: &str, op: Op, inputs: &[&str]) -> Node {
    Node {
        name: name.into(),
        op,
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: vec![name.into()],
    }
}

fn conv(kernel: usize, stride: usize, group: usize) -> Op {
    Op::Conv(ConvAttrs {
        kernel: [kernel, kernel],
        strides: [stride, stride],
        pads: [kernel / 2; 4],
        dilations: [1, 1],
        group,
        activation: Activation::None,
    })
}

fn values(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// The declarations of weights named and shaped so.
fn declared(params: &[(&str, Vec<usize>)]) -> Vec<ParamInfo> {
    params
        .iter()
        .map(|(name, shape)| ParamInfo {
            name: name.to_string(),
            shape: shape.clone(),
        })
        .collect()
}

/// Big enough that every kernel takes its threaded path: a 3x3 conv
/// (im2col), a 3x3 depthwise with stride 2, a pointwise conv with ReLU6, a
/// max pool and a dense layer.
fn network() -> (Graph, HashMap<String, Tensor>) {
    let params = [
        ("a.w", vec![32, 16, 3, 3]),
        ("a.b", vec![32]),
        ("dw.w", vec![32, 1, 3, 3]),
        ("pw.w", vec![64, 32, 1, 1]),
        ("fc.w", vec![10, 64 * 16 * 16]),
    ];
    let graph = Graph {
        inputs: vec![ValueInfo {
            name: "x".into(),
            shape: vec![None, Some(16), Some(32), Some(32)],
        }],
        params: declared(&params),
        nodes: vec![
            node("a", conv(3, 1, 1), &["x", "a.w", "a.b"]),
            node("relu", Op::Relu, &["a"]),
            node("dw", conv(3, 2, 32), &["relu", "dw.w"]),
            node("pw", conv(1, 1, 1), &["dw", "pw.w"]),
            node("clip", Op::Clip { min: 0.0, max: 6.0 }, &["pw"]),
            node("flat", Op::Flatten { axis: 1 }, &["clip"]),
            node(
                "fc",
                Op::Gemm {
                    alpha: 1.0,
                    beta: 1.0,
                    trans_a: false,
                    trans_b: true,
                },
                &["flat", "fc.w"],
            ),
        ],
        outputs: vec!["fc".into()],
    };
    let weights = params
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| (name.to_string(), values(shape, i + 1)))
        .collect();
    (graph, weights)
}

/// The tests here change the process-wide thread count: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// The network, an input batch of 2, and the turn to change the thread count.
fn setup() -> (MutexGuard<'static, ()>, Model, Tensor) {
    let serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let (graph, weights) = network();
    let model = Model::new(graph, weights).unwrap();
    (serial, model, values(&[2, 16, 32, 32], 9))
}

#[test]
fn one_thread_and_two_agree() {
    let (_serial, model, x) = setup();
    set_threads(2);
    let two = model.run(std::slice::from_ref(&x)).unwrap();
    set_threads(1);
    assert_eq!(threads(), 1);
    let one = model.run(&[x]).unwrap();
    assert_eq!(one[0].shape(), &[2, 10]);
    for (a, b) in one[0].data().iter().zip(two[0].data()) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{a} vs {b}");
    }
}

/// Runs started at once from several threads, which share the pool's
/// workers and helpers, all finish with the same outputs; a run that fails
/// returns its error, and the runs after it still work.
#[test]
fn concurrent_runs_on_two_threads_agree_and_errors_end_them() {
    let (_serial, model, x) = setup();
    set_threads(2);
    let want = model.run(std::slice::from_ref(&x)).unwrap();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..3)
            .map(|_| s.spawn(|| model.run(std::slice::from_ref(&x)).unwrap()))
            .collect();
        for run in runs {
            assert_eq!(run.join().unwrap()[0].data(), want[0].data());
        }
    });
    let wrong = values(&[2, 8, 32, 32], 9);
    assert!(model.run(&[wrong]).is_err());
    assert_eq!(model.run(&[x]).unwrap()[0].data(), want[0].data());
}

/// Weights that a run may take ([`WeightSource::take`]): what it takes, and
/// what it gives back, are noted.
struct Lending {
    weights: Vec<Option<Tensor>>,
    taken: Vec<usize>,
    given_back: Vec<(usize, Vec<f32>)>,
}

impl WeightSource for Lending {
    fn param(&self, index: usize, _info: &ParamInfo) -> Option<&Tensor> {
        self.weights[index].as_ref()
    }

    fn take(&mut self, index: usize, _info: &ParamInfo) -> Option<Tensor> {
        self.taken.push(index);
        self.weights[index].take()
    }

    fn give_back(&mut self, index: usize, zeroed: Vec<f32>) {
        self.given_back.push((index, zeroed));
    }
}

/// A graph of 3x3 Convs of 256 channels at 14x14 (49 tiles) with these
/// nodes, on weights `w` and `b`.
fn convs_at_14x14(nodes: Vec<Node>, output: &str) -> Graph {
    let params = [("w", vec![256, 256, 3, 3]), ("b", vec![256])];
    Graph {
        inputs: vec![ValueInfo {
            name: "x".into(),
            shape: vec![Some(1), Some(256), Some(14), Some(14)],
        }],
        params: declared(&params),
        nodes,
        outputs: vec![output.into()],
    }
}

/// On two threads, a 3x3 Conv of 256 channels at 14x14 (49 tiles) goes by
/// Winograd's blocks of output channels: handed its weights by the last node
/// that reads them, it gives them back overwritten with zeros, and computes
/// the same bits as from weights it only reads.
#[test]
fn a_conv_by_blocks_gives_back_the_weights_it_is_handed_as_zeros() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    // `w` twice: only its last reader may take it.
    let nodes = vec![
        node("a", conv(3, 1, 1), &["x", "w", "b"]),
        node("relu", Op::Relu, &["a"]),
        node("c", conv(3, 1, 1), &["relu", "w"]),
    ];
    let graph = convs_at_14x14(nodes, "c");
    let weights = vec![values(&[256, 256, 3, 3], 1), values(&[256], 2)];
    let x = values(&[1, 256, 14, 14], 9);
    let plan = Plan::new(graph).unwrap();
    set_threads(2);
    let want = plan
        .run(std::slice::from_ref(&x), weights.clone().as_mut_slice())
        .unwrap();
    let mut lending = Lending {
        weights: weights.into_iter().map(Some).collect(),
        taken: Vec::new(),
        given_back: Vec::new(),
    };
    let got = plan.run(&[x], &mut lending).unwrap();
    assert_eq!(lending.taken, [0], "asked for w once, by its last reader");
    let [(0, zeroed)] = lending.given_back.as_slice() else {
        panic!("w was not given back alone: {:?}", lending.given_back.len());
    };
    assert_eq!(zeroed.len(), 256 * 256 * 9);
    assert!(zeroed.iter().all(|&v| v.to_bits() == 0));
    assert!(
        want[0]
            .data()
            .iter()
            .zip(got[0].data())
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
}

/// Weights handed over are given back as zeros when the node fails too.
#[test]
fn weights_handed_over_to_a_failing_node_come_back_as_zeros() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let graph = convs_at_14x14(vec![node("a", conv(3, 1, 1), &["x", "w", "b"])], "a");
    let plan = Plan::new(graph).unwrap();
    set_threads(2);
    // One input channel too few: the graph declares `[256, 256, 3, 3]`.
    let wrong = values(&[256, 255, 3, 3], 1);
    let mut lending = Lending {
        weights: vec![Some(wrong), Some(values(&[256], 2))],
        taken: Vec::new(),
        given_back: Vec::new(),
    };
    let err = plan
        .run(&[values(&[1, 256, 14, 14], 9)], &mut lending)
        .unwrap_err();
    assert!(err.to_string().contains("graph declares"), "{err}");
    let [(0, zeroed)] = lending.given_back.as_slice() else {
        panic!("w was not given back alone");
    };
    assert_eq!(zeroed.len(), 256 * 255 * 9);
    assert!(zeroed.iter().all(|&v| v.to_bits() == 0));
}
