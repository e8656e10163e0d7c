//! PRADA's growing sets: the stored queries of every class, in one bounded slab.
//!
//! Slot `i` holds one stored query (`dim` values) and its class. Slots fill in order up to
//! `max_stored`; after that a new query overwrites the oldest slot (first in, first out over
//! all classes), so memory never grows past the policy's bound. Each class keeps the list of
//! its slots; the nearest-neighbour search of a query walks only its class's slots.
//!
//! The distance kernels accumulate in 16 independent `f32` lanes so that LLVM vectorises
//! them without `unsafe` or target features.

use serde::{Deserialize, Serialize};

use crate::policy::Storage;

/// Independent accumulators of the distance kernels: 4 SSE or 2 AVX registers.
const LANES: usize = 16;

/// The stored queries of all classes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(into = "SetsRepr", try_from = "SetsRepr")]
pub(crate) struct GrowingSets {
    /// Values per query; 0 until the first query.
    dim: usize,
    /// Class of each slot.
    slot_class: Vec<u32>,
    /// The slot to overwrite next once every slot is used.
    next: usize,
    values: Values,
    /// Slots of each class (derived from `slot_class`, not serialised).
    members: Vec<Vec<u32>>,
}

/// Equal when they store the same queries in the same slots (the order of a class's slot
/// list is not part of the state).
impl PartialEq for GrowingSets {
    fn eq(&self, other: &GrowingSets) -> bool {
        self.dim == other.dim
            && self.slot_class == other.slot_class
            && self.next == other.next
            && self.values == other.values
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Values {
    F32(Vec<f32>),
    /// Per slot: `dim` codes, and (minimum, step) with value = minimum + step × code.
    U8 {
        codes: Vec<u8>,
        affine: Vec<[f32; 2]>,
    },
}

impl GrowingSets {
    pub(crate) fn new(storage: Storage) -> GrowingSets {
        GrowingSets {
            dim: 0,
            slot_class: Vec::new(),
            next: 0,
            values: match storage {
                Storage::F32 => Values::F32(Vec::new()),
                Storage::U8 => Values::U8 {
                    codes: Vec::new(),
                    affine: Vec::new(),
                },
            },
            members: Vec::new(),
        }
    }

    pub(crate) fn storage(&self) -> Storage {
        match self.values {
            Values::F32(_) => Storage::F32,
            Values::U8 { .. } => Storage::U8,
        }
    }

    pub(crate) fn dim(&self) -> usize {
        self.dim
    }

    /// Fixes the number of values per query (at the first query).
    pub(crate) fn set_dim(&mut self, dim: usize) {
        debug_assert!(self.slot_class.is_empty());
        self.dim = dim;
    }

    /// Stored queries, all classes.
    pub(crate) fn len(&self) -> usize {
        self.slot_class.len()
    }

    /// Stored queries of `class`.
    pub(crate) fn class_len(&self, class: usize) -> usize {
        self.members.get(class).map_or(0, Vec::len)
    }

    /// Highest class index stored, plus one.
    pub(crate) fn classes_seen(&self) -> usize {
        self.members.len()
    }

    /// Bytes held by the stored queries and their bookkeeping.
    pub(crate) fn memory_bytes(&self) -> usize {
        let values = match &self.values {
            Values::F32(v) => 4 * v.capacity(),
            Values::U8 { codes, affine } => codes.capacity() + 8 * affine.capacity(),
        };
        values
            + 4 * self.slot_class.capacity()
            + self
                .members
                .iter()
                .map(|m| 4 * m.capacity() + 24)
                .sum::<usize>()
    }

    /// Distance from `x` to the nearest stored query of `class`; `None` if it has none.
    /// Overflow saturates at `f32::MAX`.
    pub(crate) fn nearest(&self, x: &[f32], class: usize) -> Option<f32> {
        let slots = self.members.get(class).filter(|m| !m.is_empty())?;
        let dim = self.dim;
        let mut best = f32::INFINITY;
        match &self.values {
            Values::F32(v) => {
                for &slot in slots {
                    let s = slot as usize * dim;
                    best = best.min(sq_dist_f32(x, &v[s..s + dim]));
                }
            }
            Values::U8 { codes, affine } => {
                for &slot in slots {
                    let s = slot as usize * dim;
                    let [lo, step] = affine[slot as usize];
                    best = best.min(sq_dist_u8(x, &codes[s..s + dim], lo, step));
                }
            }
        }
        Some(best.sqrt().min(f32::MAX))
    }

    /// Stores `x` as a query of `class`, overwriting the oldest slot when `max_stored` are
    /// used. `x` must have `dim` values.
    pub(crate) fn insert(&mut self, x: &[f32], class: usize, max_stored: usize) {
        debug_assert_eq!(x.len(), self.dim);
        if self.members.len() <= class {
            self.members.resize_with(class + 1, Vec::new);
        }
        let slot = if self.slot_class.len() < max_stored {
            let (used, dim) = (self.slot_class.len(), self.dim);
            grow_exact(&mut self.slot_class, 1, used, max_stored);
            self.slot_class.push(class as u32);
            match &mut self.values {
                Values::F32(v) => {
                    grow_exact(v, dim, used, max_stored);
                    v.extend_from_slice(x);
                }
                Values::U8 { codes, affine } => {
                    grow_exact(codes, dim, used, max_stored);
                    grow_exact(affine, 1, used, max_stored);
                    let start = codes.len();
                    codes.resize(start + dim, 0);
                    affine.push(quantise(x, &mut codes[start..]));
                }
            }
            used
        } else {
            let slot = self.next % self.slot_class.len();
            self.next = (slot + 1) % self.slot_class.len();
            let old = self.slot_class[slot] as usize;
            let members = &mut self.members[old];
            if let Some(pos) = members.iter().position(|&s| s as usize == slot) {
                members.swap_remove(pos);
            }
            // Keep every class's list within 2 × its length + 8, so that the lists together
            // stay within 8 bytes a stored query however the classes shift.
            if members.capacity() > 2 * members.len() + 8 {
                members.shrink_to(members.len() + members.len() / 2 + 4);
            }
            self.slot_class[slot] = class as u32;
            let (s, dim) = (slot * self.dim, self.dim);
            match &mut self.values {
                Values::F32(v) => v[s..s + dim].copy_from_slice(x),
                Values::U8 { codes, affine } => {
                    affine[slot] = quantise(x, &mut codes[s..s + dim]);
                }
            }
            slot
        };
        self.members[class].push(slot as u32);
    }

    /// Checks the invariants a restored state must keep.
    pub(crate) fn check(&self, max_stored: usize) -> Result<(), String> {
        let n = self.slot_class.len();
        if n > max_stored {
            return Err(format!(
                "{n} stored queries but the policy allows {max_stored}"
            ));
        }
        if n > 0 && self.dim == 0 {
            return Err("stored queries without a query size".into());
        }
        if self.next >= max_stored.max(1) {
            return Err("the next slot is outside the store".into());
        }
        let ok = match &self.values {
            Values::F32(v) => v.len() == n * self.dim && v.iter().all(|x| x.is_finite()),
            Values::U8 { codes, affine } => {
                codes.len() == n * self.dim
                    && affine.len() == n
                    && affine.iter().flatten().all(|x| x.is_finite())
            }
        };
        if !ok {
            return Err("the stored values do not match the number of queries".into());
        }
        Ok(())
    }
}

/// Makes room for one more slot of `per_slot` items in `v`, which holds `used` slots: doubles
/// the capacity like `Vec` would, but never past `max_slots`, so that a full store holds
/// exactly what the policy's memory bound counts.
pub(crate) fn grow_exact<T>(v: &mut Vec<T>, per_slot: usize, used: usize, max_slots: usize) {
    if v.capacity() < (used + 1) * per_slot {
        let slots = (2 * used)
            .clamp(used + 1, max_slots.max(used + 1))
            .max(16.min(max_slots));
        v.reserve_exact(slots * per_slot - v.len());
    }
}

/// Quantises `x` to `codes` between its own minimum and maximum; returns (minimum, step).
fn quantise(x: &[f32], codes: &mut [u8]) -> [f32; 2] {
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // In f64 so that the range of finite extremes cannot overflow.
    let step = ((f64::from(hi) - f64::from(lo)) / 255.0) as f32;
    if !(step > 0.0 && step.is_finite()) {
        codes.fill(0);
        return [lo, 0.0];
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v - lo) / step).round().clamp(0.0, 255.0) as u8;
    }
    [lo, step]
}

