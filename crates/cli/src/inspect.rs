//! `mlcapsule inspect`: the public manifest of a capsule. It needs no key and
//! prints nothing secret: the header is public by design (capsule-v1 §4).

use std::path::PathBuf;

use anyhow::Context;
use capsule_engine::Graph;
use capsule_format::Capsule;
use clap::Args;

/// Options of `mlcapsule inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// The capsule to describe.
    pub capsule: PathBuf,
    /// Print the header and derived figures as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `mlcapsule inspect`.
pub fn main(args: InspectArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&args.capsule)
        .with_context(|| format!("cannot read {}", args.capsule.display()))?;
    let capsule = Capsule::parse(&bytes).with_context(|| format!("{}", args.capsule.display()))?;
    let header = capsule.header();
    let layers: Vec<serde_json::Value> = header
        .layers
        .iter()
        .enumerate()
        .map(|(i, layer)| {
            let tensors: Vec<_> = header.tensors.iter().filter(|t| t.layer == i).collect();
            serde_json::json!({
                "name": layer.name,
                "tensors": tensors.iter().map(|t| serde_json::json!({"name": t.name, "shape": t.shape})).collect::<Vec<_>>(),
                "parameters": tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum::<usize>(),
                "plaintext_bytes": layer.plaintext_len,
                "chunks": header.chunk_count(i),
                "sealed_bytes": header.sealed_len(i),
                "sealed_sha256": hex(&layer.sealed_sha256),
            })
        })
        .collect();
    let graph: Option<Graph> = serde_json::from_value(header.architecture.clone()).ok();
    if args.json {
        let summary = serde_json::json!({
            "file_sha256": sha256_hex(&bytes),
            "file_bytes": bytes.len(),
            "format": header.format,
            "capsule_id": hex(&header.capsule_id),
            "key_id": hex(&header.key_id),
            "chunk_size": header.chunk_size,
            "aead": header.aead,
            "parameters": header.param_count(),
            "layers": layers,
            "preprocessing": header.preprocessing,
            "labels": header.labels,
            "policy": header.policy,
            "defenses": defense_summary(header),
            "architecture": header.architecture,
            "detector": header.detector,
        });
        println!("{}", serde_json::to_string_pretty(&summary)?);
        return Ok(());
    }

    println!("capsule      {}", args.capsule.display());
    println!(
        "format       {} (header not yet authenticated: that needs the key)",
        header.format
    );
    println!("capsule id   {}", hex(&header.capsule_id));
    println!("key id       {}", hex(&header.key_id));
    println!(
        "file         {} bytes, sha256 {}",
        bytes.len(),
        sha256_hex(&bytes)
    );
    println!("chunk size   {} bytes", header.chunk_size);
    println!("cipher       {}", header.aead);
    if let Some(graph) = &graph {
        for input in &graph.inputs {
            println!(
                "input        {} {}",
                input.name,
                crate::input::shape_text(&input.shape)
            );
        }
        println!("outputs      {}", graph.outputs.join(", "));
        println!("nodes        {}", graph.nodes.len());
    }
    let detector_parameters: u64 = header
        .tensors
        .iter()
        .filter(|t| t.name.starts_with(capsule_format::DETECTOR_PREFIX))
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    println!(
        "parameters   {}",
        header.param_count() - detector_parameters
    );
    match &header.preprocessing {
        Some(p) => println!(
            "images       {}x{}, {} channel(s), scale {}, mean {:?}, std {:?}{}",
            p.size[0],
            p.size[1],
            p.channels,
            p.scale,
            p.mean,
            p.std,
            p.resize_shorter
                .map(|s| format!(", shorter side {s} then center crop"))
                .unwrap_or_default()
        ),
        None => println!("images       none (inputs are .npy tensors)"),
    }
    if let Some(labels) = &header.labels {
        println!("labels       {} classes", labels.len());
    }
    println!(
        "policy       max queries {}, expires {}",
        header
            .policy
            .max_queries
            .map_or("unlimited".into(), |n| n.to_string()),
        header.policy.expires.as_deref().unwrap_or("never")
    );
    match &header.policy.defense {
        None => println!("defenses     none"),
        Some(json) => match serde_json::from_value::<capsule_defense::Policy>(json.clone()) {
            Ok(policy) => {
                for (i, line) in policy_lines(&policy).iter().enumerate() {
                    let label = if i == 0 { "defenses" } else { "" };
                    println!("{label:<12} {line}");
                }
            }
            Err(e) => println!(
                "defenses     not understood by this mlcapsule ({e}); the enclave will refuse the capsule: {json}"
            ),
        },
    }
    if let Some(detector) = &header.detector {
        let network: Option<Graph> = serde_json::from_value(detector.architecture.clone()).ok();
        println!(
            "detector     {} layers, {} parameters, {}; sees input x {} + {}",
            header.detector_layers(),
            detector_parameters,
            network.map_or("graph not readable".into(), |g| format!(
                "{} nodes",
                g.nodes.len()
            )),
            detector.input.scale,
            detector.input.offset
        );
    }
    let width = layers
        .iter()
        .map(|l| l["name"].as_str().unwrap_or_default().len())
        .max()
        .unwrap_or(0)
        .max(5);
    println!(
        "\n{:<width$}  {:>10}  {:>11}  {:>6}  sealed sha256",
        "layer", "parameters", "bytes", "chunks"
    );
    for layer in &layers {
        println!(
            "{:<width$}  {:>10}  {:>11}  {:>6}  {}",
            layer["name"].as_str().unwrap_or_default(),
            layer["parameters"].to_string(),
            layer["plaintext_bytes"].to_string(),
            layer["chunks"].to_string(),
            &layer["sealed_sha256"].as_str().unwrap_or_default()[..16]
        );
    }
    Ok(())
}

