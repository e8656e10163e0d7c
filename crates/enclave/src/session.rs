//! The enclave's side of the protocol (`spec/enclave-protocol.md` §5): the
//! paper's ECALLs, each a handler of one request frame.
//!
//! A [`Session`] owns everything secret: the setup key, the licence (with the
//! model key), the unsealer of the loaded capsule. It gets every byte from
//! the host and gives back only public values, sealed blobs and outputs whose
//! queries were counted, each with the defense state that goes with it.

use std::io::{BufReader, Read, Write};

use capsule_attest::{Attester, MonotonicCounter, SIM};
use capsule_engine::{Graph, Tensor};
use capsule_format::{EnclaveKey, INSTANCE_ID_LEN, TopUp, Unsealer, report_data};
use serde::Serialize;

use crate::defense::{Binding, Counted, Defenses, Guard, Verdict};
use crate::error::Error;
use crate::ledger::{Ledger, today_utc};
use crate::model::{Layout, Weights};
use crate::protocol::{
    self, AttestRequest, DefenseStamp, Empty, EnclavePublic, Frame, FrameReader, Hello,
    LoadRequest, MAX_NONCE_LEN, MessageType, OutputReport, PROTOCOL_VERSION, ProvisionRequest,
    Provisioned, QueryRequest, ReadError, Ready, Status, TopUpRequest, ToppedUp,
};
use crate::stream::{FrameFeed, LayerStream, StreamFailure};

/// Largest sealed defense state the enclave keeps: with a 16 MiB capsule header it still
/// fits in one `Load` frame (§2, §7.4).
pub const MAX_DEFENSE_STATE: usize = 48 * 1024 * 1024;

/// One enclave instance serving one host over a byte channel.
pub struct Session {
    attester: Box<dyn Attester>,
    counter: Box<dyn MonotonicCounter>,
    /// Count PRADA alarms and detector refusals, so that no state rollback undoes one
    /// (§7.4).
    detection_counters: Option<DetectionCounters>,
    instance_id: [u8; INSTANCE_ID_LEN],
    setup_key: Option<EnclaveKey>,
    ledger: Option<Ledger>,
    loaded: Option<Loaded>,
    /// The most plaintext weight memory a query may hold at once, in bytes.
    memory_budget: Option<u64>,
}

/// A capsule whose header MAC was checked with the licence's model key.
struct Loaded {
    unsealer: Unsealer,
    layout: Layout,
    /// What its policy asks of every query.
    defenses: Defenses,
    /// The defenses' state, when they keep one.
    guard: Option<Guard>,
    /// The buffers the model's and the detector's layers are unsealed into, kept from
    /// query to query (zeroized between uses).
    model_weights: Weights,
    detector_weights: Weights,
}

/// A reply frame, ready to write.
struct Reply {
    kind: MessageType,
    json: Vec<u8>,
    blob: Vec<u8>,
}

impl Reply {
    fn new<T: Serialize>(kind: MessageType, control: &T) -> Result<Reply, Error> {
        let json = serde_json::to_vec(control).map_err(|e| Error::Internal {
            reason: format!("reply does not serialise: {e}"),
        })?;
        Ok(Reply {
            kind,
            json,
            blob: Vec::new(),
        })
    }
}

/// Why a request got no reply frame of its own.
enum Failure {
    /// Report it in an `Error` frame (then exit if it is fatal).
    Refused(Error),
    /// The host is gone: stop without a word.
    Gone,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Refused(e)
    }
}

/// A request, parsed out of its frame so that the frame buffer is free again.
enum Request {
    SetupKey,
    Attest(AttestRequest),
    Provision(ProvisionRequest),
    Load(LoadRequest, Vec<u8>),
    Query(Vec<Tensor>),
    Status,
    TopUp(TopUpRequest),
}

impl Session {
    /// A session for enclave instance `instance_id`, whose counter is `counter`.
    pub fn new(
        attester: Box<dyn Attester>,
        counter: Box<dyn MonotonicCounter>,
        instance_id: [u8; INSTANCE_ID_LEN],
    ) -> Session {
        Session {
            attester,
            counter,
            detection_counters: None,
            instance_id,
            setup_key: None,
            ledger: None,
            loaded: None,
            memory_budget: None,
        }
    }

