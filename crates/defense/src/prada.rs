//! PRADA: detecting model extraction from the distribution of query distances (Juuti et al.,
//! EuroS&P 2019), one detector per enclave instance.
//!
//! On each query `x` whose predicted class (the model's argmax) is `c` (algorithms.md §1.3):
//!
//! ```text
//! if G[c] is empty:  store x in G[c]                        (no distance for a first query)
//! else:
//!     d = min over y in G[c] of ‖x − y‖₂;  append d to D
//!     if d > T[c]:   store x in G[c];  append d to DG[c]
//!                    T[c] = max(T[c], mean(DG[c]) − std(DG[c]))     (population std)
//! every `test_every`-th query:
//!     Z = the distances in D of classes with at least `min_class_distances` of them
//!     Z = { z in Z : |z − mean(Z)| < trim_sigmas · std(Z) }
//!     if |Z| > min_distances:  alarm if Shapiro–Wilk W(Z) < δ
//! ```
//!
//! Benign queries (natural samples) have nearest-neighbour distances close to normally
//! distributed; synthetic extraction queries (Jacobian augmentation, small steps from seeds)
//! sit at near-identical small offsets, and W drops.
//!
//! Choices where the paper and its code differ or are silent (documented in spec/policy.md):
//! - `DG[c]` starts empty, as in the paper; `dg_initial_zero = true` seeds it with a 0 as the
//!   authors' code does.
//! - The alarm latches: under `action = "deny"` the query that raised it and every later one
//!   are refused; under `"record"` every test result is still computed and counted.
//! - A sample with zero spread (every distance equal, e.g. the same query repeated, or a
//!   constant-size step) counts as W = 0, an alarm; PRADA's trimming would drop all of it
//!   and never test, which an attacker could use.
//! - Memory is bounded: at most `max_stored` stored queries (the oldest, over all classes, is
//!   forgotten first) and `max_distances` distances (likewise). `DG[c]` is kept as running
//!   mean and variance (Welford), which is all the threshold needs.
//! - A class whose stored queries were all forgotten keeps its threshold; its next query is
//!   stored without a distance, like a first query.
//!
//! What it does not do: run the model (the caller passes the predicted class), decide what
//! the enclave tells the client, or store anything itself: the caller seals [`PradaState`].

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::growing_set::GrowingSets;
use crate::policy::{PradaAction, PradaPolicy};
use crate::shapiro::shapiro_wilk_sorted;

/// Version of the serialised [`PradaState`]; a state of another version is refused.
pub const STATE_FORMAT: u32 = 1;

/// The largest class index plus one that PRADA accepts.
pub const MAX_CLASSES: usize = 1 << 16;

/// A PRADA detector: its policy, its state, and the indexes derived from the state.
#[derive(Debug, Clone)]
pub struct Prada {
    policy: PradaPolicy,
    state: PradaState,
    /// Distances in `state.distances` per class.
    class_distances: Vec<u32>,
    /// Reused buffer for the test's sample.
    scratch: Vec<f64>,
}

/// Everything PRADA remembers about one client, to be sealed between runs.
///
/// Serialises with serde; in JSON the stored queries are base64 (4/3 of
/// [`PradaPolicy::memory_bound`]'s figure). Restore it with [`Prada::restore`], which checks
/// it against the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PradaState {
    format: u32,
    queries: u64,
    sets: GrowingSets,
    classes: Vec<ClassStats>,
    /// D: (class, distance), oldest first.
    distances: VecDeque<Distance>,
    first_alarm: Option<PradaTest>,
    alarms: u64,
    last_test: Option<PradaTest>,
}

/// One entry of D: the class and the distance.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Distance(u32, #[serde(with = "exact::f32")] f32);

/// Per class: the admission threshold T[c] and the running moments of DG[c].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassStats {
    #[serde(with = "exact::f64")]
    threshold: f64,
    added: u64,
    #[serde(with = "exact::f64")]
    mean: f64,
    #[serde(with = "exact::f64")]
    m2: f64,
}

/// One Shapiro–Wilk test of the distances.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PradaTest {
    /// The query (1-based, counting every query observed) at which the test ran.
    pub query: u64,
    /// Distances in the tested sample, after trimming.
    pub distances: usize,
    /// The statistic; 0 for a sample with zero spread.
    #[serde(with = "exact::f64")]
    pub w: f64,
    /// W < δ.
    pub alarm: bool,
}

/// Whether the enclave may answer the query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Release the output.
    Answer,
    /// Refuse: PRADA raised an alarm and the policy says `deny`.
    Refuse,
}