/// Squared L2 distance of two equally long vectors.
pub(crate) fn sq_dist_f32(a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, y) in ac.iter().zip(bc) {
        for i in 0..LANES {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| (x - y) * (x - y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Squared L2 distance from `a` to the quantised vector `lo + step × codes`.
fn sq_dist_u8(a: &[f32], codes: &[u8], lo: f32, step: f32) -> f32 {
    let (ac, ar) = a.as_chunks::<LANES>();
    let (qc, qr) = codes.as_chunks::<LANES>();
    let mut acc = [0.0f32; LANES];
    for (x, q) in ac.iter().zip(qc) {
        for i in 0..LANES {
            let d = x[i] - (lo + step * f32::from(q[i]));
            acc[i] += d * d;
        }
    }
    let tail: f32 = ar
        .iter()
        .zip(qr)
        .map(|(x, &q)| {
            let d = x - (lo + step * f32::from(q));
            d * d
        })
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// The serialised form: values as base64 in human-readable formats (JSON), raw bytes in
/// binary ones; `f32` values little-endian.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetsRepr {
    storage: Storage,
    dim: usize,
    slot_class: Vec<u32>,
    next: usize,
    #[serde(with = "bytes")]
    values: Vec<u8>,
    affine: Vec<[f32; 2]>,
}

impl From<GrowingSets> for SetsRepr {
    fn from(s: GrowingSets) -> SetsRepr {
        let storage = s.storage();
        let (values, affine) = match s.values {
            Values::F32(v) => (v.iter().flat_map(|x| x.to_le_bytes()).collect(), Vec::new()),
            Values::U8 { codes, affine } => (codes, affine),
        };
        SetsRepr {
            storage,
            dim: s.dim,
            slot_class: s.slot_class,
            next: s.next,
            values,
            affine,
        }
    }
}

impl TryFrom<SetsRepr> for GrowingSets {
    type Error = String;

    fn try_from(r: SetsRepr) -> Result<GrowingSets, String> {
        let values = match r.storage {
            Storage::F32 => {
                let (chunks, rest) = r.values.as_chunks::<4>();
                if !rest.is_empty() || !r.affine.is_empty() {
                    return Err("f32 values are not a whole number of floats".into());
                }
                Values::F32(chunks.iter().map(|b| f32::from_le_bytes(*b)).collect())
            }
            Storage::U8 => Values::U8 {
                codes: r.values,
                affine: r.affine,
            },
        };
        let mut members: Vec<Vec<u32>> = Vec::new();
        for (slot, &class) in r.slot_class.iter().enumerate() {
            let class = class as usize;
            if class >= crate::MAX_CLASSES {
                return Err(format!("stored class {class} is out of range"));
            }
            if members.len() <= class {
                members.resize_with(class + 1, Vec::new);
            }
            members[class].push(slot as u32);
        }
        Ok(GrowingSets {
            dim: r.dim,
            slot_class: r.slot_class,
            next: r.next,
            values,
            members,
        })
    }
}

/// Bytes as base64 text for human-readable formats, as bytes for binary formats.
mod bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(v))
        } else {
            s.serialize_bytes(v)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("base64 text or bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
                STANDARD.decode(v).map_err(E::custom)
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(b) = seq.next_element()? {
                    out.push(b);
                }
                Ok(out)
            }
        }
        if d.is_human_readable() {
            d.deserialize_str(V)
        } else {
            d.deserialize_byte_buf(V)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_naive_sums() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!((sq_dist_f32(&a, &b) - naive).abs() < 1e-5);
        let mut codes = vec![0u8; 37];
        let [lo, step] = quantise(&b, &mut codes);
        let deq: Vec<f32> = codes.iter().map(|&q| lo + step * f32::from(q)).collect();
        let naive_q: f32 = a.iter().zip(&deq).map(|(x, y)| (x - y) * (x - y)).sum();
        assert!((sq_dist_u8(&a, &codes, lo, step) - naive_q).abs() < 1e-5);
        for (d, v) in deq.iter().zip(&b) {
            assert!((d - v).abs() <= step / 2.0 + 1e-6);
        }
    }

    #[test]
    fn eight_bit_images_are_stored_exactly() {
        let x: Vec<f32> = (0..=255).map(|k| k as f32 / 255.0).collect();
        let mut codes = vec![0u8; x.len()];
        let [lo, step] = quantise(&x, &mut codes);
        for (k, &c) in codes.iter().enumerate() {
            assert_eq!(c as usize, k);
            assert!((lo + step * f32::from(c) - x[k]).abs() < 1e-6);
        }
    }

    #[test]
    fn fifo_eviction_keeps_the_bound() {
        for storage in [Storage::F32, Storage::U8] {
            let mut s = GrowingSets::new(storage);
            s.set_dim(2);
            for i in 0..7 {
                s.insert(&[i as f32, 0.0], i % 2, 3);
            }
            assert_eq!(s.len(), 3);
            // Slots now hold queries 6 (class 0), 4 (class 0) and 5 (class 1).
            assert_eq!(s.class_len(0) + s.class_len(1), 3);
            assert_eq!(s.nearest(&[5.0, 0.0], 1), Some(0.0));
            assert!((s.nearest(&[5.0, 0.0], 0).unwrap() - 1.0).abs() < 1e-6);
            s.check(3).unwrap();
            let json = serde_json::to_string(&s).unwrap();
            let back: GrowingSets = serde_json::from_str(&json).unwrap();
            assert_eq!(back.nearest(&[5.0, 0.0], 0), s.nearest(&[5.0, 0.0], 0));
            assert_eq!(back.len(), 3);
        }
    }
}