    /// Caps the plaintext weight memory a query holds at once at `bytes` (§8.1
    /// `--memory-budget`): dense layers larger than that are computed chunk by chunk,
    /// buffers are freed after each layer instead of kept, and a query the budget cannot
    /// hold is refused, naming the layer, before anything is counted.
    pub fn with_memory_budget(mut self, bytes: Option<u64>) -> Session {
        self.memory_budget = bytes;
        self
    }

    /// Gives the session the instance's detection counters: monotonic counters that each
    /// PRADA alarm and each detector refusal advance before the answer leaves the enclave
    /// (§7.4). Without them, detections live only in the sealed defense state.
    pub fn with_detection_counters(
        mut self,
        prada_alarms: Box<dyn MonotonicCounter>,
        detector_refusals: Box<dyn MonotonicCounter>,
    ) -> Session {
        self.detection_counters = Some(DetectionCounters {
            alarms: prada_alarms,
            refusals: detector_refusals,
        });
        self
    }

    /// The detection counters' values.
    fn counted(&self) -> Counted {
        counted(self.detection_counters.as_ref())
    }

    /// What `Ready` says about this enclave.
    pub fn ready(&self) -> Ready {
        let platform = self.attester.platform();
        Ready {
            version: PROTOCOL_VERSION,
            platform: platform.to_owned(),
            measurement: self.attester.measurement(),
            instance_id: self.instance_id,
            sim: platform == SIM,
        }
    }

    /// Serves the protocol until the host closes `input` (§4, §5).
    ///
    /// Returns `Ok` when the host closed the channel or went away, and the
    /// error after reporting it when the session cannot go on (a malformed
    /// frame, a version mismatch).
    pub fn serve<R: Read + Send, W: Write>(
        &mut self,
        input: R,
        mut output: W,
    ) -> Result<(), Error> {
        let mut frames = FrameReader::new(BufReader::with_capacity(1 << 16, input));
        match self.handshake(&mut frames, &mut output) {
            Ok(()) => {}
            Err(Failure::Gone) => return Ok(()),
            Err(Failure::Refused(e)) => {
                let _ = protocol::write_error(&mut output, &e);
                return Err(e);
            }
        }
        loop {
            let request = match frames.read() {
                Ok(frame) => parse(&frame),
                Err(ReadError::Closed | ReadError::Io(_)) => return Ok(()),
                Err(ReadError::Malformed(e)) => Err(e),
            };
            let result = match request {
                Ok(request) => self.handle(request, &mut frames, &mut output),
                Err(e) => Err(Failure::Refused(e)),
            };
            let written = match result {
                Ok(reply) => {
                    protocol::write_raw_frame(&mut output, reply.kind, &reply.json, &reply.blob)
                }
                Err(Failure::Gone) => return Ok(()),
                Err(Failure::Refused(e)) => {
                    let written = protocol::write_error(&mut output, &e);
                    if e.is_fatal() {
                        return Err(e);
                    }
                    written
                }
            };
            if written.is_err() {
                return Ok(());
            }
        }
    }

    fn handshake<R: Read + Send, W: Write>(
        &mut self,
        frames: &mut FrameReader<R>,
        output: &mut W,
    ) -> Result<(), Failure> {
        let frame = match frames.read() {
            Ok(frame) => frame,
            Err(ReadError::Closed | ReadError::Io(_)) => return Err(Failure::Gone),
            Err(ReadError::Malformed(e)) => return Err(e.into()),
        };
        if frame.kind != MessageType::Hello {
            return Err(Error::Protocol {
                reason: format!("the first frame must be Hello, got {:?}", frame.kind),
            }
            .into());
        }
        let hello: Hello = frame.control()?;
        if hello.version != PROTOCOL_VERSION {
            return Err(Error::UnsupportedVersion {
                expected: PROTOCOL_VERSION,
                found: hello.version,
            }
            .into());
        }
        protocol::write_frame(output, MessageType::Ready, &self.ready(), &[])
            .map_err(|_| Failure::Gone)
    }

    fn handle<R: Read + Send, W: Write>(
        &mut self,
        request: Request,
        frames: &mut FrameReader<R>,
        output: &mut W,
    ) -> Result<Reply, Failure> {
        Ok(match request {
            Request::SetupKey => self.setup_key()?,
            Request::Attest(req) => self.attest(&req)?,
            Request::Provision(req) => self.provision(&req)?,
            Request::Load(req, prefix) => self.load(&req, &prefix)?,
            Request::Query(inputs) => return self.query(&inputs, frames, output),
            Request::Status => Reply::new(MessageType::StatusReport, &self.status()?)?,
            Request::TopUp(req) => self.topup(&req, output)?,
        })
    }

