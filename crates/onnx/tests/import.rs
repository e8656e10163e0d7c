//! Import-only checks over the test vectors: every model imports into a
//! consistent graph, and the rewrites (folding, pruning, auto_pad, Softmax
//! mapping) produce the expected structure. Numerical agreement with
//! onnxruntime is checked by `vectors.rs`.

use std::collections::HashSet;
use std::path::Path;

use capsule_engine::{Graph, Op};
use capsule_onnx::{Imported, import};

fn vector(case: &str) -> Imported {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(case)
        .join("model.onnx");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    import(&bytes).unwrap_or_else(|e| panic!("{case}: {e}"))
}

fn ops(graph: &Graph) -> Vec<&Op> {
    graph.nodes.iter().map(|n| &n.op).collect()
}

#[test]
fn every_vector_imports_into_a_consistent_graph() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut count = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("model.onnx").is_file() {
            continue;
        }
        count += 1;
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        let imported = vector(&case);
        let g = &imported.graph;
        let mut names = HashSet::new();
        for node in &g.nodes {
            assert!(!node.name.is_empty(), "{case}: unnamed node");
            assert!(
                names.insert(&node.name),
                "{case}: duplicate node name {}",
                node.name
            );
        }
        assert_eq!(imported.weights.len(), g.params.len(), "{case}");
        for p in &g.params {
            assert_eq!(
                imported.weights[&p.name].shape(),
                &p.shape[..],
                "{case}: {}",
                p.name
            );
            assert!(
                g.nodes.iter().any(|n| n.inputs.contains(&p.name)),
                "{case}: param {} is read by no node",
                p.name
            );
        }
        assert_eq!(
            Graph::from_json(&g.to_json()).unwrap(),
            *g,
            "{case}: JSON round trip"
        );
    }
    assert!(count > 0, "no vectors found");
}

#[test]
fn batchnorm_folds_into_conv_and_gemm() {
    for case in [
        "conv_bn_folded",
        "conv_no_bias_bn_folded_opset9",
        "bn_opset7",
    ] {
        let g = vector(case).graph;
        assert!(
            matches!(ops(&g)[..], [Op::Conv(_)]),
            "{case}: {:?}",
            ops(&g)
        );
        assert_eq!(g.nodes[0].inputs.len(), 3, "{case}: folded conv has a bias");
        assert_eq!(g.nodes[0].outputs, ["y"]);
        assert_eq!(g.params.len(), 2, "{case}: {:?}", g.params);
    }
    let g = vector("gemm_bn_folded").graph;
    assert!(
        matches!(ops(&g)[..], [Op::Gemm { beta, trans_b: true, .. }] if *beta == 1.0),
        "{:?}",
        ops(&g)
    );
}

#[test]
fn batchnorm_that_cannot_fold_is_a_per_channel_mul_add() {
    let g = vector("bn_standalone").graph;
    assert!(matches!(ops(&g)[..], [Op::Mul, Op::Add]), "{:?}", ops(&g));
    for p in &g.params {
        assert_eq!(p.shape, [3, 1, 1]);
    }
    let g = vector("bn_after_shared_conv").graph;
    assert!(
        matches!(ops(&g)[..], [Op::Conv(_), Op::Mul, Op::Add, Op::Add]),
        "{:?}",
        ops(&g)
    );
}

#[test]
fn the_small_cnn_keeps_its_layer_names() {
    for (case, batch) in [("chain_batch1", None), ("chain_batch3", None)] {
        let imported = vector(case);
        let g = &imported.graph;
        let names: Vec<&str> = g.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            ["conv1", "relu1", "pool1", "flatten", "fc", "softmax"],
            "{case}"
        );
        assert_eq!(g.inputs.len(), 1);
        assert_eq!(g.inputs[0].name, "image");
        assert_eq!(g.inputs[0].shape, [batch, Some(3), Some(8), Some(8)]);
        assert_eq!(g.outputs, ["probs"]);
        assert_eq!(imported.opset, 13);
        assert_eq!(g.param_count(), 4 * 3 * 9 + 4 + 5 * 64 + 5);
    }
}

#[test]
fn identities_dropouts_and_constants_disappear() {
    let g = vector("identity_chain").graph;
    assert!(matches!(ops(&g)[..], [Op::Tanh]), "{:?}", ops(&g));
    assert_eq!(g.nodes[0].inputs, ["x"]);
    assert_eq!(g.nodes[0].outputs, ["y"]);

    let g = vector("dropout_opset13").graph;
    assert!(matches!(ops(&g)[..], [Op::Relu]), "{:?}", ops(&g));
    assert!(g.params.is_empty(), "the ratio is not a param");

    let g = vector("constant_nodes").graph;
    assert_eq!(
        ops(&g),
        [
            &Op::Reshape {
                shape: vec![0, 2, 3],
                allowzero: false
            },
            &Op::Clip {
                min: -0.25,
                max: f32::MAX
            },
            &Op::Add
        ]
    );
    assert_eq!(g.params.len(), 1, "only the Add's operand is a param");

    let g = vector("gemm_initializers_as_inputs").graph;
    assert_eq!(
        g.inputs.len(),
        1,
        "initializers listed as inputs are weights"
    );
}

#[test]
fn auto_pad_becomes_explicit_pads() {
    let pads = |case: &str| match &vector(case).graph.nodes[0].op {
        Op::Conv(a) => a.pads,
        Op::MaxPool(p) => p.pads,
        other => panic!("{other:?}"),
    };
    // 7x8 input, 3x3 kernel, stride 2: totals 2 (height) and 1 (width).
    assert_eq!(pads("conv_auto_pad_same_upper"), [1, 0, 1, 1]);
    assert_eq!(pads("conv_auto_pad_same_lower"), [1, 1, 1, 0]);
    assert_eq!(pads("conv_auto_pad_same_stride1"), [1, 1, 1, 1]);
    assert_eq!(pads("conv_auto_pad_valid"), [0, 0, 0, 0]);
    assert_eq!(pads("maxpool_same_upper"), [1, 1, 1, 1]);
}

#[test]
fn old_softmax_maps_to_opset13_semantics() {
    let g = vector("softmax_opset11_2d").graph;
    assert_eq!(ops(&g), [&Op::Softmax { axis: 1 }]);
    let g = vector("softmax_opset11_flattening").graph;
    assert_eq!(
        ops(&g),
        [
            &Op::Flatten { axis: 1 },
            &Op::Softmax { axis: -1 },
            &Op::Reshape {
                shape: vec![-1, 3, 4],
                allowzero: false
            }
        ]
    );
}
