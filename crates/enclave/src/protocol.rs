//! The enclave protocol's bytes (`spec/enclave-protocol.md`): frames, message
//! types and their bodies, read and written side by side.
//!
//! A frame is `u32 BE length || u8 type || body`, where `length` counts the
//! type byte and the body (§2). Every body is `u32 BE json-length || JSON ||
//! blob` (§3): compact JSON for the control part, raw bytes for tensors
//! (little-endian `f32`) and sealed chunks, so that no weight or tensor is
//! ever hex- or base64-encoded.

use std::io::{self, Read, Write};

use capsule_engine::Tensor;
use capsule_format::SealedGrant;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, WireDetails};

/// The protocol version this build speaks (`Hello`, `Ready`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest `length` a frame may declare: 80 MiB (§2). It fits the largest
/// sealed chunk (64 MiB + tag) with room to spare; query inputs and outputs
/// must fit in one frame too.
pub const MAX_FRAME_LEN: usize = 80 * 1024 * 1024;

/// Longest setup nonce accepted, in bytes (§5.3).
pub const MAX_NONCE_LEN: usize = 1024;

/// A message type: the byte after the frame length (§4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Host to enclave: the first frame, offering a version.
    Hello = 0x01,
    /// Host to enclave: make the setup key pair.
    SetupKey = 0x02,
    /// Host to enclave: attest the setup key for a nonce.
    Attest = 0x03,
    /// Host to enclave: open a sealed grant, create the licence state.
    Provision = 0x04,
    /// Host to enclave: load a sealed state and a capsule's prefix.
    Load = 0x05,
    /// Host to enclave: run one batch.
    Query = 0x06,
    /// Host to enclave: one sealed chunk of one layer, during a query.
    Layer = 0x07,
    /// Host to enclave: report the licence status.
    Status = 0x08,
    /// Host to enclave: apply a top-up token.
    TopUp = 0x09,
    /// Enclave to host: answer to `Hello`.
    Ready = 0x81,
    /// Enclave to host: answer to `SetupKey`.
    EnclaveKey = 0x82,
    /// Enclave to host: answer to `Attest`.
    Evidence = 0x83,
    /// Enclave to host: answer to `Provision`.
    Provisioned = 0x84,
    /// Enclave to host: answer to `Load` and `Status`.
    StatusReport = 0x85,
    /// Enclave to host: answer to `Query` when the budget allows it: stream the layers.
    SendLayers = 0x86,
    /// Enclave to host: the query's outputs, after the queries were counted.
    Output = 0x87,
    /// Enclave to host: answer to `TopUp`.
    ToppedUp = 0x88,
    /// Enclave to host: the new sealed defense state, right before the `Output` or
    /// refusal of a counted query, or the `ToppedUp` of a resynchronising top-up.
    DefenseState = 0x89,
    /// Enclave to host: the request failed.
    Error = 0xFF,
}

impl MessageType {
    /// The type for a byte, if it is one.
    pub fn from_byte(byte: u8) -> Option<MessageType> {
        use MessageType::*;
        Some(match byte {
            0x01 => Hello,
            0x02 => SetupKey,
            0x03 => Attest,
            0x04 => Provision,
            0x05 => Load,
            0x06 => Query,
            0x07 => Layer,
            0x08 => Status,
            0x09 => TopUp,
            0x81 => Ready,
            0x82 => EnclaveKey,
            0x83 => Evidence,
            0x84 => Provisioned,
            0x85 => StatusReport,
            0x86 => SendLayers,
            0x87 => Output,
            0x88 => ToppedUp,
            0x89 => DefenseState,
            0xFF => Error,
            _ => return None,
        })
    }
}

/// One frame as read: its type, JSON part and blob (§3).
#[derive(Debug)]
pub struct Frame<'a> {
    /// The message type.
    pub kind: MessageType,
    /// The JSON control part.
    pub json: &'a [u8],
    /// The raw bytes after the JSON.
    pub blob: &'a [u8],
}

impl Frame<'_> {
    /// Parses the JSON part as `T`, requiring an empty blob.
    pub fn control<T: DeserializeOwned>(&self) -> Result<T, Error> {
        if !self.blob.is_empty() {
            return Err(malformed(format!(
                "a {:?} frame carries no raw bytes, got {}",
                self.kind,
                self.blob.len()
            )));
        }
        self.json_part()
    }

    /// Parses the JSON part as `T`; the caller reads the blob.
    pub fn json_part<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(self.json)
            .map_err(|e| malformed(format!("{:?} frame JSON: {e}", self.kind)))
    }
}