    /// `SetupKey` (§5.2): a fresh key pair, the secret kept here.
    fn setup_key(&mut self) -> Result<Reply, Error> {
        let key = EnclaveKey::generate();
        let public = key.public();
        self.setup_key = Some(key);
        Reply::new(
            MessageType::EnclaveKey,
            &EnclavePublic {
                enclave_public: public,
            },
        )
    }

    /// `Attest` (§5.3): evidence binding the setup key, this instance and the nonce.
    fn attest(&mut self, req: &AttestRequest) -> Result<Reply, Error> {
        check_nonce(&req.nonce)?;
        let key = self.setup_key.as_ref().ok_or(Error::NoEnclaveKey)?;
        let data = report_data(&key.public(), &self.instance_id, &req.nonce);
        let evidence = self.attester.attest(&data).map_err(platform)?;
        Reply::new(MessageType::Evidence, &evidence)
    }

    /// `Provision` (§5.4): open the grant, bind it to this instance, seal the state.
    fn provision(&mut self, req: &ProvisionRequest) -> Result<Reply, Error> {
        check_nonce(&req.nonce)?;
        let key = self.setup_key.as_ref().ok_or(Error::NoEnclaveKey)?;
        let grant = key
            .open_grant(&req.sealed_grant, &req.nonce)
            .map_err(|_| Error::InvalidGrant)?;
        if grant.instance_id != self.instance_id {
            return Err(Error::GrantWrongInstance);
        }
        let ledger = Ledger::new(grant);
        let sealed_state = ledger.seal(&*self.attester, &self.instance_id)?;
        // The setup key has done its one job; a new setup needs a new key.
        self.setup_key = None;
        self.ledger = Some(ledger);
        self.loaded = None;
        Reply::new(MessageType::Provisioned, &Provisioned { sealed_state })
    }

    /// `Load` (§5.5): unseal the state and authenticate the capsule's header; read the
    /// policy's defenses and their sealed state (§7.4), if any.
    fn load(&mut self, req: &LoadRequest, blob: &[u8]) -> Result<Reply, Error> {
        let split = usize::try_from(req.defense_len)
            .ok()
            .and_then(|n| blob.len().checked_sub(n))
            .ok_or_else(|| Error::Protocol {
                reason: format!(
                    "defense_len {} is more than the {}-byte blob",
                    req.defense_len,
                    blob.len()
                ),
            })?;
        let (prefix, sealed_defense) = blob.split_at(split);
        let ledger = Ledger::unseal(&*self.attester, &self.instance_id, &req.sealed_state)?;
        let key = ledger.grant.model_key().map_err(|_| Error::StateRejected)?;
        let licensed = hex::encode(ledger.grant.capsule_id);
        let unsealer = Unsealer::open_prefix(prefix, &key).map_err(|e| match e {
            // A key that does not fit is, for a licence, another capsule.
            capsule_format::Error::WrongKey => Error::CapsuleMismatch {
                licensed: licensed.clone(),
                found: peek_capsule_id(prefix).unwrap_or_else(|| "(unreadable)".into()),
            },
            e => Error::Format(e),
        })?;
        if unsealer.header().capsule_id != ledger.grant.capsule_id {
            return Err(Error::CapsuleMismatch {
                licensed,
                found: hex::encode(unsealer.header().capsule_id),
            });
        }
        let unfit = |e| match e {
            Error::Engine(e) => Error::CapsuleRejected {
                reason: format!(
                    "{e}; the capsule does not fit its own architecture, get a fresh copy from the provider"
                ),
            },
            e => e,
        };
        let layout = Layout::new(unsealer.header()).map_err(unfit)?;
        let defenses = Defenses::new(unsealer.header(), &layout).map_err(unfit)?;
        check_state_bound(&defenses, &layout)?;
        let guard = if defenses.stateful() {
            let binding = Binding {
                attester: &*self.attester,
                instance_id: &self.instance_id,
                capsule_id: &unsealer.header().capsule_id,
            };
            let sealed = (!sealed_defense.is_empty()).then_some(sealed_defense);
            Some(Guard::open(
                &defenses.policy,
                sealed,
                &binding,
                self.counter.value(),
            )?)
        } else {
            None
        };
        let pool = |layout: &Layout| {
            let weights = Weights::new(layout.plan().graph().params.len());
            if self.memory_budget.is_some() {
                weights.freeing()
            } else {
                weights
            }
        };
        let model_weights = pool(&layout);
        let detector_weights = match &defenses.detector {
            Some(stage) => pool(&stage.layout),
            None => Weights::new(0),
        };
        self.ledger = Some(ledger);
        self.loaded = Some(Loaded {
            unsealer,
            layout,
            defenses,
            guard,
            model_weights,
            detector_weights,
        });
        Reply::new(MessageType::StatusReport, &self.status()?)
    }

