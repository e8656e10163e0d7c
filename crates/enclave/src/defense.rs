//! The provider's defenses inside the enclave (`spec/policy.md` §4,
//! `spec/enclave-protocol.md` §5.6 and §7.4): the input detector before the model, PRADA
//! and the output policies after it, and the sealed state that carries PRADA's memory and
//! the detections from one run to the next.
//!
//! [`Defenses`] is what a loaded capsule's policy asks for and never changes; [`Guard`] is
//! the state that each query changes. The rules that keep that state honest are the
//! budget's, applied to a file the host keeps:
//!
//! - **Stamped with the counter.** A sealed state records the value of the query counter
//!   it is current at, and is sealed only right after the counter reached that value. The
//!   host must store the state that comes with every counted answer before it shows the
//!   answer. A state whose stamp is behind the counter (an older copy, or a save lost in a
//!   crash) is loaded, but every query is refused until a top-up resynchronises it, which
//!   records the unobserved queries for the provider: PRADA's history is never lost
//!   silently.
//! - **Detections on their own counters.** Each PRADA alarm, and each query the detector
//!   refuses, advances a monotonic counter of the instance kept for it, before the answer
//!   (or refusal) leaves the enclave. So no state rollback, not even through a
//!   resynchronisation, undoes a `deny` alarm or lowers the counts the provider is told.

use std::ops::Range;

use capsule_attest::Attester;
use capsule_defense::{
    DetectorPolicy, Policy as DefensePolicy, Prada, PradaAction, PradaState, PradaTest,
};
use capsule_engine::{Graph, Tensor};
use capsule_format::{CAPSULE_ID_LEN, DetectorInput, Header, INSTANCE_ID_LEN};
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::Layout;
use crate::protocol::{DefenseStatus, PradaStatus};

/// What a detection counter of an instance counts (§7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detection {
    /// PRADA alarms.
    PradaAlarm,
    /// Queries the input detector refused.
    DetectorRefusal,
}

impl Detection {
    fn label(self) -> &'static [u8] {
        match self {
            Detection::PradaAlarm => b"mlcapsule/v1 prada alarm counter",
            Detection::DetectorRefusal => b"mlcapsule/v1 detector refusal counter",
        }
    }
}

/// The name of an instance's detection counter on its platform (§7.4): the first 16 bytes
/// of `SHA-256(label || instance_id)`, with label `"mlcapsule/v1 prada alarm counter"` or
/// `"mlcapsule/v1 detector refusal counter"`.
pub fn detection_counter_id(
    instance_id: &[u8; INSTANCE_ID_LEN],
    kind: Detection,
) -> [u8; INSTANCE_ID_LEN] {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        &[kind.label(), instance_id.as_slice()].concat(),
    );
    digest.as_ref()[..INSTANCE_ID_LEN]
        .try_into()
        .expect("SHA-256 is longer than an instance id")
}

/// The detection counters' values, where the session has them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counted {
    /// PRADA alarms raised.
    pub alarms: Option<u64>,
    /// Queries the detector refused.
    pub refusals: Option<u64>,
}

/// Associated data of the sealed defense state, followed by the instance id (§7.4).
const DEFENSE_AAD: &[u8] = b"mlcapsule/v1 defense";
/// The version of the sealed defense state's encoding (2: postcard; 1 was JSON).
const DEFENSE_VERSION: u32 = 2;

/// What a loaded capsule's policy asks of every query (spec/policy.md §4).
pub(crate) struct Defenses {
    /// The defense policy, parsed from the capsule's `policy.defense` and validated.
    pub policy: DefensePolicy,
    /// The input detector, when the policy runs one.
    pub detector: Option<DetectorStage>,
    /// The model's layers: those after the detector's (capsule-v1 §4.6).
    pub model_layers: Range<usize>,
}