/// What observing one query did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// Answer or refuse this query.
    pub verdict: Verdict,
    /// Distance to the nearest stored query of its class; `None` for the first of a class,
    /// or when the query was refused before being looked at.
    pub distance: Option<f32>,
    /// The query joined its class's growing set.
    pub stored: bool,
    /// The test run on this query, if it was a test query with enough distances.
    pub test: Option<PradaTest>,
}

impl Prada {
    /// A fresh detector (no queries seen).
    pub fn new(policy: PradaPolicy) -> Result<Prada, Error> {
        policy.validate()?;
        let state = PradaState {
            format: STATE_FORMAT,
            queries: 0,
            sets: GrowingSets::new(policy.storage),
            classes: Vec::new(),
            distances: VecDeque::new(),
            first_alarm: None,
            alarms: 0,
            last_test: None,
        };
        Ok(Prada {
            policy,
            state,
            class_distances: Vec::new(),
            scratch: Vec::new(),
        })
    }

    /// A detector continuing from a state saved earlier under the same policy.
    ///
    /// Errors: [`Error::InvalidState`] if the state breaks an invariant or the policy's bounds
    /// (it was made for another capsule), or the policy's own errors.
    pub fn restore(policy: PradaPolicy, state: PradaState) -> Result<Prada, Error> {
        policy.validate()?;
        state
            .check(&policy)
            .map_err(|reason| Error::InvalidState { reason })?;
        let mut class_distances = vec![0u32; state.classes.len()];
        for &Distance(c, _) in &state.distances {
            class_distances[c as usize] += 1;
        }
        Ok(Prada {
            policy,
            state,
            class_distances,
            scratch: Vec::new(),
        })
    }

    /// The policy this detector runs under.
    pub fn policy(&self) -> &PradaPolicy {
        &self.policy
    }

    /// The state to seal.
    pub fn state(&self) -> &PradaState {
        &self.state
    }

    /// The state to seal, consuming the detector.
    pub fn into_state(self) -> PradaState {
        self.state
    }

    /// True when every query is refused: an alarm was raised and the action is `deny`.
    pub fn refusing(&self) -> bool {
        self.policy.action == PradaAction::Deny && self.state.first_alarm.is_some()
    }

    /// Bytes held now (stored queries, distances, per-class statistics); never more than
    /// [`PradaPolicy::memory_bound`] plus allocator slack.
    pub fn memory_bytes(&self) -> usize {
        self.state.sets.memory_bytes()
            + std::mem::size_of::<Distance>() * self.state.distances.capacity()
            + (std::mem::size_of::<ClassStats>() + 4) * self.state.classes.capacity()
    }

    /// Observes one query: `input` as the model saw it (any fixed size), `class` the model's
    /// predicted class. Call it after running the model and before releasing its output.
    ///
    /// Once [`Prada::refusing`], returns [`Verdict::Refuse`] at once and leaves the state
    /// unchanged.
    ///
    /// Errors (the state is unchanged): [`Error::NonFiniteInput`] for an empty input or one
    /// with NaN or infinity, [`Error::DimensionMismatch`] for another size than earlier
    /// queries, [`Error::ClassOutOfRange`] for `class ≥` [`MAX_CLASSES`].
    pub fn observe(&mut self, input: &[f32], class: usize) -> Result<Observation, Error> {
        if self.refusing() {
            return Ok(Observation {
                verdict: Verdict::Refuse,
                distance: None,
                stored: false,
                test: None,
            });
        }
        if input.is_empty() || input.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFiniteInput);
        }
        if class >= MAX_CLASSES {
            return Err(Error::ClassOutOfRange { class });
        }
        let dim = self.state.sets.dim();
        if dim == 0 {
            self.state.sets.set_dim(input.len());
        } else if dim != input.len() {
            return Err(Error::DimensionMismatch {
                expected: dim,
                found: input.len(),
            });
        }
        if self.state.classes.len() <= class {
            self.state.classes.resize(class + 1, ClassStats::default());
            self.class_distances.resize(class + 1, 0);
        }
        self.state.queries += 1;

        let max_stored = self.policy.max_stored;
        let (distance, stored) = match self.state.sets.nearest(input, class) {
            None => {
                let stats = &mut self.state.classes[class];
                if self.policy.dg_initial_zero && stats.added == 0 {
                    stats.admit(0.0);
                }
                self.state.sets.insert(input, class, max_stored);
                (None, true)
            }
            Some(d) => {
                self.push_distance(class, d);
                let stats = &mut self.state.classes[class];
                let admit = f64::from(d) > stats.threshold;
                if admit {
                    stats.admit(f64::from(d));
                    self.state.sets.insert(input, class, max_stored);
                }
                (Some(d), admit)
            }
        };

        let test = if self.state.queries.is_multiple_of(self.policy.test_every) {
            self.test()
        } else {
            None
        };
        if let Some(t) = test {
            self.state.last_test = Some(t);
            if t.alarm {
                self.state.alarms += 1;
                self.state.first_alarm.get_or_insert(t);
            }
        }
        Ok(Observation {
            verdict: if self.refusing() {
                Verdict::Refuse
            } else {
                Verdict::Answer
            },
            distance,
            stored,
            test,
        })
    }

    fn push_distance(&mut self, class: usize, d: f32) {
        let distances = &mut self.state.distances;
        if distances.len() >= self.policy.max_distances
            && let Some(Distance(old, _)) = distances.pop_front()
        {
            self.class_distances[old as usize] -= 1;
        }
        if distances.len() == distances.capacity() {
            // Double, but never past the bound.
            let want = (2 * distances.len()).max(64).min(self.policy.max_distances);
            distances.reserve_exact(want.saturating_sub(distances.len()).max(1));
        }
        self.state.distances.push_back(Distance(class as u32, d));
        self.class_distances[class] += 1;
    }

    /// The Shapiro–Wilk test over the eligible distances, if there are enough.
    fn test(&mut self) -> Option<PradaTest> {
        let p = &self.policy;
        let z = &mut self.scratch;
        z.clear();
        z.extend(
            self.state
                .distances
                .iter()
                .filter(|d| self.class_distances[d.0 as usize] as usize >= p.min_class_distances)
                .map(|d| f64::from(d.1)),
        );
        if z.len() <= p.min_distances {
            return None;
        }
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let std = (z.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n).sqrt();
        let w = if std > 0.0 {
            let limit = p.trim_sigmas * std;
            z.retain(|v| (v - mean).abs() < limit);
            if z.len() <= p.min_distances {
                return None;
            }
            z.sort_unstable_by(f64::total_cmp);
            // Zero range after trimming: as degenerate as it gets.
            shapiro_wilk_sorted(z).map_or(0.0, |r| r.w)
        } else {
            0.0
        };
        Some(PradaTest {
            query: self.state.queries,
            distances: z.len(),
            w,
            alarm: w < p.delta,
        })
    }
}

