//! Removing what the engine would compute for nothing: identities (including
//! converted Dropouts) and nodes whose outputs nobody reads. Unread weights
//! are dropped by [`crate::draft::Draft::finish`].

use std::collections::HashSet;

use capsule_engine::Op;

use crate::draft::Draft;

/// Removes Identity nodes by renaming values. An Identity whose output is a
/// graph output is kept unless its input's producer can write that output
/// directly (the input is an intermediate value, not a graph input, param or
/// another graph output).
pub(crate) fn remove_identities(draft: &mut Draft) {
    let mut i = 0;
    while i < draft.nodes.len() {
        let node = &draft.nodes[i];
        if node.op != Op::Identity || node.inputs.len() != 1 || node.outputs.len() != 1 {
            i += 1;
            continue;
        }
        let (x, y) = (node.inputs[0].clone(), node.outputs[0].clone());
        if !draft.outputs.contains(&y) {
            draft.nodes.remove(i);
            rename_reads(draft, &y, &x);
            continue;
        }
        let producer = draft.nodes[..i].iter().position(|n| n.outputs.contains(&x));
        match producer {
            Some(p) if !draft.outputs.contains(&x) => {
                draft.nodes.remove(i);
                for out in draft.nodes[p].outputs.iter_mut().filter(|o| **o == x) {
                    *out = y.clone();
                }
                rename_reads(draft, &x, &y);
            }
            _ => i += 1,
        }
    }
}

/// Removes nodes none of whose outputs is read by a later node or returned.
pub(crate) fn remove_dead_nodes(draft: &mut Draft) {
    let mut live: HashSet<String> = draft.outputs.iter().cloned().collect();
    let mut keep = vec![false; draft.nodes.len()];
    for (i, node) in draft.nodes.iter().enumerate().rev() {
        if node.outputs.iter().any(|o| live.contains(o)) {
            keep[i] = true;
            live.extend(node.inputs.iter().cloned());
        }
    }
    let mut index = 0;
    draft.nodes.retain(|_| {
        index += 1;
        keep[index - 1]
    });
}

fn rename_reads(draft: &mut Draft, from: &str, to: &str) {
    for input in draft.nodes.iter_mut().flat_map(|n| n.inputs.iter_mut()) {
        if input == from {
            *input = to.to_string();
        }
    }
}