/// The input detector network and its decision rule.
pub(crate) struct DetectorStage {
    /// Its graph and where its weights are sealed.
    pub layout: Layout,
    /// How its input is made from the model's.
    pub input: DetectorInput,
    /// When it refuses.
    pub rule: DetectorPolicy,
    /// Its layers: the capsule's first ones.
    pub layers: Range<usize>,
}

/// What the detector decided on a query.
pub(crate) enum Verdict {
    /// Every row passed.
    Pass,
    /// This row was flagged (the first one, if several were), with its score.
    Flagged { row: usize, score: f64 },
}

fn rejected(reason: String) -> Error {
    Error::CapsuleRejected { reason }
}

impl Defenses {
    /// Reads the capsule's defense policy and detector and checks them against the model.
    ///
    /// Errors ([`Error::CapsuleRejected`]): a policy this build does not understand (an
    /// unknown table or key is a restriction it could not enforce), a policy that runs a
    /// detector the capsule does not hold, or a model or detector whose inputs and outputs
    /// the defenses cannot work with.
    pub fn new(header: &Header, model: &Layout) -> Result<Defenses, Error> {
        let policy = match &header.policy.defense {
            None => DefensePolicy::default(),
            Some(json) => serde_json::from_value::<DefensePolicy>(json.clone()).map_err(|e| {
                rejected(format!(
                    "the capsule's defense policy is not one this enclave can enforce ({e}); upgrade mlcapsule"
                ))
            })?,
        };
        policy.validate().map_err(|e| {
            rejected(format!(
                "the capsule's defense policy is invalid ({e}); ask the provider for a fixed capsule"
            ))
        })?;
        let first_model_layer = header.detector_layers();
        let model_layers = first_model_layer..header.layers.len();
        let graph = model.plan().graph();
        if !policy.is_empty() && (graph.inputs.len() != 1 || graph.outputs.len() != 1) {
            return Err(rejected(format!(
                "the capsule's defense policy needs a model with one input and one output, this one has {} and {}; ask the provider for a fixed capsule",
                graph.inputs.len(),
                graph.outputs.len()
            )));
        }
        let detector = match (&policy.detector, &header.detector) {
            (Some(rule), Some(sealed)) if rule.enabled => {
                let layout = Layout::detector(header)?
                    .ok_or_else(|| rejected("the capsule's detector has no layout".into()))?;
                check_detector_input(graph, layout.plan().graph())?;
                Some(DetectorStage {
                    layout,
                    input: sealed.input,
                    rule: rule.clone(),
                    layers: 0..first_model_layer,
                })
            }
            (Some(rule), None) if rule.enabled => {
                return Err(rejected(
                    "the capsule's policy runs an input detector but the capsule holds none; ask the provider for a fixed capsule"
                        .into(),
                ));
            }
            _ => None,
        };
        Ok(Defenses {
            policy,
            detector,
            model_layers,
        })
    }

    /// True when the defenses keep state between queries (PRADA, or detector refusals).
    pub fn stateful(&self) -> bool {
        self.policy.prada.is_some() || self.detector.is_some()
    }

    /// True when the released output is not the model's own (spec/policy.md §4 step 4).
    pub fn shapes_output(&self) -> bool {
        self.policy.noise.is_some() || self.policy.output != Default::default()
    }
}

/// The detector takes one input of the model's input's rank, with the same fixed dimensions.
fn check_detector_input(model: &Graph, detector: &Graph) -> Result<(), Error> {
    let [input] = detector.inputs.as_slice() else {
        return Err(rejected(format!(
            "the capsule's input detector takes {} inputs, not one; ask the provider for a fixed capsule",
            detector.inputs.len()
        )));
    };
    let model_input = &model.inputs[0];
    let fits = input.shape.len() == model_input.shape.len()
        && input
            .shape
            .iter()
            .zip(&model_input.shape)
            .all(|(a, b)| a.is_none() || b.is_none() || a == b);
    if !fits || detector.outputs.len() != 1 {
        return Err(rejected(format!(
            "the capsule's input detector does not fit the model (input shape {:?} against {:?}, {} outputs); ask the provider for a fixed capsule",
            input.shape,
            model_input.shape,
            detector.outputs.len()
        )));
    }
    Ok(())
}

