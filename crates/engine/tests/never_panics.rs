//! Any op, any attributes, any operand shapes: `Plan::new` and `Plan::run`
//! return a value or an error, and never panic.

use std::collections::HashMap;

use capsule_engine::{
    Activation, ConvAttrs, Error, Graph, Node, Op, Plan, PoolAttrs, Tensor, ValueInfo,
};
use proptest::prelude::*;

/// Mostly `1..max`, sometimes an invalid 0.
fn positive(max: usize) -> impl Strategy<Value = usize> {
    prop_oneof![9 => 1..max, 1 => Just(0)]
}

fn pool_attrs() -> impl Strategy<Value = PoolAttrs> {
    (
        [positive(4), positive(4)],
        [positive(3), positive(3)],
        [0usize..3, 0..3, 0..3, 0..3],
        [positive(3), positive(3)],
        any::<bool>(),
    )
        .prop_map(|(kernel, strides, pads, dilations, ceil_mode)| PoolAttrs {
            kernel,
            strides,
            pads,
            dilations,
            ceil_mode,
        })
}

fn any_op() -> impl Strategy<Value = Op> {
    let conv = (
        pool_attrs(),
        positive(4),
        prop_oneof![
            Just(Activation::None),
            Just(Activation::Relu),
            Just(Activation::Clip { min: 0.0, max: 6.0 })
        ],
    )
        .prop_map(|(p, group, activation)| {
            Op::Conv(ConvAttrs {
                kernel: p.kernel,
                strides: p.strides,
                pads: p.pads,
                dilations: p.dilations,
                group,
                activation,
            })
        });
    prop_oneof![
        conv,
        (any::<bool>(), any::<bool>(), -2.0f32..2.0, -2.0f32..2.0).prop_map(
            |(trans_a, trans_b, alpha, beta)| Op::Gemm {
                alpha,
                beta,
                trans_a,
                trans_b
            }
        ),
        Just(Op::MatMul),
        Just(Op::Relu),
        (-3.0f32..3.0, -3.0f32..3.0).prop_map(|(min, max)| Op::Clip { min, max }),
        Just(Op::Sigmoid),
        Just(Op::Tanh),
        pool_attrs().prop_map(Op::MaxPool),
        (pool_attrs(), any::<bool>()).prop_map(|(pool, count_include_pad)| Op::AveragePool {
            pool,
            count_include_pad
        }),
        Just(Op::GlobalAveragePool),
        Just(Op::Add),
        Just(Op::Sub),
        Just(Op::Mul),
        Just(Op::Div),
        (-5i64..5).prop_map(|axis| Op::Concat { axis }),
        (-5i64..6).prop_map(|axis| Op::Flatten { axis }),
        (prop::collection::vec(-2i64..6, 0..5), any::<bool>())
            .prop_map(|(shape, allowzero)| Op::Reshape { shape, allowzero }),
        (-5i64..5).prop_map(|axis| Op::Softmax { axis }),
        Just(Op::Identity),
    ]
}

/// Shapes that are often, but not always, alike: mostly a shared base
/// shape with some dimensions changed, sometimes anything.
fn shapes(count: usize) -> impl Strategy<Value = Vec<Vec<usize>>> {
    let base = prop::collection::vec(0usize..5, 0..5);
    (
        base,
        prop::collection::vec(
            (
                any::<bool>(),
                prop::collection::vec(0usize..5, 0..5),
                any::<prop::sample::Index>(),
                0usize..5,
            ),
            count,
        ),
    )
        .prop_map(|(base, variants)| {
            variants
                .into_iter()
                .map(|(free, other, at, dim)| {
                    if free {
                        other
                    } else {
                        let mut s = base.clone();
                        if !s.is_empty() {
                            s[at.index(base.len())] = dim;
                        }
                        s
                    }
                })
                .collect()
        })
}

/// How many inputs `op` takes, or sometimes any number.
fn input_count(op: &Op) -> BoxedStrategy<usize> {
    let valid = match op {
        Op::Conv(_) | Op::Gemm { .. } => (2usize..4).boxed(),
        Op::MatMul | Op::Add | Op::Sub | Op::Mul | Op::Div => Just(2).boxed(),
        Op::Concat { .. } => (1usize..4).boxed(),
        _ => Just(1).boxed(),
    };
    prop_oneof![9 => valid, 1 => 0usize..5].boxed()
}

fn case() -> impl Strategy<Value = (Op, Vec<Vec<usize>>)> {
    any_op()
        .prop_flat_map(|op| (Just(op.clone()), input_count(&op)))
        .prop_flat_map(|(op, count)| (Just(op), shapes(count)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_node_on_any_operands_returns(case in case()) {
        let (op, shapes) = case;
        let names: Vec<String> = (0..shapes.len()).map(|i| format!("in{i}")).collect();
        let graph = Graph {
            inputs: names
                .iter()
                .zip(&shapes)
                .map(|(name, s)| ValueInfo { name: name.clone(), shape: vec![None; s.len()] })
                .collect(),
            params: vec![],
            nodes: vec![Node {
                name: "node".into(),
                op,
                inputs: names.clone(),
                outputs: vec!["out".into()],
            }],
            outputs: vec!["out".into()],
        };
        let plan = match Plan::new(graph) {
            Ok(plan) => plan,
            Err(Error::InvalidGraph { .. }) => return Ok(()),
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        let inputs: Vec<Tensor> = shapes
            .iter()
            .map(|s| {
                let n = s.iter().product();
                Tensor::new(s.clone(), (0..n).map(|i| i as f32 - 3.0).collect()).unwrap()
            })
            .collect();
        match plan.run(&inputs, &mut HashMap::new()) {
            Ok(out) => {
                prop_assert_eq!(out.len(), 1);
                prop_assert_eq!(out[0].len(), out[0].shape().iter().product::<usize>());
            }
            Err(Error::ShapeMismatch { context, .. }) => {
                prop_assert!(context.ends_with("node 'node'"), "{}", context);
            }
            Err(other) => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }
}