fn malformed(reason: String) -> Error {
    Error::Protocol { reason }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The stream ended cleanly before a frame started.
    Closed,
    /// The stream failed or ended inside a frame.
    Io(io::Error),
    /// The bytes break §2 or §3.
    Malformed(Error),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> ReadError {
        ReadError::Io(e)
    }
}

/// Reads frames into one reused buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes of the last frame's blob still in the stream ([`FrameReader::read_head`]).
    blob_left: usize,
}

impl<R: Read> FrameReader<R> {
    /// Reads frames from `inner` (buffer it: frames are read in pieces).
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader {
            inner,
            buf: Vec::new(),
            blob_left: 0,
        }
    }

    /// Reads the next frame (§2, §3).
    pub fn read(&mut self) -> Result<Frame<'_>, ReadError> {
        let len = self.read_len()?;
        self.buf.clear();
        self.buf.resize(len, 0);
        self.inner.read_exact(&mut self.buf)?;
        let (kind, json_len) = head(&self.buf, len)?;
        Ok(Frame {
            kind,
            json: &self.buf[5..5 + json_len],
            blob: &self.buf[5 + json_len..],
        })
    }

    /// Reads the next frame like [`FrameReader::read`], but appends its blob to
    /// `blob` straight from the reader, without filling or copying a buffer first
    /// (the frame returned has an empty blob). On an error, `blob` may have grown by
    /// part of the frame's bytes.
    pub fn read_appending(&mut self, blob: &mut Vec<u8>) -> Result<Frame<'_>, ReadError> {
        let (kind, blob_len) = self.read_head().map(|(frame, len)| (frame.kind, len))?;
        // The blob is taken here, whole, or the stream fails.
        self.blob_left = 0;
        let got = self
            .inner
            .by_ref()
            .take(blob_len as u64)
            .read_to_end(blob)?;
        if got != blob_len {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
        }
        Ok(Frame {
            kind,
            json: &self.buf[5..],
            blob: &[],
        })
    }

    /// Reads the next frame's head and JSON part like [`FrameReader::read`], and leaves
    /// its blob in the stream, for [`FrameReader::read_blob`]: the caller checks the
    /// head before it decides where the blob's bytes go. Returns the frame (its blob
    /// empty) and the blob's length. What the caller leaves of the blob is skipped when
    /// the next frame is read.
    pub fn read_head(&mut self) -> Result<(Frame<'_>, usize), ReadError> {
        let len = self.read_len()?;
        self.buf.clear();
        self.buf.resize(5, 0);
        self.inner.read_exact(&mut self.buf)?;
        let (kind, json_len) = head(&self.buf, len)?;
        self.buf.resize(5 + json_len, 0);
        self.inner.read_exact(&mut self.buf[5..])?;
        self.blob_left = len - 5 - json_len;
        let frame = Frame {
            kind,
            json: &self.buf[5..],
            blob: &[],
        };
        Ok((frame, self.blob_left))
    }

    /// Reads the next `buf.len()` bytes of the blob of the frame [`FrameReader::read_head`]
    /// read; fails, reading nothing, if fewer are left.
    pub fn read_blob(&mut self, buf: &mut [u8]) -> Result<(), ReadError> {
        if buf.len() > self.blob_left {
            return Err(ReadError::Malformed(malformed(format!(
                "{} bytes asked of a blob with {} left",
                buf.len(),
                self.blob_left
            ))));
        }
        self.inner.read_exact(buf)?;
        self.blob_left -= buf.len();
        Ok(())
    }

    /// Reads a frame's length (§2) and checks its bounds, after skipping what is left of
    /// the last frame's blob.
    fn read_len(&mut self) -> Result<usize, ReadError> {
        if self.blob_left > 0 {
            let left = std::mem::take(&mut self.blob_left) as u64;
            let skipped = io::copy(&mut self.inner.by_ref().take(left), &mut io::sink())?;
            if skipped != left {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        }
        let mut len = [0u8; 4];
        let mut got = 0;
        while got < len.len() {
            match self.inner.read(&mut len[got..]) {
                Ok(0) if got == 0 => return Err(ReadError::Closed),
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let len = u32::from_be_bytes(len) as usize;
        if !(5..=MAX_FRAME_LEN).contains(&len) {
            return Err(ReadError::Malformed(malformed(format!(
                "frame length {len} is outside 5 ..= {MAX_FRAME_LEN}"
            ))));
        }
        Ok(len)
    }
}

/// The message type and JSON length at the start of a frame of `len` bytes (§2), whose
/// first five bytes `start` holds.
fn head(start: &[u8], len: usize) -> Result<(MessageType, usize), ReadError> {
    let Some(kind) = MessageType::from_byte(start[0]) else {
        return Err(ReadError::Malformed(malformed(format!(
            "unknown message type 0x{:02x}",
            start[0]
        ))));
    };
    let json_len = u32::from_be_bytes([start[1], start[2], start[3], start[4]]) as usize;
    if json_len > len - 5 {
        return Err(ReadError::Malformed(malformed(format!(
            "JSON length {json_len} exceeds the {}-byte body",
            len - 1
        ))));
    }
    Ok((kind, json_len))
}

/// Writes one frame: `kind`, the JSON of `control`, then `blob` (§2, §3).
///
/// Fails with [`io::ErrorKind::InvalidInput`] before writing anything when
/// the frame would exceed [`MAX_FRAME_LEN`].
pub fn write_frame<W: Write, T: Serialize + ?Sized>(
    out: &mut W,
    kind: MessageType,
    control: &T,
    blob: &[u8],
) -> io::Result<()> {
    let json = serde_json::to_vec(control).map_err(io::Error::other)?;
    write_raw_frame(out, kind, &json, blob)
}

/// Writes one frame whose JSON part is already serialised, and flushes.
///
/// Fails with [`io::ErrorKind::InvalidInput`] before writing anything when
/// the frame would exceed [`MAX_FRAME_LEN`].
pub fn write_raw_frame<W: Write>(
    out: &mut W,
    kind: MessageType,
    json: &[u8],
    blob: &[u8],
) -> io::Result<()> {
    let len = frame_len(json.len(), blob.len()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a {kind:?} frame would exceed {MAX_FRAME_LEN} bytes"),
        )
    })?;
    let mut head = Vec::with_capacity(9 + json.len());
    head.extend_from_slice(&len.to_be_bytes());
    head.push(kind as u8);
    head.extend_from_slice(&(json.len() as u32).to_be_bytes());
    head.extend_from_slice(json);
    out.write_all(&head)?;
    out.write_all(blob)?;
    out.flush()
}

