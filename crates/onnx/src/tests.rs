//! Unit tests of [`crate::import`] on hand-built models: error paths,
//! naming, pruning, and the numerics of BatchNormalization folding.

use super::*;
use crate::proto::build::*;
use crate::proto::{AttributeProto, TensorProto};
use capsule_engine::{ConvAttrs, Op};

fn relu_model(op: &str, name: &str) -> Vec<u8> {
    model(
        13,
        vec![value("x", &[None, Some(4)])],
        vec![],
        vec![node(op, name, &["x"], &["y"])],
        &["y"],
    )
}

#[test]
fn unknown_op_names_the_op_and_the_node() {
    let err = import(&relu_model("LSTM", "lstm_1")).unwrap_err();
    assert_eq!(
        err,
        Error::UnsupportedOp {
            op: "LSTM".into(),
            node: "lstm_1".into()
        }
    );
    assert!(
        err.to_string()
            .starts_with("unsupported ONNX operator 'LSTM' in node 'lstm_1'"),
        "{err}"
    );
    // An unnamed node is named after its op type and index.
    let err = import(&relu_model("Gru", "")).unwrap_err();
    assert_eq!(
        err,
        Error::UnsupportedOp {
            op: "Gru".into(),
            node: "Gru_0".into()
        }
    );
}

#[test]
fn custom_domains_and_opsets_are_rejected() {
    let mut m = ModelProto::decode(&relu_model("FusedConv", "f")[..]).unwrap();
    m.graph.as_mut().unwrap().node[0].domain = Some("com.microsoft".into());
    let err = import(&m.encode_to_vec()).unwrap_err();
    assert!(
        matches!(err, Error::UnsupportedDomain { ref domain, .. } if domain == "com.microsoft")
    );
    assert!(err.to_string().contains("'com.microsoft'"), "{err}");

    for opset in [6, 22] {
        let mut m = ModelProto::decode(&relu_model("Relu", "r")[..]).unwrap();
        m.opset_import[0].version = Some(opset);
        let err = import(&m.encode_to_vec()).unwrap_err();
        assert_eq!(
            err,
            Error::UnsupportedOpset {
                domain: String::new(),
                version: opset
            }
        );
        assert!(err.to_string().contains("re-export"), "{err}");
    }
    let mut m = ModelProto::decode(&relu_model("Relu", "r")[..]).unwrap();
    m.opset_import.clear();
    assert!(matches!(
        import(&m.encode_to_vec()),
        Err(Error::InvalidModel { .. })
    ));
}