impl DetectorStage {
    /// The detector's input: the model's, times `scale`, plus `offset` (capsule-v1 §4.6).
    pub fn input_for(&self, x: &Tensor) -> Result<Tensor, Error> {
        let DetectorInput { scale, offset } = self.input;
        let data = x.data().iter().map(|v| v * scale + offset).collect();
        Tensor::new(x.shape().to_vec(), data).map_err(Error::Engine)
    }

    /// Applies the decision rule (spec/policy.md §3.4) to each of the `n` rows of the
    /// detector's output.
    pub fn decide(&self, outputs: &[Tensor], n: usize) -> Result<Verdict, Error> {
        let failed = |what: String| Error::QueryFailed {
            reason: format!(
                "the capsule's input detector {what}; nothing was counted, ask the provider for a fixed capsule"
            ),
        };
        let scores = outputs
            .first()
            .ok_or_else(|| failed("returned nothing".into()))?;
        if scores.shape().first() != Some(&n) || scores.is_empty() {
            return Err(failed(format!(
                "returned shape {:?} for a batch of {n}",
                scores.shape()
            )));
        }
        for (row, values) in scores.data().chunks_exact(scores.len() / n).enumerate() {
            let decision = capsule_defense::detector::decide(&self.rule, values)
                .map_err(|e| failed(format!("output does not fit the policy ({e})")))?;
            if decision.refuse {
                return Ok(Verdict::Flagged {
                    row,
                    score: decision.score,
                });
            }
        }
        Ok(Verdict::Pass)
    }

    /// The refusal of a flagged query, after it was counted.
    pub fn refusal(&self, row: usize, score: f64) -> Error {
        Error::QueryRefusedDetector {
            reason: format!(
                "the provider's policy refused this query: its input detector flagged input {row} as a crafted query (score {score:.3}, refused from {}); the query was counted and nothing was released; send natural inputs, or ask the provider if this input is genuine",
                self.rule.threshold
            ),
        }
    }
}

/// The defenses' state for one enclave instance: PRADA's memory and the record of
/// detections, stamped with the query counter (§7.4).
pub(crate) struct Guard {
    prada: Option<Prada>,
    /// The counter value the state is current at.
    stamp: u64,
    /// Counted queries the state has not seen; non-zero refuses queries.
    behind: u64,
    detector_refusals: u64,
    unobserved: u64,
    resyncs: u64,
}

/// The sealed state's plaintext (§7.4), to read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SealedDefense {
    version: u32,
    #[serde(with = "hex")]
    capsule_id: [u8; CAPSULE_ID_LEN],
    stamp: u64,
    detector_refusals: u64,
    unobserved: u64,
    resyncs: u64,
    prada: Option<PradaState>,
}

/// The sealed state's plaintext (§7.4), to write without copying PRADA's memory.
#[derive(Serialize)]
struct SealedDefenseRef<'a> {
    version: u32,
    #[serde(with = "hex")]
    capsule_id: &'a [u8; CAPSULE_ID_LEN],
    stamp: u64,
    detector_refusals: u64,
    unobserved: u64,
    resyncs: u64,
    prada: Option<&'a PradaState>,
}

/// Where the guard is sealed to: this platform and binary, this instance, this capsule.
pub(crate) struct Binding<'a> {
    pub attester: &'a dyn Attester,
    pub instance_id: &'a [u8; INSTANCE_ID_LEN],
    pub capsule_id: &'a [u8; CAPSULE_ID_LEN],
}

impl Binding<'_> {
    fn aad(&self) -> Vec<u8> {
        [DEFENSE_AAD, self.instance_id.as_slice()].concat()
    }
}