    /// `Query` (§5.6): check the budget and the defenses' standing, pull the layers, run
    /// the detector, the model, PRADA and the output policy, count, answer.
    fn query<R: Read + Send, W: Write>(
        &mut self,
        inputs: &[Tensor],
        frames: &mut FrameReader<R>,
        output: &mut W,
    ) -> Result<Reply, Failure> {
        let ledger = self.ledger.as_ref().ok_or(Error::NotProvisioned)?;
        let loaded = self.loaded.as_mut().ok_or(Error::CapsuleNotLoaded)?;
        let n = batch_size(loaded.layout.plan().graph(), inputs)?;
        let terms = ledger.terms(Some(&loaded.unsealer.header().policy));
        let used = self.counter.value();
        // Refuse before computing anything.
        terms.allow(used, n, &today_utc())?;
        let counted = counted(self.detection_counters.as_ref());
        let Loaded {
            unsealer,
            layout,
            defenses,
            guard,
            model_weights,
            detector_weights,
        } = loaded;
        if let Some(guard) = guard.as_ref() {
            guard.admit(counted)?;
        }
        if defenses.policy.prada.is_some() && inputs[0].data().iter().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput {
                reason:
                    "it holds NaN or infinity, which the provider's PRADA policy cannot measure"
                        .into(),
            }
            .into());
        }
        let detector_input = match &defenses.detector {
            Some(stage) => Some(stage.input_for(&inputs[0])?),
            None => None,
        };
        // The model's layers: without a detector stage its stream drains the detector's.
        let layers = match &defenses.detector {
            Some(_) => defenses.model_layers.clone(),
            None => 0..defenses.model_layers.end,
        };
        let threads = capsule_engine::threads();
        let budget = self.memory_budget;
        let (model_streamed, _) = layout.query_plan(layers.clone(), n as usize, budget, threads)?;
        let detector_streamed = match &defenses.detector {
            Some(stage) => {
                stage
                    .layout
                    .query_plan(stage.layers.clone(), n as usize, budget, threads)?
                    .0
            }
            None => Vec::new(),
        };
        protocol::write_frame(output, MessageType::SendLayers, &Empty {}, &[])
            .map_err(|_| Failure::Gone)?;

        // 1. The input detector, on the capsule's first layers (policy §4 step 1).
        let detection = match (&defenses.detector, detector_input) {
            (Some(stage), Some(x)) => {
                let mut stream = LayerStream::new(
                    FrameFeed::new(frames),
                    unsealer,
                    &stage.layout,
                    stage.layers.clone(),
                    detector_weights,
                    detector_streamed,
                    budget,
                );
                let result = stream.run(&[x]);
                match stream.finish() {
                    Ok(()) => result
                        .map_err(|e| Error::QueryFailed {
                            reason: format!(
                                "the capsule's input detector failed on this input ({e}); nothing was counted"
                            ),
                        })
                        .and_then(|scores| stage.decide(&scores, n as usize)),
                    Err(StreamFailure::Gone) => return Err(Failure::Gone),
                    Err(StreamFailure::Broken(e)) => return Err(e.into()),
                    Err(StreamFailure::Rejected(e)) => Err(e),
                }
            }
            _ => Ok(Verdict::Pass),
        };
        // 2. The model (step 2), unless the detector refused: then its layers are drained
        // unopened.
        let mut stream = LayerStream::new(
            FrameFeed::new(frames),
            unsealer,
            layout,
            layers,
            model_weights,
            model_streamed,
            budget,
        );
        let result = matches!(detection, Ok(Verdict::Pass)).then(|| stream.run(inputs));
        match stream.finish() {
            Ok(()) => {}
            Err(StreamFailure::Gone) => return Err(Failure::Gone),
            Err(StreamFailure::Broken(e) | StreamFailure::Rejected(e)) => return Err(e.into()),
        }

        let after = used + n;
        let outcome = match (detection?, result) {
            (Verdict::Flagged { row, score }, _) => {
                let stage = defenses.detector.as_ref().expect("only a detector flags");
                if let Some(guard) = guard.as_mut() {
                    guard.record_detector_refusal();
                }
                Outcome {
                    alarms: 0,
                    refused_by_detector: true,
                    answer: Err(stage.refusal(row, score)),
                }
            }
            (Verdict::Pass, Some(result)) => {
                let mut outputs = result.map_err(|e| Error::QueryFailed {
                    reason: format!("the model failed on this input ({e}); nothing was counted"),
                })?;
                released(
                    defenses,
                    guard.as_mut(),
                    &inputs[0],
                    &mut outputs,
                    n as usize,
                )?
            }
            (Verdict::Pass, None) => unreachable!("the model runs when the detector passes"),
        };
        if let Ok(outputs) = &outcome.answer {
            // Before counting; the status is well under the margin.
            let bytes = 4 * outputs.iter().map(Tensor::len).sum::<usize>();
            if protocol::frame_len(STATUS_MARGIN, bytes).is_none() {
                return Err(Error::QueryFailed {
                    reason: format!(
                        "the output ({bytes} bytes) does not fit in one {}-byte frame; nothing was counted, send a smaller batch",
                        protocol::MAX_FRAME_LEN
                    ),
                }
                .into());
            }
        }

        // Count before releasing anything: the detections, then the queries. A crash from
        // here on costs the client, never the provider.
        if let Some(counters) = self.detection_counters.as_mut() {
            let alarms_after = counters.alarms.value() + outcome.alarms;
            count(&mut *counters.alarms, outcome.alarms, alarms_after)?;
            let refusals = u64::from(outcome.refused_by_detector);
            let refusals_after = counters.refusals.value() + refusals;
            count(&mut *counters.refusals, refusals, refusals_after)?;
        }
        count(&mut *self.counter, n, after)?;
        if let Some(guard) = guard.as_mut() {
            guard.advance(after);
            let binding = Binding {
                attester: &*self.attester,
                instance_id: &self.instance_id,
                capsule_id: &unsealer.header().capsule_id,
            };
            let sealed = guard.seal(&binding)?;
            protocol::write_frame(
                output,
                MessageType::DefenseState,
                &DefenseStamp { stamp: after },
                &sealed,
            )
            .map_err(|_| Failure::Gone)?;
        }
        let outputs = outcome.answer?;
        let report = OutputReport {
            outputs: outputs.iter().map(|t| t.shape().to_vec()).collect(),
            status: self.status_at(after)?,
        };
        let mut reply = Reply::new(MessageType::Output, &report)?;
        reply.blob = protocol::encode_tensors(&outputs);
        Ok(reply)
    }

    /// `Status` (§5.7).
    fn status(&self) -> Result<Status, Error> {
        self.status_at(self.counter.value())
    }

    fn status_at(&self, used: u64) -> Result<Status, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::NotProvisioned)?;
        let policy = self.loaded.as_ref().map(|l| &l.unsealer.header().policy);
        let terms = ledger.terms(policy);
        Ok(Status {
            licence_id: ledger.grant.licence_id.clone(),
            instance_id: self.instance_id,
            used,
            total: terms.total,
            left: terms.total.saturating_sub(used),
            expires: terms.expires,
            platform: self.attester.platform().to_owned(),
            topup_seq: ledger.topup_seq,
            defense: self.loaded.as_ref().and_then(|l| {
                l.guard
                    .as_ref()
                    .map(|g| g.status(&l.defenses, self.counted()))
            }),
        })
    }

    /// `TopUp` (§5.8): verify, apply, reseal; resynchronise a defense state that is behind
    /// the counter (§7.4) and send it first.
    fn topup<W: Write>(&mut self, req: &TopUpRequest, output: &mut W) -> Result<Reply, Failure> {
        let current = self.ledger.as_ref().ok_or(Error::NotProvisioned)?;
        let token = TopUp::verify(&req.token, &current.grant.server_key)
            .map_err(|_| Error::InvalidToken)?;
        let mut next = current.clone();
        next.apply(&token)?;
        let sealed_state = next.seal(&*self.attester, &self.instance_id)?;
        self.ledger = Some(next);
        let used = self.counter.value();
        if let Some(loaded) = self.loaded.as_mut()
            && let Some(guard) = loaded.guard.as_mut()
            && guard.behind()
        {
            guard.resync(used);
            let binding = Binding {
                attester: &*self.attester,
                instance_id: &self.instance_id,
                capsule_id: &loaded.unsealer.header().capsule_id,
            };
            let sealed = guard.seal(&binding)?;
            protocol::write_frame(
                output,
                MessageType::DefenseState,
                &DefenseStamp { stamp: used },
                &sealed,
            )
            .map_err(|_| Failure::Gone)?;
        }
        Ok(Reply::new(
            MessageType::ToppedUp,
            &ToppedUp {
                sealed_state,
                status: self.status()?,
            },
        )?)
    }
}

