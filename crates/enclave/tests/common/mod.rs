//! Fixtures shared by the enclave's integration tests: the bundled MNIST
//! model sealed into a capsule, a test provisioning server's signing key,
//! and helpers that provision an enclave process the way the server would.

#![allow(dead_code)]

pub mod streaming;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::Ed25519KeyPair;
use capsule_enclave::{EnclaveProcess, Status};
use capsule_engine::{Graph, Tensor};
use capsule_format::{Grant, ModelKey, Policy, SealRequest, TopUp, seal_grant, server_public_key};

/// The enclave binary built with these tests (examples, which Cargo does
/// not tell, use `$MLCAPSULE_ENCLAVE` or the one in the target directory).
pub fn enclave_bin() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_mlcapsule-enclave") {
        return PathBuf::from(path);
    }
    if let Some(path) = std::env::var_os(capsule_enclave::ENCLAVE_ENV) {
        return PathBuf::from(path);
    }
    // target/<profile>/examples/<example> -> target/<profile>/mlcapsule-enclave
    let exe = std::env::current_exe().expect("the running executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("an executable in target/<profile>/examples")
        .join("mlcapsule-enclave")
}

/// The bundled MNIST CNN's ONNX file.
pub fn mnist_onnx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/mnist-cnn.onnx")
}

/// A sealed capsule and its model key.
pub struct SealedCapsule {
    pub bytes: Vec<u8>,
    pub key: ModelKey,
}

/// Seals the bundled MNIST model, one layer per node that first reads a
/// weight (as `mlcapsule seal` does), in small chunks so that layers span
/// several chunks.
pub fn mnist_capsule(policy: Policy) -> SealedCapsule {
    mnist_capsule_in_chunks(policy, 4096)
}

/// [`mnist_capsule`] with another chunk size.
pub fn mnist_capsule_in_chunks(policy: Policy, chunk_size: u32) -> SealedCapsule {
    let onnx = std::fs::read(mnist_onnx()).expect("the bundled MNIST model");
    let imported = capsule_onnx::import(&onnx).expect("MNIST imports");
    seal_model(&imported.graph, &imported.weights, policy, chunk_size)
}

/// Seals `graph` and its `weights` as `mlcapsule seal` does, under a new key.
pub fn seal_model(
    graph: &Graph,
    weights: &HashMap<String, Tensor>,
    policy: Policy,
    chunk_size: u32,
) -> SealedCapsule {
    let request = SealRequest {
        architecture: serde_json::to_value(graph).unwrap(),
        preprocessing: None,
        labels: None,
        detector: None,
        policy,
        chunk_size,
        aead: capsule_format::Aead::SEAL_DEFAULT,
        layers: capsule_enclave::seal_layers(graph, weights, ""),
    };
    let key = ModelKey::generate();
    let bytes = capsule_format::seal(
        &request,
        &key,
        capsule_format::new_capsule_id(),
        &mut |_| {},
    )
    .unwrap();
    SealedCapsule { bytes, key }
}

/// The bundled MNIST model sealed with a defense policy (its JSON form, spec/policy.md §5)
/// and, if given, an input detector network in front of it (capsule-v1 §4.6), which sees
/// the model's input unchanged.
pub fn defended_capsule(
    defense: serde_json::Value,
    detector: Option<&(Graph, HashMap<String, Tensor>)>,
) -> SealedCapsule {
    let onnx = std::fs::read(mnist_onnx()).expect("the bundled MNIST model");
    let imported = capsule_onnx::import(&onnx).expect("MNIST imports");
    let mut all = Vec::new();
    if let Some((graph, weights)) = detector {
        all = capsule_enclave::seal_layers(graph, weights, capsule_format::DETECTOR_PREFIX);
    }
    all.extend(capsule_enclave::seal_layers(
        &imported.graph,
        &imported.weights,
        "",
    ));
    let request = SealRequest {
        architecture: serde_json::to_value(&imported.graph).unwrap(),
        preprocessing: None,
        labels: None,
        detector: detector.map(|(graph, _)| capsule_format::Detector {
            architecture: serde_json::to_value(graph).unwrap(),
            input: capsule_format::DetectorInput::IDENTITY,
        }),
        policy: Policy {
            defense: Some(defense),
            ..Policy::default()
        },
        chunk_size: 4096,
        // The capsules a provider sealed before AEGIS was the default still run:
        // every test of a defended capsule runs one sealed with AES-256-GCM.
        aead: capsule_format::Aead::Aes256Gcm,
        layers: all,
    };
    let key = ModelKey::generate();
    let bytes = capsule_format::seal(
        &request,
        &key,
        capsule_format::new_capsule_id(),
        &mut |_| {},
    )
    .unwrap();
    SealedCapsule { bytes, key }
}