#[test]
fn non_onnx_bytes_are_not_onnx() {
    let err = import(b"\x89PNG\r\n\x1a\n not a model").unwrap_err();
    assert!(matches!(err, Error::NotOnnx { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("not an ONNX model (protobuf decoding failed:"),
        "{err}"
    );
    // The empty message decodes, but holds no graph.
    assert!(matches!(import(b""), Err(Error::NotOnnx { .. })));
    let empty_graph = model(13, vec![], vec![], vec![], &["y"]);
    assert!(matches!(
        import(&empty_graph),
        Err(Error::InvalidModel { .. })
    ));
}

#[test]
fn only_float_inputs_and_data_are_supported() {
    let mut m = ModelProto::decode(&relu_model("Relu", "r")[..]).unwrap();
    let graph = m.graph.as_mut().unwrap();
    let Some(type_proto::Value::TensorType(t)) =
        graph.input[0].r#type.as_mut().unwrap().value.as_mut()
    else {
        unreachable!()
    };
    t.elem_type = Some(data_type::INT64);
    assert_eq!(
        import(&m.encode_to_vec()).unwrap_err(),
        Error::UnsupportedDataType {
            value: "x".into(),
            data_type: "int64".into()
        }
    );
    let bytes = model(
        13,
        vec![value("x", &[Some(2)])],
        vec![ints("k", vec![1, 2])],
        vec![node("Add", "add", &["x", "k"], &["y"])],
        &["y"],
    );
    assert!(matches!(
        import(&bytes),
        Err(Error::UnsupportedDataType { ref value, .. }) if value == "k"
    ));
}

#[test]
fn unsupported_uses_of_supported_ops_say_why() {
    // A Dropout whose mask is read.
    let bytes = model(
        13,
        vec![value("x", &[None, Some(4)])],
        vec![],
        vec![
            node("Dropout", "drop", &["x"], &["d", "mask"]),
            node("Relu", "r", &["mask"], &["y"]),
        ],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnsupportedNode { ref node, .. } if node == "drop"));
    assert!(err.to_string().contains("'mask'"), "{err}");

    // A Reshape whose shape is computed.
    let bytes = model(
        13,
        vec![value("x", &[Some(2), Some(2)]), value("s", &[Some(2)])],
        vec![],
        vec![
            node("Relu", "r", &["s"], &["shape"]),
            node("Reshape", "reshape", &["x", "shape"], &["y"]),
        ],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(err.to_string().contains("computed at run time"), "{err}");

    // A Pad that adds cells.
    let mut pad = node("Pad", "pad", &["x"], &["y"]);
    pad.attribute = vec![ints_attr("pads", &[0, 0, 1, 1, 0, 0, 1, 1])];
    let bytes = model(
        7,
        vec![value("x", &[Some(1), Some(2), Some(3), Some(3)])],
        vec![],
        vec![pad],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnsupportedNode { ref node, .. } if node == "pad"));
    assert!(
        err.to_string().contains("[0, 0, 1, 1, 0, 0, 1, 1]"),
        "{err}"
    );

    // A ReduceMean over channels.
    let mut mean = node("ReduceMean", "mean", &["x"], &["y"]);
    mean.attribute = vec![ints_attr("axes", &[1])];
    let bytes = model(
        13,
        vec![value("x", &[Some(1), Some(2), Some(3), Some(3)])],
        vec![],
        vec![mean],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnsupportedNode { ref node, .. } if node == "mean"));
    assert!(err.to_string().contains("axes [1]"), "{err}");

    // A 1-D convolution.
    let bytes = model(
        13,
        vec![value("x", &[None, Some(2), Some(5)])],
        vec![floats("w", &[3, 2, 3], vec![0.0; 18])],
        vec![node("Conv", "conv1d", &["x", "w"], &["y"])],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(matches!(err, Error::UnsupportedNode { ref node, .. } if node == "conv1d"));

    // SAME padding with stride 2 over an unknown height.
    let mut conv = node("Conv", "same", &["x", "w"], &["y"]);
    conv.attribute = vec![
        string_attr("auto_pad", "SAME_UPPER"),
        ints_attr("strides", &[2, 2]),
    ];
    let bytes = model(
        13,
        vec![value("x", &[Some(1), Some(2), None, Some(5)])],
        vec![floats("w", &[3, 2, 3, 3], vec![0.0; 54])],
        vec![conv],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(err.to_string().contains("height"), "{err}");

    // Pre-13 Softmax over axis 1 of [N, M, 4]: not expressible.
    let mut softmax = node("Softmax", "sm", &["x"], &["y"]);
    softmax.attribute = vec![int_attr("axis", 1)];
    let bytes = model(
        11,
        vec![value("x", &[None, None, Some(4)])],
        vec![],
        vec![softmax],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(err.to_string().contains("opset 13"), "{err}");
}

#[test]
fn names_are_unique_and_stable() {
    let bytes = model(
        13,
        vec![value("x", &[None, Some(4)])],
        vec![],
        vec![
            node("Relu", "", &["x"], &["a"]),
            node("Sigmoid", "Relu_0", &["a"], &["b"]),
            node("Tanh", "Relu_0", &["b"], &["y"]),
        ],
        &["y"],
    );
    let imported = import(&bytes).unwrap();
    let names: Vec<&str> = imported
        .graph
        .nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect();
    assert_eq!(names, ["Relu_0_1", "Relu_0", "Tanh_2"]);
}

#[test]
fn identities_are_removed_unless_they_return_an_input() {
    let bytes = model(
        13,
        vec![value("x", &[None, Some(4)])],
        vec![],
        vec![
            node("Identity", "i0", &["x"], &["a"]),
            node("Relu", "r", &["a"], &["b"]),
            node("Identity", "i1", &["b"], &["y"]),
            node("Identity", "i2", &["x"], &["z"]),
        ],
        &["y", "z"],
    );
    let g = import(&bytes).unwrap().graph;
    assert_eq!(g.nodes.len(), 2);
    assert_eq!(g.nodes[0].op, Op::Relu);
    assert_eq!(g.nodes[0].inputs, ["x"]);
    assert_eq!(g.nodes[0].outputs, ["y"]);
    assert_eq!(g.nodes[1].op, Op::Identity);
    assert_eq!(g.outputs, ["y", "z"]);
}

/// Naive NCHW convolution in f64, the reference for folding checks.
fn conv_reference(
    x: &[f32],
    xs: [usize; 4],
    w: &[f32],
    ws: [usize; 4],
    b: Option<&[f32]>,
    a: &ConvAttrs,
) -> Vec<f64> {
    let [n, c, h, wd] = xs;
    let [m, cg, kh, kw] = ws;
    let oh = (h + a.pads[0] + a.pads[2] - (a.dilations[0] * (kh - 1) + 1)) / a.strides[0] + 1;
    let ow = (wd + a.pads[1] + a.pads[3] - (a.dilations[1] * (kw - 1) + 1)) / a.strides[1] + 1;
    let mut out = vec![0.0; n * m * oh * ow];
    let per_group = m / a.group;
    for b_ in 0..n {
        for o in 0..m {
            let g = o / per_group;
            for y in 0..oh {
                for x_ in 0..ow {
                    let mut acc = b.map_or(0.0, |b| f64::from(b[o]));
                    for ci in 0..cg {
                        let ch = g * cg + ci;
                        for i in 0..kh {
                            for j in 0..kw {
                                let iy = (y * a.strides[0] + i * a.dilations[0]) as isize
                                    - a.pads[0] as isize;
                                let ix = (x_ * a.strides[1] + j * a.dilations[1]) as isize
                                    - a.pads[1] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((b_ * c + ch) * h + iy as usize) * wd + ix as usize];
                                let wv = w[((o * cg + ci) * kh + i) * kw + j];
                                acc += f64::from(xv) * f64::from(wv);
                            }
                        }
                    }
                    out[((b_ * m + o) * oh + y) * ow + x_] = acc;
                }
            }
        }
    }
    out
}

fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn batchnorm_inputs(c: usize) -> Vec<TensorProto> {
    let gamma: Vec<f32> = pseudo_random(c, 1).iter().map(|v| 1.0 + 0.5 * v).collect();
    let var: Vec<f32> = pseudo_random(c, 4).iter().map(|v| 1.2 + v).collect();
    vec![
        floats("gamma", &[c as i64], gamma),
        floats("beta", &[c as i64], pseudo_random(c, 2)),
        floats("mean", &[c as i64], pseudo_random(c, 3)),
        floats("var", &[c as i64], var),
    ]
}

fn bn_reference(y: &mut [f64], c: usize, spatial: usize, init: &[TensorProto], eps: f64) {
    let p = |i: usize| {
        init[i]
            .float_data
            .iter()
            .map(|&v| f64::from(v))
            .collect::<Vec<_>>()
    };
    let (gamma, beta, mean, var) = (p(0), p(1), p(2), p(3));
    for (i, v) in y.iter_mut().enumerate() {
        let ch = (i / spatial) % c;
        *v = (*v - mean[ch]) / (var[ch] + eps).sqrt() * gamma[ch] + beta[ch];
    }
}

#[test]
fn batchnorm_after_conv_folds_exactly() {
    for with_bias in [true, false] {
        let (xs, ws) = ([2, 4, 5, 5], [6, 2, 3, 3]);
        let w = pseudo_random(6 * 2 * 9, 9);
        let bias = pseudo_random(6, 10);
        let mut init = batchnorm_inputs(6);
        init.push(floats("w", &[6, 2, 3, 3], w.clone()));
        let mut conv_inputs = vec!["x", "w"];
        if with_bias {
            init.push(floats("b", &[6], bias.clone()));
            conv_inputs.push("b");
        }
        let mut conv = node("Conv", "conv", &conv_inputs, &["c"]);
        conv.attribute = vec![
            int_attr("group", 2),
            ints_attr("strides", &[2, 1]),
            ints_attr("pads", &[1, 0, 1, 2]),
        ];
        let bn = node(
            "BatchNormalization",
            "bn",
            &["c", "gamma", "beta", "mean", "var"],
            &["y"],
        );
        let bytes = model(
            13,
            vec![value("x", &[None, Some(4), Some(5), Some(5)])],
            init.clone(),
            vec![conv, bn],
            &["y"],
        );
        let imported = import(&bytes).unwrap();
        let g = &imported.graph;
        assert_eq!(g.nodes.len(), 1, "BN folded away: {:?}", g.nodes);
        let Op::Conv(attrs) = &g.nodes[0].op else {
            panic!("a Conv remains")
        };
        assert_eq!(g.nodes[0].outputs, ["y"]);
        assert_eq!(g.nodes[0].inputs.len(), 3, "a bias is added when missing");
        assert_eq!(g.params.len(), 2, "BN params are dropped: {:?}", g.params);

        let x = pseudo_random(xs.iter().product(), 11);
        let mut want = conv_reference(&x, xs, &w, ws, with_bias.then_some(&bias[..]), attrs);
        let spatial = want.len() / (2 * 6);
        bn_reference(&mut want, 6, spatial, &init, 1e-5);
        let fw = imported.weights[&g.nodes[0].inputs[1]].data();
        let fb = imported.weights[&g.nodes[0].inputs[2]].data();
        let got = conv_reference(&x, xs, fw, ws, Some(fb), attrs);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}

#[test]
fn batchnorm_after_gemm_folds_exactly() {
    for (trans_b, c_dims) in [(true, vec![4]), (false, vec![1, 4]), (true, vec![3, 1])] {
        let (k, m, n) = (5usize, 4usize, 3usize);
        let b = pseudo_random(k * m, 21);
        let c_len: i64 = c_dims.iter().product();
        let c = pseudo_random(c_len as usize, 22);
        let mut init = batchnorm_inputs(m);
        let b_dims = if trans_b {
            [m as i64, k as i64]
        } else {
            [k as i64, m as i64]
        };
        init.push(floats("B", &b_dims, b.clone()));
        init.push(floats("C", &c_dims, c.clone()));
        let mut gemm = node("Gemm", "fc", &["a", "B", "C"], &["h"]);
        gemm.attribute = vec![int_attr("transB", i64::from(trans_b))];
        gemm.attribute.push(AttributeProto {
            name: Some("beta".into()),
            r#type: Some(proto::AttributeType::Float as i32),
            f: Some(0.5),
            ..Default::default()
        });
        let bn = node(
            "BatchNormalization",
            "bn",
            &["h", "gamma", "beta", "mean", "var"],
            &["y"],
        );
        let bytes = model(
            15,
            vec![value("a", &[None, Some(5)])],
            init.clone(),
            vec![gemm, bn],
            &["y"],
        );
        let imported = import(&bytes).unwrap();
        let g = &imported.graph;
        assert_eq!(g.nodes.len(), 1, "{:?}", g.nodes);
        let Op::Gemm { alpha, beta, .. } = g.nodes[0].op else {
            panic!("a Gemm remains")
        };
        let a = pseudo_random(n * k, 23);
        let gemm_ref = |bm: &[f32], cm: &[f32], c_shape: &[usize], beta: f64| {
            let mut out = vec![0.0f64; n * m];
            for i in 0..n {
                for j in 0..m {
                    let mut acc = 0.0;
                    for l in 0..k {
                        let bv = if trans_b {
                            bm[j * k + l]
                        } else {
                            bm[l * m + j]
                        };
                        acc += f64::from(a[i * k + l]) * f64::from(bv);
                    }
                    let cv = match *c_shape {
                        [] => cm[0],
                        [len] => cm[if len == 1 { 0 } else { j }],
                        [r, cols] => {
                            cm[if r == 1 { 0 } else { i } * cols + if cols == 1 { 0 } else { j }]
                        }
                        _ => unreachable!(),
                    };
                    out[i * m + j] = f64::from(alpha) * acc + beta * f64::from(cv);
                }
            }
            out
        };
        let c_shape: Vec<usize> = c_dims.iter().map(|&d| d as usize).collect();
        let mut want = gemm_ref(&b, &c, &c_shape, 0.5);
        bn_reference(&mut want, m, 1, &init, 1e-5);
        let fc = &imported.weights[&g.nodes[0].inputs[2]];
        let got = gemm_ref(
            imported.weights[&g.nodes[0].inputs[1]].data(),
            fc.data(),
            fc.shape(),
            f64::from(beta),
        );
        for (x, y) in got.iter().zip(&want) {
            assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
}

#[test]
fn batchnorm_that_cannot_fold_becomes_mul_add_and_shared_weights_are_copied() {
    let mut init = batchnorm_inputs(3);
    init.push(floats("w", &[3, 3, 1, 1], pseudo_random(9, 5)));
    let bytes = model(
        13,
        vec![value("x", &[None, Some(3), Some(2), Some(2)])],
        init,
        vec![
            node("Conv", "c1", &["x", "w"], &["a"]),
            node(
                "BatchNormalization",
                "bn1",
                &["a", "gamma", "beta", "mean", "var"],
                &["b"],
            ),
            node("Conv", "c2", &["b", "w"], &["c"]),
            node(
                "BatchNormalization",
                "bn2",
                &["c", "gamma", "beta", "mean", "var"],
                &["d"],
            ),
            node("Add", "sum", &["d", "c"], &["y"]),
        ],
        &["y"],
    );
    let imported = import(&bytes).unwrap();
    let g = &imported.graph;
    let ops: Vec<(&str, &Op)> = g.nodes.iter().map(|n| (n.name.as_str(), &n.op)).collect();
    // bn1 folds into c1 (which then needs its own copy of the shared w);
    // bn2 cannot fold since c's output is also read by "sum".
    assert_eq!(ops.len(), 5, "{ops:?}");
    assert_eq!(ops[0].0, "c1");
    assert_eq!(ops[2], ("bn2.mul", &Op::Mul));
    assert_eq!(ops[3], ("bn2", &Op::Add));
    assert_ne!(g.nodes[0].inputs[1], "w", "c1 reads a folded copy");
    assert_eq!(g.nodes[1].inputs[1], "w", "c2 still reads the original");
    let scale = g.params.iter().find(|p| p.name == "bn2.scale").unwrap();
    assert_eq!(scale.shape, [3, 1, 1]);
    for p in &g.params {
        assert_eq!(imported.weights[&p.name].shape(), &p.shape[..]);
    }
    assert_eq!(imported.weights.len(), g.params.len());
}

#[test]
fn generated_constants_are_bounded() {
    let mut fill = node("ConstantOfShape", "huge", &["shape"], &["k"]);
    fill.attribute = vec![];
    let bytes = model(
        13,
        vec![value("x", &[Some(1)])],
        vec![ints("shape", vec![1 << 20, 1 << 20])],
        vec![fill, node("Add", "add", &["x", "k"], &["y"])],
        &["y"],
    );
    let err = import(&bytes).unwrap_err();
    assert!(err.to_string().contains("too large"), "{err}");
}