/// Room left in an `Output` frame for its JSON (the shapes and the status) when the
/// enclave checks, before counting, that the output fits.
const STATUS_MARGIN: usize = 64 * 1024;

/// The instance's detection counters (§7.4).
struct DetectionCounters {
    alarms: Box<dyn MonotonicCounter>,
    refusals: Box<dyn MonotonicCounter>,
}

fn counted(counters: Option<&DetectionCounters>) -> Counted {
    Counted {
        alarms: counters.map(|c| c.alarms.value()),
        refusals: counters.map(|c| c.refusals.value()),
    }
}

/// What a query that ran produced, before it is counted.
struct Outcome {
    /// PRADA alarms it raised (under `record` too).
    alarms: u64,
    /// The input detector refused it.
    refused_by_detector: bool,
    /// The outputs to release, or the refusal to send instead.
    answer: Result<Vec<Tensor>, Error>,
}

/// PRADA and the output policy on the model's outputs (spec/policy.md §4 steps 3 and 4).
/// An `Err` is a failure that nothing is counted for; a refusal is in the outcome.
fn released(
    defenses: &Defenses,
    guard: Option<&mut Guard>,
    input: &Tensor,
    outputs: &mut [Tensor],
    n: usize,
) -> Result<Outcome, Error> {
    let observes = defenses.policy.prada.is_some() && guard.is_some();
    if !(observes || defenses.shapes_output()) {
        return Ok(Outcome {
            alarms: 0,
            refused_by_detector: false,
            answer: Ok(outputs.to_vec()),
        });
    }
    let posteriors = &outputs[0];
    if posteriors.shape().len() != 2 || posteriors.shape()[0] != n || posteriors.is_empty() {
        return Err(Error::QueryFailed {
            reason: format!(
                "the provider's policy needs the model to output [batch, classes], it gave {:?}; nothing was counted, ask the provider for a fixed capsule",
                posteriors.shape()
            ),
        });
    }
    let mut alarms = 0;
    if let Some(guard) = guard {
        let (raised, refused) = guard.observe(input, posteriors, n)?;
        alarms = raised;
        if let Some(test) = refused {
            return Ok(Outcome {
                alarms,
                refused_by_detector: false,
                answer: Err(guard.prada_refusal(&test)),
            });
        }
    }
    if defenses.shapes_output() {
        let classes = posteriors.shape()[1];
        let mut data = Vec::with_capacity(posteriors.len());
        for row in posteriors.data().chunks_exact(classes) {
            let out = capsule_defense::apply(&defenses.policy, row).map_err(|e| {
                Error::QueryFailed {
                    reason: format!(
                        "the provider's output policy does not fit this model ({e}); nothing was counted, ask the provider for a fixed capsule"
                    ),
                }
            })?;
            data.extend(out);
        }
        outputs[0] = Tensor::new(posteriors.shape().to_vec(), data).map_err(Error::Engine)?;
    }
    Ok(Outcome {
        alarms,
        refused_by_detector: false,
        answer: Ok(outputs.to_vec()),
    })
}