/// Writes an `Error` frame reporting `error` (§6).
pub fn write_error<W: Write>(out: &mut W, error: &Error) -> io::Result<()> {
    write_frame(out, MessageType::Error, &ErrorReport::of(error), &[])
}

/// The `length` field of a frame with this much JSON and blob, if it fits.
pub fn frame_len(json: usize, blob: usize) -> Option<u32> {
    let len = 1usize
        .checked_add(4)?
        .checked_add(json)?
        .checked_add(blob)?;
    if len > MAX_FRAME_LEN {
        return None;
    }
    u32::try_from(len).ok()
}

/// An empty JSON object, the control part of messages without one.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// `Hello` (§5.1).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The protocol version the host speaks.
    pub version: u32,
}

/// `Ready` (§5.1): who the enclave is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// The protocol version the enclave speaks.
    pub version: u32,
    /// Its platform, e.g. `"sim"`.
    pub platform: String,
    /// SHA-256 of the enclave binary.
    #[serde(with = "hex")]
    pub measurement: [u8; 32],
    /// The enclave instance: the name of its monotonic counter.
    #[serde(with = "hex")]
    pub instance_id: [u8; 16],
    /// True on the `sim` platform, which protects against nothing the machine's owner does.
    pub sim: bool,
}

/// `EnclaveKey` (§5.2): the setup public key.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnclavePublic {
    /// The X25519 public key the grant is to be sealed to.
    #[serde(with = "hex")]
    pub enclave_public: [u8; 32],
}

/// `Attest` (§5.3).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    /// The provisioning server's fresh nonce.
    #[serde(with = "hex")]
    pub nonce: Vec<u8>,
}

/// `Provision` (§5.4).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionRequest {
    /// The nonce of the setup this grant answers.
    #[serde(with = "hex")]
    pub nonce: Vec<u8>,
    /// The grant, sealed to the setup key.
    pub sealed_grant: SealedGrant,
}