/// An input detector whose decision a test controls: one Gemm that averages the input's
/// 784 values and subtracts `at`, read as a logit, so it flags exactly the inputs whose
/// mean is at least `at` (with `scores = "logits"`, one output: spec/policy.md §3.4).
pub fn mean_detector(at: f32) -> (Graph, HashMap<String, Tensor>) {
    let graph: Graph = serde_json::from_value(serde_json::json!({
        "inputs": [{"name": "x", "shape": [null, 1, 28, 28]}],
        "params": [{"name": "w", "shape": [784, 1]}, {"name": "b", "shape": [1]}],
        "nodes": [
            {"name": "flatten", "op": {"op": "Flatten", "axis": 1},
             "inputs": ["x"], "outputs": ["flat"]},
            {"name": "score",
             "op": {"op": "Gemm", "alpha": 1.0, "beta": 1.0, "trans_a": false, "trans_b": false},
             "inputs": ["flat", "w", "b"], "outputs": ["logit"]}
        ],
        "outputs": ["logit"]
    }))
    .unwrap();
    let weights = HashMap::from([
        (
            "w".to_string(),
            Tensor::new(vec![784, 1], vec![1.0 / 784.0; 784]).unwrap(),
        ),
        ("b".to_string(), Tensor::new(vec![1], vec![-at]).unwrap()),
    ]);
    (graph, weights)
}

/// The ten real MNIST test digits of `models/samples`, as the model takes them.
pub fn sample_digits() -> Vec<Tensor> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/samples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("digit-") && n.ends_with(".npy") && !n.ends_with(".out.npy"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| {
            let t = capsule_engine::npy::read_npy(&std::fs::read(dir.join(n)).unwrap()).unwrap();
            let data = t.data().to_vec();
            Tensor::new(vec![1, 1, 28, 28], data).unwrap()
        })
        .collect()
}

/// A test provisioning server's Ed25519 signing key.
pub fn server_key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// A batch of `n` deterministic MNIST-shaped inputs, different for each `seed`.
pub fn input(n: usize, seed: u32) -> Tensor {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let data = (0..n * 28 * 28)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 1000) as f32 / 1000.0 * 2.0 - 0.5
        })
        .collect();
    Tensor::new(vec![n, 1, 28, 28], data).unwrap()
}

/// The licence terms a test grants.
pub struct Terms<'a> {
    pub queries: u64,
    pub expires: Option<&'a str>,
    /// Bind the grant to this instance instead of the enclave's own.
    pub instance_id: Option<[u8; 16]>,
}

impl Default for Terms<'_> {
    fn default() -> Self {
        Terms {
            queries: 1000,
            expires: None,
            instance_id: None,
        }
    }
}

/// Runs setup against `enclave` as the server would: key, attestation
/// (verified), grant sealed to the key. Returns the sealed state.
pub fn provision(
    enclave: &mut EnclaveProcess,
    capsule: &SealedCapsule,
    server: &Ed25519KeyPair,
    terms: Terms<'_>,
) -> Result<Vec<u8>, capsule_enclave::Error> {
    use capsule_attest::{SimVerifier, Verifier};
    let instance_id = enclave.info().instance_id;
    let enclave_public = enclave.setup_key()?;
    let nonce = b"a fresh server nonce, 32 bytes!!";
    let evidence = enclave.attest(nonce)?;
    let expected = capsule_format::report_data(&enclave_public, &instance_id, nonce);
    let verified = SimVerifier
        .verify(&evidence, &expected)
        .expect("the evidence verifies");
    assert_eq!(verified.measurement, enclave.info().measurement);
    let header = capsule_format::Capsule::parse(&capsule.bytes)
        .unwrap()
        .header()
        .clone();
    let grant = Grant::new(
        "lic-test".into(),
        terms.instance_id.unwrap_or(instance_id),
        header.capsule_id,
        &capsule.key,
        terms.queries,
        terms.expires.map(str::to_owned),
        server_public_key(server),
    );
    let sealed = seal_grant(&grant, &enclave_public, nonce).unwrap();
    enclave.provision(nonce, &sealed)
}

