//! Fixtures shared by the enclave's integration tests: the bundled MNIST
//! model sealed into a capsule, a test provisioning server's signing key,
//! and helpers that provision an enclave process the way the server would.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use capsule_enclave::{EnclaveProcess, Status};
use capsule_engine::{Graph, Tensor};
use capsule_format::{
    Grant, LayerPlaintext, ModelKey, Policy, SealRequest, TopUp, seal_grant, server_public_key,
};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;

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
    let request = SealRequest {
        architecture: serde_json::to_value(&imported.graph).unwrap(),
        preprocessing: None,
        labels: None,
        policy,
        chunk_size,
        layers: layers(&imported.graph, &imported.weights),
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

fn layers<'a>(graph: &Graph, weights: &'a HashMap<String, Tensor>) -> Vec<LayerPlaintext<'a>> {
    let mut assigned = HashSet::new();
    let mut out = Vec::new();
    for node in &graph.nodes {
        let tensors: Vec<_> = node
            .inputs
            .iter()
            .filter_map(|name| weights.get_key_value(name))
            .filter(|(name, _)| assigned.insert(name.as_str()))
            .map(|(name, t)| (name.clone(), t.shape().to_vec(), t.data()))
            .collect();
        if !tensors.is_empty() {
            out.push(LayerPlaintext {
                name: node.name.clone(),
                tensors,
            });
        }
    }
    out
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