/// `Provisioned` (§5.4).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provisioned {
    /// The licence state, sealed to this platform, binary and instance.
    #[serde(with = "hex")]
    pub sealed_state: Vec<u8>,
}

/// `Load` (§5.5); the blob is the capsule's prefix, then the sealed defense state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// The sealed licence state.
    #[serde(with = "hex")]
    pub sealed_state: Vec<u8>,
    /// Bytes at the end of the blob that are the sealed defense state (§7.4); 0 (or
    /// absent) for none.
    #[serde(default)]
    pub defense_len: u64,
}

/// `DefenseState` (§5.6, §7.4); the blob is the sealed defense state, which replaces the
/// stored one before the host shows the output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenseStamp {
    /// The counter value the state is current at.
    pub stamp: u64,
}

/// `Query` (§5.6); the blob is the inputs' values.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// The shape of each input, in the graph's input order.
    pub inputs: Vec<Vec<usize>>,
}

/// `Layer` (§5.6); the blob is one sealed chunk.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerChunk {
    /// The layer's index in the capsule's chunk table.
    pub layer: u32,
    /// The chunk's index in the layer.
    pub chunk: u64,
}

/// `Output` (§5.6); the blob is the outputs' values.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputReport {
    /// The shape of each output, in the graph's output order.
    pub outputs: Vec<Vec<usize>>,
    /// The licence status after this query was counted.
    pub status: Status,
}

/// `TopUp` (§5.8).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopUpRequest {
    /// The signed token, `mlcapsule-topup/v1.<body>.<signature>`.
    pub token: String,
}

/// `ToppedUp` (§5.8).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToppedUp {
    /// The new sealed licence state; replaces the old one.
    #[serde(with = "hex")]
    pub sealed_state: Vec<u8>,
    /// The status after the top-up.
    pub status: Status,
}

/// A licence's status (`StatusReport`, §5.7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The licence.
    pub licence_id: String,
    /// The enclave instance.
    #[serde(with = "hex")]
    pub instance_id: [u8; 16],
    /// Queries counted so far: the monotonic counter's value.
    pub used: u64,
    /// Queries granted in total (capped by the capsule's policy once one is loaded).
    pub total: u64,
    /// `total - used`, or 0.
    pub left: u64,
    /// Last day the model may run (UTC), if any.
    pub expires: Option<String>,
    /// The platform, e.g. `"sim"`.
    pub platform: String,
    /// The last top-up sequence number applied, 0 for none.
    pub topup_seq: u64,
    /// The defenses' record, when the loaded capsule's policy keeps state (§7.4).
    #[serde(default)]
    pub defense: Option<DefenseStatus>,
}

/// What the defenses of the loaded capsule have recorded (§5.7, §7.4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefenseStatus {
    /// The counter value the loaded defense state is current at.
    pub stamp: u64,
    /// Queries counted that the loaded state has not seen (`used - stamp`): an older copy
    /// or a lost save. Queries are refused until a top-up resynchronises it.
    pub behind: u64,
    /// PRADA's record, when the policy has `[prada]`.
    pub prada: Option<PradaStatus>,
    /// Queries the input detector refused, when the policy runs one (its detection
    /// counter's value, which no state rollback lowers).
    pub detector_refusals: Option<u64>,
    /// Queries counted that PRADA never observed, added by resynchronisations.
    pub unobserved: u64,
    /// Resynchronisations so far.
    pub resyncs: u64,
}

/// PRADA's part of [`DefenseStatus`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PradaStatus {
    /// Queries PRADA observed.
    pub observed: u64,
    /// Queries in its growing sets.
    pub stored: u64,
    /// Alarms raised (the alarm counter's value, which no state rollback lowers).
    pub alarms: u64,
    /// The first alarm, if the state still holds it.
    pub first_alarm: Option<capsule_defense::PradaTest>,
    /// The latest test.
    pub last_test: Option<capsule_defense::PradaTest>,
    /// Every query is refused: an alarm was raised and the policy's action is `deny`.
    pub denying: bool,
}

/// `Error` (§6).
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReport {
    /// Stable snake_case code.
    pub code: String,
    /// One sentence for a person, ending with what to do next.
    pub message: String,
    /// Structured details of some codes.
    #[serde(flatten)]
    pub details: WireDetails,
}

impl ErrorReport {
    /// The frame body reporting `error`.
    pub fn of(error: &Error) -> ErrorReport {
        ErrorReport {
            code: error.code().to_owned(),
            message: error.to_string(),
            details: error.wire_details(),
        }
    }