/// A signed top-up token.
pub fn topup_token(
    server: &Ed25519KeyPair,
    instance_id: [u8; 16],
    seq: u64,
    total_queries: u64,
) -> String {
    TopUp {
        licence_id: "lic-test".into(),
        instance_id,
        seq,
        total_queries,
        expires: None,
    }
    .sign(server)
}

/// A new enclave instance on `platform`, provisioned for `capsule` and loaded.
pub fn ready_enclave(
    platform: &Path,
    capsule: &SealedCapsule,
    server: &Ed25519KeyPair,
    terms: Terms<'_>,
) -> (EnclaveProcess, Vec<u8>, Status) {
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), platform, None).unwrap();
    let state = provision(&mut enclave, capsule, server, terms).unwrap();
    let parsed = capsule_format::Capsule::parse(&capsule.bytes).unwrap();
    let status = enclave.load(&state, &parsed).unwrap();
    (enclave, state, status)
}

/// The bits of every value, to compare outputs exactly.
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.data().iter().map(|v| v.to_bits()).collect()
}

/// The `Key:\tvalue` line of `/proc/<pid>/status`, if present.
pub fn proc_status_field(pid: u32, key: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// The kennen-io input detector's architecture from the MLCapsule paper (§7.1: two 5x5
/// convolutions with 10 and 20 filters, max pooling, a 50-unit layer, two outputs, as the
/// classic PyTorch MNIST network), with fixed pseudo-random weights: a stand-in of the real
/// size for cost measurements, which decides nothing meaningful.
pub fn kennen_sized_detector() -> (Graph, HashMap<String, Tensor>) {
    let conv = serde_json::json!({"op": "Conv", "kernel": [5, 5], "strides": [1, 1],
        "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1});
    let pool = serde_json::json!({"op": "MaxPool", "kernel": [2, 2], "strides": [2, 2],
        "pads": [0, 0, 0, 0], "dilations": [1, 1], "ceil_mode": false});
    let gemm = serde_json::json!({"op": "Gemm", "alpha": 1.0, "beta": 1.0, "trans_a": false,
        "trans_b": true});
    let graph: Graph = serde_json::from_value(serde_json::json!({
        "inputs": [{"name": "x", "shape": [null, 1, 28, 28]}],
        "params": [
            {"name": "c1.w", "shape": [10, 1, 5, 5]}, {"name": "c1.b", "shape": [10]},
            {"name": "c2.w", "shape": [20, 10, 5, 5]}, {"name": "c2.b", "shape": [20]},
            {"name": "f1.w", "shape": [50, 320]}, {"name": "f1.b", "shape": [50]},
            {"name": "f2.w", "shape": [2, 50]}, {"name": "f2.b", "shape": [2]}
        ],
        "nodes": [
            {"name": "conv1", "op": conv, "inputs": ["x", "c1.w", "c1.b"], "outputs": ["a1"]},
            {"name": "pool1", "op": pool, "inputs": ["a1"], "outputs": ["p1"]},
            {"name": "relu1", "op": {"op": "Relu"}, "inputs": ["p1"], "outputs": ["r1"]},
            {"name": "conv2", "op": conv, "inputs": ["r1", "c2.w", "c2.b"], "outputs": ["a2"]},
            {"name": "pool2", "op": pool, "inputs": ["a2"], "outputs": ["p2"]},
            {"name": "relu2", "op": {"op": "Relu"}, "inputs": ["p2"], "outputs": ["r2"]},
            {"name": "flatten", "op": {"op": "Flatten", "axis": 1}, "inputs": ["r2"], "outputs": ["f"]},
            {"name": "fc1", "op": gemm, "inputs": ["f", "f1.w", "f1.b"], "outputs": ["h"]},
            {"name": "relu3", "op": {"op": "Relu"}, "inputs": ["h"], "outputs": ["r3"]},
            {"name": "fc2", "op": gemm, "inputs": ["r3", "f2.w", "f2.b"], "outputs": ["logits"]},
            {"name": "softmax", "op": {"op": "Softmax", "axis": 1}, "inputs": ["logits"], "outputs": ["p"]}
        ],
        "outputs": ["p"]
    }))
    .unwrap();
    let mut state = 0x2545_f491_u32;
    let weights = graph
        .params
        .iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let data = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state % 2000) as f32 / 10_000.0 - 0.1
                })
                .collect();
            (p.name.clone(), Tensor::new(p.shape.clone(), data).unwrap())
        })
        .collect();
    (graph, weights)
}
