//! spec/policy.md against the implementation: every TOML block in the spec parses and
//! validates, the example's JSON form is the one in spec §5, and the error messages name the
//! key and what to do.

use capsule_defense::{Error, Policy, PradaAction, Storage};

fn spec() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/policy.md");
    std::fs::read_to_string(path).expect("spec/policy.md exists")
}

/// The fenced blocks of `lang` in the spec, in order.
fn blocks(text: &str, lang: &str) -> Vec<String> {
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&fence) {
        let body = &rest[start + fence.len()..];
        let end = body.find("```").expect("closed fence");
        out.push(body[..end].to_string());
        rest = &body[end + 3..];
    }
    out
}

#[test]
fn every_toml_block_of_the_spec_is_a_valid_policy() {
    let toml = blocks(&spec(), "toml");
    assert!(toml.len() >= 2);
    for block in &toml {
        let policy = Policy::from_toml(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
        policy.validate_for_model(10).unwrap();
    }
}

#[test]
fn the_example_s_json_form_is_the_spec_s() {
    let text = spec();
    let policy = Policy::from_toml(&blocks(&text, "toml")[0]).unwrap();
    let want: serde_json::Value = serde_json::from_str(&blocks(&text, "json")[0]).unwrap();
    assert_eq!(serde_json::to_value(&policy).unwrap(), want);
    // And the JSON reads back to the same policy.
    let back: Policy = serde_json::from_value(want).unwrap();
    assert_eq!(back, policy);
    let prada = policy.prada.unwrap();
    assert_eq!(
        (prada.action, prada.storage, prada.max_stored),
        (PradaAction::Deny, Storage::U8, 3000)
    );
}

#[test]
fn an_empty_policy_changes_nothing() {
    let policy = Policy::from_toml("").unwrap();
    assert!(policy.is_empty());
    let json = serde_json::to_string(&policy).unwrap();
    assert_eq!(
        json,
        r#"{"noise":null,"output":{"reverse_sigmoid":null,"top_k":null,"label_only":false,"round":null},"prada":null,"detector":null}"#
    );
    assert_eq!(serde_json::from_str::<Policy>("{}").unwrap(), policy);
}

#[test]
fn unknown_keys_are_refused_in_both_forms() {
    let err = Policy::from_toml("[noise]\nc = 0.5\nstrength = 1\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the policy does not parse: line 3, column 1: unknown field `strength`, expected `c` \
         or `prior`; fix it as spec/policy.md describes"
    );
    assert!(Policy::from_toml("[budget]\nmax = 3\n").is_err());
    assert!(
        serde_json::from_str::<Policy>(r#"{"prada":{"delta":0.9,"action":"deny","window":5}}"#)
            .is_err()
    );
    assert!(serde_json::from_str::<Policy>(r#"{"extra":1}"#).is_err());
}

#[test]
fn error_messages_name_the_key_and_the_fix() {
    let cases = [
        (
            "[noise]\nc = 2\n",
            "invalid policy value `noise.c`: 2 is outside 0..=1; use 0 (off) to 1 (strongest)",
        ),
        (
            "[prada]\ndelta = 0.9\n",
            "the policy does not parse: line 1, column 1: missing field `action`; fix it as \
             spec/policy.md describes",
        ),
        (
            "[prada]\ndelta = 0.9\naction = \"block\"\n",
            "the policy does not parse: line 3, column 10: unknown variant `block`, expected \
             `deny` or `record`; fix it as spec/policy.md describes",
        ),
        (
            "[output]\nlabel_only = true\ntop_k = 2\n",
            "invalid policy value `output.top_k`: cannot be combined with label_only = true; \
             keep one of them",
        ),
        (
            "[prada]\ndelta = 0.9\naction = \"record\"\nmin_distances = 100\nmax_distances = 50\n",
            "invalid policy value `prada.max_distances`: 50 keeps no more than min_distances = \
             100, so the test would never run; raise max_distances",
        ),
    ];
    for (text, message) in cases {
        assert_eq!(Policy::from_toml(text).unwrap_err().to_string(), message);
    }
    let policy = Policy::from_toml("[noise]\nc = 0.5\nprior = [0.5, 0.5]\n").unwrap();
    assert_eq!(
        policy.validate_for_model(10),
        Err(Error::ClassCountMismatch {
            what: "noise.prior",
            expected: 10,
            found: 2
        })
    );
}