impl ClassStats {
    /// Records an admitted distance in DG[c] and raises T[c] to mean − std if that is higher.
    fn admit(&mut self, d: f64) {
        self.added += 1;
        let delta = d - self.mean;
        self.mean += delta / self.added as f64;
        self.m2 += delta * (d - self.mean);
        let std = (self.m2 / self.added as f64).max(0.0).sqrt();
        self.threshold = self.threshold.max(self.mean - std);
    }
}

impl PradaState {
    /// Queries observed (refused queries after a `deny` alarm are not counted).
    pub fn queries(&self) -> u64 {
        self.queries
    }

    /// Queries now stored in the growing sets, all classes.
    pub fn stored(&self) -> usize {
        self.sets.len()
    }

    /// Stored queries of one class.
    pub fn stored_in_class(&self, class: usize) -> usize {
        self.sets.class_len(class)
    }

    /// Distances now kept for the test.
    pub fn distances(&self) -> usize {
        self.distances.len()
    }

    /// The first test that raised an alarm.
    pub fn first_alarm(&self) -> Option<&PradaTest> {
        self.first_alarm.as_ref()
    }

    /// Tests that raised an alarm (under `deny` at most 1).
    pub fn alarms(&self) -> u64 {
        self.alarms
    }

    /// The latest test.
    pub fn last_test(&self) -> Option<&PradaTest> {
        self.last_test.as_ref()
    }

    /// Invariants, and the policy's bounds.
    fn check(&self, policy: &PradaPolicy) -> Result<(), String> {
        if self.format != STATE_FORMAT {
            return Err(format!(
                "state format {} is not the supported {STATE_FORMAT}",
                self.format
            ));
        }
        if self.sets.len() > 0 && self.sets.storage() != policy.storage {
            return Err(format!(
                "queries stored as {:?} but the policy says {:?}",
                self.sets.storage(),
                policy.storage
            ));
        }
        self.sets.check(policy.max_stored)?;
        if self.classes.len() > MAX_CLASSES || self.sets.classes_seen() > self.classes.len() {
            return Err("class statistics do not cover the stored classes".into());
        }
        if self.distances.len() > policy.max_distances {
            return Err(format!(
                "{} distances but the policy keeps {}",
                self.distances.len(),
                policy.max_distances
            ));
        }
        if self
            .distances
            .iter()
            .any(|&Distance(c, d)| c as usize >= self.classes.len() || !(d.is_finite() && d >= 0.0))
        {
            return Err("a distance has an unknown class or is not a distance".into());
        }
        if self
            .classes
            .iter()
            .any(|s| !(s.threshold.is_finite() && s.mean.is_finite() && s.m2.is_finite()))
        {
            return Err("a class threshold is not finite".into());
        }
        if self.first_alarm.is_none() && self.alarms > 0 {
            return Err("alarms counted without a first alarm".into());
        }
        Ok(())
    }
}