    /// The error it reports.
    pub fn into_error(self) -> Error {
        Error::from_wire(&self.code, &self.message, &self.details)
    }
}

/// Appends the values of `tensors` as little-endian `f32` (§3.1).
pub fn encode_tensors<'t>(tensors: impl IntoIterator<Item = &'t Tensor>) -> Vec<u8> {
    let tensors: Vec<&Tensor> = tensors.into_iter().collect();
    let mut out = Vec::with_capacity(tensors.iter().map(|t| 4 * t.len()).sum());
    for t in tensors {
        for v in t.data() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

/// Splits `blob` into tensors of `shapes` (§3.1); the blob must be exactly their values.
pub fn decode_tensors(shapes: &[Vec<usize>], blob: &[u8]) -> Result<Vec<Tensor>, Error> {
    let mut rest = blob;
    let mut out = Vec::with_capacity(shapes.len());
    for shape in shapes {
        let bytes = shape
            .iter()
            .try_fold(4usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n <= rest.len())
            .ok_or_else(|| {
                malformed(format!(
                    "tensor of shape {shape:?} does not fit the {} bytes left",
                    rest.len()
                ))
            })?;
        let (values, tail) = rest.split_at(bytes);
        rest = tail;
        let data = values
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.push(Tensor::new(shape.clone(), data).map_err(|e| malformed(format!("tensor: {e}")))?);
    }
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes follow the last tensor",
            rest.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads one frame with `read`, and again with `read_appending` after a byte
    /// already in the buffer, and checks that both give the same frame or error.
    fn read_one(bytes: &[u8]) -> Result<(MessageType, Vec<u8>, Vec<u8>), ReadError> {
        let mut r = FrameReader::new(bytes);
        let whole = r.read().map(|f| (f.kind, f.json.to_vec(), f.blob.to_vec()));
        let mut r = FrameReader::new(bytes);
        let mut blob = vec![0xaa];
        let appended = r.read_appending(&mut blob).map(|f| {
            assert!(f.blob.is_empty());
            (f.kind, f.json.to_vec())
        });
        // And by its head, then its blob in two pieces.
        let mut r = FrameReader::new(bytes);
        let pieces = r
            .read_head()
            .map(|(f, blob_len)| (f.kind, f.json.to_vec(), blob_len));
        let pieces = pieces.and_then(|(kind, json, blob_len)| {
            let mut blob = vec![0u8; blob_len];
            let (a, b) = blob.split_at_mut(blob_len / 2);
            r.read_blob(a)?;
            r.read_blob(b)?;
            assert!(r.read_blob(&mut [0]).is_err(), "read past the blob");
            Ok((kind, json, blob))
        });
        match (&whole, pieces) {
            (Ok(want), Ok(got)) => assert_eq!(&got, want),
            (Err(ReadError::Closed), Err(ReadError::Closed))
            | (Err(ReadError::Io(_)), Err(ReadError::Io(_)))
            | (Err(ReadError::Malformed(_)), Err(ReadError::Malformed(_))) => {}
            (whole, pieces) => panic!("read gave {whole:?}, read_head {pieces:?}"),
        }
        match (&whole, appended) {
            (Ok((kind, json, want)), Ok(got)) => {
                assert_eq!(got, (*kind, json.clone()));
                assert_eq!((blob[0], &blob[1..]), (0xaa, &want[..]));
            }
            (Err(ReadError::Closed), Err(ReadError::Closed))
            | (Err(ReadError::Io(_)), Err(ReadError::Io(_)))
            | (Err(ReadError::Malformed(_)), Err(ReadError::Malformed(_))) => {}
            (whole, appended) => panic!("read gave {whole:?}, read_appending {appended:?}"),
        }
        whole
    }

    /// What `read_head`'s caller left of a blob is skipped: the next frame reads whole;
    /// a stream cut inside the skipped bytes fails as a cut frame.
    #[test]
    fn a_blob_left_unread_is_skipped() {
        let mut out = Vec::new();
        let at = |chunk| LayerChunk { layer: 0, chunk };
        write_frame(&mut out, MessageType::Layer, &at(0), &[1, 2, 3, 4, 5]).unwrap();
        let second = out.len();
        write_frame(&mut out, MessageType::Layer, &at(1), &[6, 7]).unwrap();
        write_frame(&mut out, MessageType::Hello, &Hello { version: 1 }, b"").unwrap();
        let mut r = FrameReader::new(&out[..]);
        assert_eq!(r.read_head().unwrap().1, 5);
        let mut two = [0u8; 2];
        r.read_blob(&mut two).unwrap();
        assert_eq!(two, [1, 2]);
        let (frame, len) = r.read_head().unwrap();
        let chunk: LayerChunk = frame.json_part().unwrap();
        assert_eq!((chunk.chunk, len), (1, 2));
        assert_eq!(r.read().unwrap().kind, MessageType::Hello);
        assert!(matches!(r.read(), Err(ReadError::Closed)));

        let mut r = FrameReader::new(&out[..second - 2]);
        assert_eq!(r.read_head().unwrap().1, 5);
        assert!(matches!(r.read_head(), Err(ReadError::Io(_))));
    }

    #[test]
    fn frames_round_trip_byte_for_byte() {
        let mut out = Vec::new();
        write_frame(&mut out, MessageType::Hello, &Hello { version: 1 }, b"").unwrap();
        let json = br#"{"version":1}"#;
        let mut expected = ((1 + 4 + json.len()) as u32).to_be_bytes().to_vec();
        expected.push(0x01);
        expected.extend_from_slice(&(json.len() as u32).to_be_bytes());
        expected.extend_from_slice(json);
        assert_eq!(out, expected);
        let (kind, j, blob) = read_one(&out).unwrap();
        assert_eq!(
            (kind, j.as_slice(), blob.len()),
            (MessageType::Hello, &json[..], 0)
        );

        let mut out = Vec::new();
        write_frame(
            &mut out,
            MessageType::Layer,
            &LayerChunk { layer: 2, chunk: 0 },
            &[9, 8, 7],
        )
        .unwrap();
        let (kind, _, blob) = read_one(&out).unwrap();
        assert_eq!((kind, blob), (MessageType::Layer, vec![9, 8, 7]));
    }

    #[test]
    fn malformed_frames_are_rejected_not_panicked_on() {
        assert!(matches!(read_one(b""), Err(ReadError::Closed)));
        assert!(matches!(read_one(&[0, 0]), Err(ReadError::Io(_))));
        assert!(matches!(
            read_one(&[0, 0, 0, 4, 1, 0, 0, 0]),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            read_one(&[0xff, 0xff, 0xff, 0xff]),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            read_one(&[0, 0, 0, 5, 0x42, 0, 0, 0, 0]),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            read_one(&[0, 0, 0, 5, 0x01, 0, 0, 0, 9]),
            Err(ReadError::Malformed(_))
        ));
        assert!(matches!(
            read_one(&[0, 0, 0, 9, 0x01, 0, 0]),
            Err(ReadError::Io(_))
        ));
        // A blob cut short.
        assert!(matches!(
            read_one(&[0, 0, 0, 9, 0x07, 0, 0, 0, 2, b'{', b'}', 1]),
            Err(ReadError::Io(_))
        ));
        let mut reader = FrameReader::new(&[0, 0, 0, 7, 0x01, 0, 0, 0, 2, b'{', b'}'][..]);
        let frame = reader.read().unwrap();
        assert!(frame.control::<Hello>().is_err());
    }

    #[test]
    fn tensors_round_trip_and_lengths_are_checked() {
        let a = Tensor::new(vec![1, 2], vec![1.5, -2.0]).unwrap();
        let b = Tensor::new(vec![3], vec![0.0, f32::MIN_POSITIVE, 7.0]).unwrap();
        let blob = encode_tensors([&a, &b]);
        assert_eq!(&blob[..4], &1.5f32.to_le_bytes());
        let back = decode_tensors(&[vec![1, 2], vec![3]], &blob).unwrap();
        assert_eq!(back, vec![a, b]);
        assert!(decode_tensors(&[vec![1, 2]], &blob).is_err());
        assert!(decode_tensors(&[vec![1, 2], vec![4]], &blob).is_err());
        assert!(decode_tensors(&[vec![usize::MAX, 2]], &blob).is_err());
    }

    #[test]
    fn oversized_frames_are_refused_before_writing() {
        let mut out = Vec::new();
        let blob = vec![0u8; MAX_FRAME_LEN];
        let err = write_frame(&mut out, MessageType::Output, &Empty {}, &blob).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(out.is_empty());
    }
}