/// Advances `counter` `n` times, each durable before the next, and checks it reads `after`.
fn count(counter: &mut dyn MonotonicCounter, n: u64, after: u64) -> Result<(), Error> {
    for _ in 0..n {
        counter.increment().map_err(|e| Error::CounterFailed {
            reason: e.to_string(),
        })?;
    }
    if counter.value() != after {
        return Err(Error::CounterFailed {
            reason: format!(
                "the counter reads {} after counting, expected {after}",
                counter.value()
            ),
        });
    }
    Ok(())
}

/// The sealed PRADA state must fit in [`MAX_DEFENSE_STATE`]: its memory bound for the
/// model's input, doubled for the JSON and base64 it is sealed as.
fn check_state_bound(defenses: &Defenses, layout: &Layout) -> Result<(), Error> {
    let Some(prada) = &defenses.policy.prada else {
        return Ok(());
    };
    let input = &layout.plan().graph().inputs[0];
    // Dynamic dimensions other than the batch cannot be bounded here.
    let Some(dim) = input.shape[1..]
        .iter()
        .try_fold(1usize, |acc, d| d.and_then(|d| acc.checked_mul(d)))
    else {
        return Ok(());
    };
    let bound = prada.memory_bound(dim, 1000).saturating_mul(2);
    if bound > MAX_DEFENSE_STATE {
        return Err(Error::CapsuleRejected {
            reason: format!(
                "the capsule's PRADA policy may keep {bound} bytes of state, more than the enclave's {MAX_DEFENSE_STATE}; ask the provider for a capsule with a lower prada.max_stored"
            ),
        });
    }
    Ok(())
}

