//! The enclave's side of the protocol (`spec/enclave-protocol.md` §5): the
//! paper's ECALLs, each a handler of one request frame.
//!
//! A [`Session`] owns everything secret: the setup key, the licence (with the
//! model key), the unsealer of the loaded capsule. It gets every byte from
//! the host and gives back only public values, sealed blobs and outputs whose
//! queries were counted.

use std::io::{BufReader, Read, Write};

use capsule_attest::{Attester, MonotonicCounter, SIM};
use capsule_engine::{Graph, Tensor};
use capsule_format::{EnclaveKey, INSTANCE_ID_LEN, TopUp, Unsealer, report_data};
use serde::Serialize;

use crate::error::Error;
use crate::ledger::{Ledger, today_utc};
use crate::model::Layout;
use crate::protocol::{
    self, AttestRequest, Empty, EnclavePublic, Frame, FrameReader, Hello, LoadRequest,
    MAX_NONCE_LEN, MessageType, OutputReport, PROTOCOL_VERSION, ProvisionRequest, Provisioned,
    QueryRequest, ReadError, Ready, Status, TopUpRequest, ToppedUp,
};
use crate::stream::{LayerStream, StreamFailure};

/// One enclave instance serving one host over a byte channel.
pub struct Session {
    attester: Box<dyn Attester>,
    counter: Box<dyn MonotonicCounter>,
    instance_id: [u8; INSTANCE_ID_LEN],
    setup_key: Option<EnclaveKey>,
    ledger: Option<Ledger>,
    loaded: Option<Loaded>,
}

/// A capsule whose header MAC was checked with the licence's model key.
struct Loaded {
    unsealer: Unsealer,
    layout: Layout,
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
            instance_id,
            setup_key: None,
            ledger: None,
            loaded: None,
        }
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
    pub fn serve<R: Read, W: Write>(&mut self, input: R, mut output: W) -> Result<(), Error> {
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

    fn handshake<R: Read, W: Write>(
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

    fn handle<R: Read, W: Write>(
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
            Request::TopUp(req) => self.topup(&req)?,
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

    /// `Load` (§5.5): unseal the state and authenticate the capsule's header.
    fn load(&mut self, req: &LoadRequest, prefix: &[u8]) -> Result<Reply, Error> {
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
        let layout = Layout::new(unsealer.header()).map_err(|e| match e {
            Error::Engine(e) => Error::CapsuleRejected {
                reason: format!(
                    "{e}; the capsule does not fit its own architecture, get a fresh copy from the provider"
                ),
            },
            e => e,
        })?;
        self.ledger = Some(ledger);
        self.loaded = Some(Loaded { unsealer, layout });
        Reply::new(MessageType::StatusReport, &self.status()?)
    }

    /// `Query` (§5.6): check the budget, pull the layers, run, count, answer.
    fn query<R: Read, W: Write>(
        &mut self,
        inputs: &[Tensor],
        frames: &mut FrameReader<R>,
        output: &mut W,
    ) -> Result<Reply, Failure> {
        let ledger = self.ledger.as_ref().ok_or(Error::NotProvisioned)?;
        let loaded = self.loaded.as_ref().ok_or(Error::CapsuleNotLoaded)?;
        let n = batch_size(loaded.layout.plan().graph(), inputs)?;
        let terms = ledger.terms(Some(&loaded.unsealer.header().policy));
        let used = self.counter.value();
        // Refuse before computing anything.
        terms.allow(used, n, &today_utc())?;
        protocol::write_frame(output, MessageType::SendLayers, &Empty {}, &[])
            .map_err(|_| Failure::Gone)?;

        let mut stream = LayerStream::new(frames, &loaded.unsealer, &loaded.layout);
        let result = loaded.layout.plan().run(inputs, &mut stream);
        match stream.finish() {
            Ok(()) => {}
            Err(StreamFailure::Gone) => return Err(Failure::Gone),
            Err(StreamFailure::Broken(e) | StreamFailure::Rejected(e)) => return Err(e.into()),
        }
        let outputs = result.map_err(|e| Error::QueryFailed {
            reason: format!("the model failed on this input ({e}); nothing was counted"),
        })?;

        let after = used + n;
        let status = self.status_at(after)?;
        let blob = protocol::encode_tensors(&outputs);
        let report = OutputReport {
            outputs: outputs.iter().map(|t| t.shape().to_vec()).collect(),
            status,
        };
        let mut reply = Reply::new(MessageType::Output, &report)?;
        if protocol::frame_len(reply.json.len(), blob.len()).is_none() {
            return Err(Error::QueryFailed {
                reason: format!(
                    "the output ({} bytes) does not fit in one {}-byte frame; nothing was counted, send a smaller batch",
                    blob.len(),
                    protocol::MAX_FRAME_LEN
                ),
            }
            .into());
        }
        // Count before releasing: a crash from here on costs the client, never the provider.
        for _ in 0..n {
            self.counter.increment().map_err(|e| Error::CounterFailed {
                reason: e.to_string(),
            })?;
        }
        if self.counter.value() != after {
            return Err(Error::CounterFailed {
                reason: format!(
                    "the counter reads {} after counting, expected {after}",
                    self.counter.value()
                ),
            }
            .into());
        }
        reply.blob = blob;
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
        })
    }

    /// `TopUp` (§5.8): verify, apply, reseal.
    fn topup(&mut self, req: &TopUpRequest) -> Result<Reply, Error> {
        let current = self.ledger.as_ref().ok_or(Error::NotProvisioned)?;
        let token = TopUp::verify(&req.token, &current.grant.server_key)
            .map_err(|_| Error::InvalidToken)?;
        let mut next = current.clone();
        next.apply(&token)?;
        let sealed_state = next.seal(&*self.attester, &self.instance_id)?;
        self.ledger = Some(next);
        Reply::new(
            MessageType::ToppedUp,
            &ToppedUp {
                sealed_state,
                status: self.status()?,
            },
        )
    }
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
