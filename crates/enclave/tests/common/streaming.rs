//! A two-layer dense model streamed query after query and checked against the plain
//! engine, for the test binaries that each fix the process-wide thread setup.

use std::collections::HashMap;

use capsule_engine::{Graph, Model, Node, Op, ParamInfo, Tensor, ValueInfo, set_threads};
use capsule_format::{Capsule, Policy};

use super::{SealedCapsule, bits, seal_model};

pub fn ramp(shape: &[usize], seed: usize) -> Tensor {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .map(|i| ((i * 7 + seed * 13) % 29) as f32 / 14.0 - 1.0)
        .collect();
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// x [?, 300] -> Gemm(fc [400, 300], fc.b) -> Relu -> Gemm(out [10, 400]): `fc` is
/// 480 KB, above what a one-thread query wipes on its own thread.
pub fn two_dense_layers() -> (Graph, HashMap<String, Tensor>) {
    let gemm = Op::Gemm {
        alpha: 1.0,
        beta: 1.0,
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
            shape: vec![None, Some(300)],
        }],
        params: vec![
            param("fc", &[400, 300]),
            param("fc.b", &[400]),
            param("out", &[10, 400]),
        ],
        nodes: vec![
            node("fc", gemm.clone(), &["x", "fc", "fc.b"], "h"),
            node("relu", Op::Relu, &["h"], "r"),
            node("out", gemm, &["r", "out"], "y"),
        ],
        outputs: vec!["y".into()],
    };
    let weights = graph
        .params
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.clone(), ramp(&p.shape, i)))
        .collect();
    (graph, weights)
}

/// Runs [`two_dense_layers`] streamed at each of `threads` engine threads, query after
/// query (each opens into the buffers the previous one wiped), and checks every output
/// against the plain engine's, bit for bit.
pub fn streaming_matches_plain_query_after_query(threads: &[usize]) {
    let (graph, weights) = two_dense_layers();
    let plain = Model::new(graph.clone(), weights.clone()).unwrap();
    for chunk_size in [1000, capsule_format::DEFAULT_CHUNK_SIZE] {
        let SealedCapsule { bytes, key } =
            seal_model(&graph, &weights, Policy::default(), chunk_size);
        let capsule = Capsule::parse(&bytes).unwrap();
        for &threads in threads {
            set_threads(threads);
            let mut streaming =
                capsule_enclave::StreamingModel::open(&capsule, &key, None).unwrap();
            for (batch, seed) in [(1, 1), (1, 2), (9, 3), (1, 4), (9, 5)] {
                let x = ramp(&[batch, 300], seed);
                let want = plain.run(std::slice::from_ref(&x)).unwrap();
                let got = streaming.run(std::slice::from_ref(&x)).unwrap();
                assert_eq!(
                    bits(&got[0]),
                    bits(&want[0]),
                    "chunk {chunk_size}, {threads} threads, batch {batch}"
                );
            }
        }
    }
}

/// Streams [`two_dense_layers`] at each of `threads` engine threads from a capsule
/// whose layer `fc` has two chunks tampered with, far apart (in 1000-byte chunks: in
/// different runs of chunks, whichever threads open them): every query fails naming
/// the first, and a model opened from the intact capsule then gives the plain bits.
pub fn a_tampered_chunk_is_named_query_after_query(threads: &[usize]) {
    let (graph, weights) = two_dense_layers();
    let plain = Model::new(graph.clone(), weights.clone()).unwrap();
    let chunk_size = 1000;
    let SealedCapsule { bytes, key } = seal_model(&graph, &weights, Policy::default(), chunk_size);
    let capsule = Capsule::parse(&bytes).unwrap();
    let layer = (capsule.header().layers.iter())
        .position(|l| l.name == "fc")
        .expect("fc has a layer");
    assert!(capsule.header().chunk_count(layer) > 400);
    let start = capsule.sealed_layer(layer).as_ptr() as usize - bytes.as_ptr() as usize;
    let mut tampered = bytes.clone();
    for chunk in [130, 300] {
        tampered[start + chunk * (chunk_size as usize + capsule_format::TAG_LEN) + 7] ^= 0x10;
    }
    let bad = Capsule::parse(&tampered).unwrap();
    for &threads in threads {
        set_threads(threads);
        let mut streaming = capsule_enclave::StreamingModel::open(&bad, &key, None).unwrap();
        for seed in 1..=3 {
            let err = streaming.run(&[ramp(&[1, 300], seed)]).unwrap_err();
            match err {
                capsule_enclave::Error::Format(capsule_format::Error::ChunkFailed {
                    layer,
                    chunk,
                }) => assert_eq!((layer.as_str(), chunk), ("fc", 130), "{threads} threads"),
                other => panic!("{threads} threads: {other:?}"),
            }
        }
        let mut good = capsule_enclave::StreamingModel::open(&capsule, &key, None).unwrap();
        let x = ramp(&[1, 300], 4);
        let want = plain.run(std::slice::from_ref(&x)).unwrap();
        let got = good.run(std::slice::from_ref(&x)).unwrap();
        assert_eq!(bits(&got[0]), bits(&want[0]), "{threads} threads");
    }
}