impl Guard {
    /// The state to run with at counter value `used`: `sealed` if it opens, is for this
    /// capsule and policy and is not ahead of the counter; otherwise a fresh one, stamped 0.
    ///
    /// Either way the guard is `behind` by `used - stamp`: a state that does not open is
    /// treated as missing, which at `used = 0` is simply the first run.
    pub fn open(
        policy: &DefensePolicy,
        sealed: Option<&[u8]>,
        binding: &Binding<'_>,
        used: u64,
    ) -> Result<Guard, Error> {
        let opened = sealed.and_then(|bytes| Guard::unseal(policy, bytes, binding));
        let mut guard = match opened {
            Some(guard) if guard.stamp <= used => guard,
            _ => Guard {
                prada: policy
                    .prada
                    .clone()
                    .map(Prada::new)
                    .transpose()
                    .map_err(|e| rejected(format!("the capsule's PRADA policy: {e}")))?,
                stamp: 0,
                behind: 0,
                detector_refusals: 0,
                unobserved: 0,
                resyncs: 0,
            },
        };
        guard.behind = used - guard.stamp;
        Ok(guard)
    }

    fn unseal(policy: &DefensePolicy, bytes: &[u8], binding: &Binding<'_>) -> Option<Guard> {
        let plaintext = binding.attester.unseal(&binding.aad(), bytes).ok()?;
        let (state, rest): (SealedDefense, _) = postcard::take_from_bytes(&plaintext).ok()?;
        if !rest.is_empty() {
            return None;
        }
        if state.version != DEFENSE_VERSION || state.capsule_id != *binding.capsule_id {
            return None;
        }
        let prada = match (&policy.prada, state.prada) {
            (Some(p), Some(s)) => Some(Prada::restore(p.clone(), s).ok()?),
            (None, None) => None,
            _ => return None,
        };
        Some(Guard {
            prada,
            stamp: state.stamp,
            behind: 0,
            detector_refusals: state.detector_refusals,
            unobserved: state.unobserved,
            resyncs: state.resyncs,
        })
    }

    /// Seals the state (§7.4).
    pub fn seal(&self, binding: &Binding<'_>) -> Result<Vec<u8>, Error> {
        let plaintext = postcard::to_stdvec(&SealedDefenseRef {
            version: DEFENSE_VERSION,
            capsule_id: binding.capsule_id,
            stamp: self.stamp,
            detector_refusals: self.detector_refusals,
            unobserved: self.unobserved,
            resyncs: self.resyncs,
            prada: self.prada.as_ref().map(Prada::state),
        })
        .map_err(|e| Error::Internal {
            reason: format!("defense state does not serialise: {e}"),
        })?;
        binding
            .attester
            .seal(&binding.aad(), &plaintext)
            .map_err(|e| Error::Platform {
                reason: e.to_string(),
            })
    }

    /// Alarms raised: the alarm counter's value when there is one, else the state's count.
    fn alarms(&self, counted: Counted) -> u64 {
        let recorded = self.prada.as_ref().map_or(0, |p| p.state().alarms());
        counted.alarms.unwrap_or(0).max(recorded)
    }

    /// True when PRADA refuses every query: an alarm was raised under `deny`.
    fn denying(&self, counted: Counted) -> bool {
        self.prada.as_ref().is_some_and(|p| {
            p.policy().action == PradaAction::Deny
                && (p.refusing() || counted.alarms.is_some_and(|a| a > 0))
        })
    }

    /// May a query run? Refused, uncounted, when the state is behind the counter or a
    /// `deny` alarm was raised; such a refusal depends on nothing in the query.
    pub fn admit(&self, counted: Counted) -> Result<(), Error> {
        if self.behind > 0 {
            return Err(Error::DefenseStateStale {
                behind: self.behind,
            });
        }
        if self.denying(counted) {
            let when = self
                .prada
                .as_ref()
                .and_then(|p| p.state().first_alarm())
                .map(|t| format!(" at query {}", t.query))
                .unwrap_or_default();
            return Err(Error::QueryRefusedPrada {
                reason: format!(
                    "the provider's policy refuses every query since PRADA flagged this client's queries as a model-extraction attack{when}; nothing was counted; contact the provider"
                ),
            });
        }
        Ok(())
    }