/// Parses a request frame (§5); anything but a request is a protocol violation.
fn parse(frame: &Frame<'_>) -> Result<Request, Error> {
    Ok(match frame.kind {
        MessageType::SetupKey => {
            frame.control::<Empty>()?;
            Request::SetupKey
        }
        MessageType::Attest => Request::Attest(frame.control()?),
        MessageType::Provision => Request::Provision(frame.control()?),
        MessageType::Load => Request::Load(frame.json_part()?, frame.blob.to_vec()),
        MessageType::Query => {
            let req: QueryRequest = frame.json_part()?;
            Request::Query(protocol::decode_tensors(&req.inputs, frame.blob)?)
        }
        MessageType::Status => {
            frame.control::<Empty>()?;
            Request::Status
        }
        MessageType::TopUp => Request::TopUp(frame.control()?),
        kind => {
            return Err(Error::Protocol {
                reason: format!("unexpected {kind:?} frame"),
            });
        }
    })
}

/// Checks the inputs against the graph and returns the batch size: the first
/// dimension of the first input, which every query is charged for (§7.2).
fn batch_size(graph: &Graph, inputs: &[Tensor]) -> Result<u64, Error> {
    let invalid = |reason: String| Error::InvalidInput { reason };
    if inputs.len() != graph.inputs.len() {
        return Err(invalid(format!(
            "the model takes {} inputs, got {}",
            graph.inputs.len(),
            inputs.len()
        )));
    }
    for (info, x) in graph.inputs.iter().zip(inputs) {
        let fits = info.shape.len() == x.shape().len()
            && info
                .shape
                .iter()
                .zip(x.shape())
                .all(|(want, &got)| want.is_none_or(|w| w == got));
        if !fits {
            let dims: Vec<String> = (info.shape.iter())
                .map(|d| d.map_or("?".into(), |d| d.to_string()))
                .collect();
            return Err(invalid(format!(
                "input '{}' must have shape [{}], got {:?}",
                info.name,
                dims.join(", "),
                x.shape()
            )));
        }
    }
    let n = inputs
        .first()
        .and_then(|x| x.shape().first())
        .copied()
        .unwrap_or(0);
    if n == 0 {
        return Err(invalid("the batch is empty".into()));
    }
    Ok(n as u64)
}

fn check_nonce(nonce: &[u8]) -> Result<(), Error> {
    if nonce.is_empty() || nonce.len() > MAX_NONCE_LEN {
        return Err(Error::Protocol {
            reason: format!(
                "the nonce is {} bytes, not 1 ..= {MAX_NONCE_LEN}",
                nonce.len()
            ),
        });
    }
    Ok(())
}

fn platform(e: capsule_attest::Error) -> Error {
    Error::Platform {
        reason: e.to_string(),
    }
}

/// The capsule id in an unauthenticated prefix (capsule-v1 §3, §4), for an
/// error message only.
fn peek_capsule_id(prefix: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        capsule_id: String,
    }
    let start = capsule_format::VERSION_LINE.len() + 4;
    let len = u32::from_be_bytes(prefix.get(start - 4..start)?.try_into().ok()?) as usize;
    let header = prefix.get(start..start.checked_add(len)?)?;
    let peek: Peek = serde_json::from_slice(header).ok()?;
    Some(peek.capsule_id).filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
}