/// The defense policy, one line per defense, for people (spec/policy.md §3).
pub fn policy_lines(policy: &capsule_defense::Policy) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(noise) = &policy.noise {
        lines.push(format!(
            "noise     c = {}, towards {} (MLCapsule Algorithm 1)",
            noise.c,
            match &noise.prior {
                Some(prior) => format!("the training prior {prior:?}"),
                None => "a uniform prior".into(),
            }
        ));
    }
    let out = &policy.output;
    let mut shown = Vec::new();
    if let Some(rs) = &out.reverse_sigmoid {
        shown.push(format!(
            "reverse sigmoid (beta {}, gamma {})",
            rs.beta, rs.gamma
        ));
    }
    if out.label_only {
        shown.push("label only".into());
    }
    if let Some(k) = out.top_k {
        shown.push(format!("top {k} only"));
    }
    if let Some(d) = out.round {
        shown.push(format!("rounded to {d} decimals"));
    }
    if !shown.is_empty() {
        lines.push(format!("output    {}", shown.join(", ")));
    }
    if let Some(p) = &policy.prada {
        lines.push(format!(
            "prada     alarm when Shapiro-Wilk W < {}: {}; tests every {} queries once more than {} distances (classes with {} or more, {} sigma trim); keeps at most {} queries ({:?}) and {} distances{}",
            p.delta,
            match p.action {
                capsule_defense::PradaAction::Deny => "refuse that query and every later one",
                capsule_defense::PradaAction::Record => "record it and answer",
            },
            p.test_every,
            p.min_distances,
            p.min_class_distances,
            p.trim_sigmas,
            p.max_stored,
            p.storage,
            p.max_distances,
            if p.dg_initial_zero { ", DG starts at 0" } else { "" }
        ));
    }
    if let Some(d) = &policy.detector {
        lines.push(format!(
            "detector  {}refuse when the detector's {} of \"crafted\" (output {}) is at least {}",
            if d.enabled { "" } else { "(disabled) " },
            match d.scores {
                capsule_defense::DetectorScores::Probabilities => "probability",
                capsule_defense::DetectorScores::Logits => "softmax of the logits",
            },
            d.crafted_class,
            d.threshold
        ));
    }
    if lines.is_empty() {
        lines.push("none (an empty policy)".into());
    }
    lines
}

/// The defense policy for `--json`: parsed, or why not.
fn defense_summary(header: &capsule_format::Header) -> serde_json::Value {
    match &header.policy.defense {
        None => serde_json::Value::Null,
        Some(json) => match serde_json::from_value::<capsule_defense::Policy>(json.clone()) {
            Ok(policy) => serde_json::json!({"understood": true, "lines": policy_lines(&policy)}),
            Err(e) => serde_json::json!({"understood": false, "error": e.to_string()}),
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}