    /// Runs PRADA on each row of `inputs` with the model's predicted class for it
    /// (spec/policy.md §4 step 3). Returns the alarms raised and, under `deny`, the test
    /// that refuses the query.
    pub fn observe(
        &mut self,
        inputs: &Tensor,
        posteriors: &Tensor,
        n: usize,
    ) -> Result<(u64, Option<PradaTest>), Error> {
        let Some(prada) = self.prada.as_mut() else {
            return Ok((0, None));
        };
        let before = prada.state().alarms();
        let mut refused = None;
        let rows = inputs.data().chunks_exact(inputs.len() / n);
        let classes = posteriors.data().chunks_exact(posteriors.len() / n);
        for (x, p) in rows.zip(classes) {
            let class = capsule_defense::argmax(p).unwrap_or(0);
            let observation = prada.observe(x, class).map_err(|e| Error::InvalidInput {
                reason: format!("the provider's PRADA policy cannot observe it: {e}"),
            })?;
            if observation.verdict == capsule_defense::Verdict::Refuse && refused.is_none() {
                refused = prada.state().first_alarm().copied();
            }
        }
        Ok((prada.state().alarms() - before, refused))
    }

    /// The refusal of the query that raised a `deny` alarm, after it was counted.
    pub fn prada_refusal(&self, test: &PradaTest) -> Error {
        let delta = self.prada.as_ref().map_or(0.0, |p| p.policy().delta);
        Error::QueryRefusedPrada {
            reason: format!(
                "the provider's policy refused this query: PRADA flagged this client's queries as a model-extraction attack (Shapiro-Wilk W = {:.4} < {delta} over {} distances at query {}); the query was counted and every later query will be refused; contact the provider",
                test.w, test.distances, test.query
            ),
        }
    }

    /// PRADA's state, when the policy has `[prada]`.
    pub fn prada_state(&self) -> Option<&PradaState> {
        self.prada.as_ref().map(Prada::state)
    }

    /// Records a query the detector refused.
    pub fn record_detector_refusal(&mut self) {
        self.detector_refusals += 1;
    }

    /// Makes the state current at counter value `used`, after a counted query.
    pub fn advance(&mut self, used: u64) {
        self.stamp = used;
        self.behind = 0;
    }

    /// True when the state is behind the counter.
    pub fn behind(&self) -> bool {
        self.behind > 0
    }

    /// Accepts the state as it is at counter value `used` (a top-up's resynchronisation,
    /// §7.4): the queries it missed are added to `unobserved`, for the provider to see.
    pub fn resync(&mut self, used: u64) {
        self.unobserved += self.behind;
        self.resyncs += 1;
        self.stamp = used;
        self.behind = 0;
    }

    /// The status `Status` reports (§5.7).
    pub fn status(&self, defenses: &Defenses, counted: Counted) -> DefenseStatus {
        DefenseStatus {
            stamp: self.stamp,
            behind: self.behind,
            prada: self.prada.as_ref().map(|p| PradaStatus {
                observed: p.state().queries(),
                stored: p.state().stored() as u64,
                alarms: self.alarms(counted),
                first_alarm: p.state().first_alarm().copied(),
                last_test: p.state().last_test().copied(),
                denying: self.denying(counted),
            }),
            detector_refusals: defenses
                .detector
                .as_ref()
                .map(|_| counted.refusals.unwrap_or(0).max(self.detector_refusals)),
            unobserved: self.unobserved,
            resyncs: self.resyncs,
        }
    }
}