/// Floats that survive a round trip exactly. JSON parsers need not parse floats to the
/// nearest value (serde_json's default may be one unit off), so in human-readable formats the
/// state writes them as strings in Rust's shortest round-trip form; binary formats get them
/// as they are.
mod exact {
    macro_rules! exact_float {
        ($t:ident) => {
            pub(super) mod $t {
                use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

                pub(crate) fn serialize<S: Serializer>(v: &$t, s: S) -> Result<S::Ok, S::Error> {
                    if s.is_human_readable() {
                        s.serialize_str(&v.to_string())
                    } else {
                        v.serialize(s)
                    }
                }

                pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
                    if d.is_human_readable() {
                        let text = String::deserialize(d)?;
                        text.parse().map_err(D::Error::custom)
                    } else {
                        $t::deserialize(d)
                    }
                }
            }
        };
    }
    exact_float!(f32);
    exact_float!(f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Storage;

    fn policy() -> PradaPolicy {
        let mut p = PradaPolicy::new(0.9, PradaAction::Deny);
        p.storage = Storage::F32;
        p
    }

    #[test]
    fn first_query_of_a_class_is_stored_without_distance() {
        let mut prada = Prada::new(policy()).unwrap();
        let o = prada.observe(&[0.0, 0.0], 3).unwrap();
        assert_eq!((o.distance, o.stored), (None, true));
        let o = prada.observe(&[3.0, 4.0], 3).unwrap();
        assert_eq!((o.distance, o.stored), (Some(5.0), true));
        // DG = {5}: T = 5 − 0 = 5, so a query at distance ≤ 5 from the set is not stored.
        let o = prada.observe(&[3.0, 0.0], 3).unwrap();
        assert_eq!((o.distance, o.stored), (Some(3.0), false));
        let o = prada.observe(&[10.0, 4.0], 3).unwrap();
        assert_eq!((o.distance, o.stored), (Some(7.0), true));
        // DG = {5, 7}: mean 6, std 1, T stays max(5, 5) = 5.
        assert_eq!(prada.state().classes[3].threshold, 5.0);
        assert_eq!(prada.state().stored_in_class(3), 3);
        assert_eq!(prada.state().distances(), 3);
    }

    // algorithms.md §1.3 leaves open whether DG starts empty (paper) or with a 0 (code).
    #[test]
    fn dg_initial_zero_keeps_the_threshold_low() {
        let mut p = policy();
        p.dg_initial_zero = true;
        let mut prada = Prada::new(p).unwrap();
        prada.observe(&[0.0, 0.0], 3).unwrap();
        prada.observe(&[3.0, 4.0], 3).unwrap();
        // DG = {0, 5}: mean 2.5, std 2.5, T = 0, so distance 3 is stored this time.
        assert_eq!(prada.state().classes[3].threshold, 0.0);
        let o = prada.observe(&[3.0, 0.0], 3).unwrap();
        assert_eq!((o.distance, o.stored), (Some(3.0), true));
    }

    #[test]
    fn bad_inputs_leave_the_state_alone() {
        let mut prada = Prada::new(policy()).unwrap();
        prada.observe(&[1.0, 2.0], 0).unwrap();
        let before = prada.state().clone();
        assert_eq!(
            prada.observe(&[1.0], 0),
            Err(Error::DimensionMismatch {
                expected: 2,
                found: 1
            })
        );
        assert_eq!(
            prada.observe(&[f32::NAN, 0.0], 0),
            Err(Error::NonFiniteInput)
        );
        assert_eq!(prada.observe(&[], 0), Err(Error::NonFiniteInput));
        assert_eq!(
            prada.observe(&[1.0, 1.0], MAX_CLASSES),
            Err(Error::ClassOutOfRange { class: MAX_CLASSES })
        );
        assert_eq!(prada.state(), &before);
    }

    #[test]
    fn repeated_query_is_degenerate_and_alarms() {
        let mut p = policy();
        p.test_every = 1;
        let mut prada = Prada::new(p).unwrap();
        let mut alarm_at = None;
        for q in 1..=200u64 {
            let o = prada.observe(&[0.5; 8], 0).unwrap();
            if o.verdict == Verdict::Refuse {
                alarm_at = Some(q);
                break;
            }
        }
        // 1 stored, then distance 0 each time; the test needs more than 100 distances.
        assert_eq!(alarm_at, Some(102));
        assert_eq!(prada.state().first_alarm().unwrap().w, 0.0);
        // Latched: refused without looking.
        let o = prada.observe(&[9.0; 8], 1).unwrap();
        assert_eq!((o.verdict, o.distance), (Verdict::Refuse, None));
    }
}
