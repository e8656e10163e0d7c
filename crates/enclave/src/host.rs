//! The host's handle on an enclave process (`spec/enclave-protocol.md` §5).
//!
//! This side is untrusted: it starts `mlcapsule-enclave`, passes it public
//! and sealed bytes, and gets back public values, sealed blobs and outputs.
//! It never holds a model key or a plaintext weight: it has no way to, since
//! it calls nothing of `capsule-format` that takes a key (a unit test checks
//! this file's source for such calls).

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use capsule_attest::Evidence;
use capsule_engine::Tensor;
use capsule_format::SealedGrant;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::protocol::{
    self, AttestRequest, DefenseStamp, Empty, EnclavePublic, ErrorReport, FrameReader, Hello,
    LayerChunk, LoadRequest, MessageType, OutputReport, PROTOCOL_VERSION, ProvisionRequest,
    Provisioned, QueryRequest, ReadError, Ready, Status, TopUpRequest, ToppedUp,
};
use crate::source::{CapsuleSource, FileChunk, SealedChunk};

/// Environment variable naming the enclave binary, overriding [`default_enclave_binary`].
pub const ENCLAVE_ENV: &str = "MLCAPSULE_ENCLAVE";

/// The enclave binary the host starts: `$MLCAPSULE_ENCLAVE` if set, else
/// `mlcapsule-enclave` next to the running executable.
pub fn default_enclave_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(ENCLAVE_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let name = format!("mlcapsule-enclave{}", std::env::consts::EXE_SUFFIX);
    match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(name),
        Err(_) => PathBuf::from(name),
    }
}

/// A running enclave process and the protocol session with it.
///
/// Dropping it closes the enclave's input and waits for it to exit (killing
/// it if it does not within a few seconds).
pub struct EnclaveProcess {
    child: Child,
    input: Option<BufWriter<ChildStdin>>,
    output: FrameReader<BufReader<ChildStdout>>,
    ready: Ready,
    /// The sealed defense state that came with the last counted query or resynchronising
    /// top-up, until the caller takes it to store (§7.4).
    defense_state: Option<Vec<u8>>,
    /// Set once the process is known to be gone or out of step.
    dead: Option<String>,
    /// Chunks of capsule files are spliced into the pipe (until a file cannot be).
    #[cfg(target_os = "linux")]
    splice: bool,
}

impl EnclaveProcess {
    /// Starts `enclave_bin` on the `sim` platform in `platform_dir`, as a new
    /// enclave instance (`None`) or as `instance`, and does the `Hello`
    /// handshake (§5.1).
    ///
    /// Fails with the enclave's own error when it refuses to start (for
    /// example [`Error::NoCounter`] or [`Error::Hardening`]).
    pub fn spawn(
        enclave_bin: &Path,
        platform_dir: &Path,
        instance: Option<[u8; 16]>,
    ) -> Result<EnclaveProcess, Error> {
        EnclaveProcess::spawn_with_version(enclave_bin, platform_dir, instance, PROTOCOL_VERSION)
    }

    /// [`EnclaveProcess::spawn`] with a cap on the plaintext weight memory the enclave
    /// holds at once during a query (enclave-protocol §8.1 `--memory-budget`); `None` for
    /// no cap.
    pub fn spawn_with_budget(
        enclave_bin: &Path,
        platform_dir: &Path,
        instance: Option<[u8; 16]>,
        memory_budget: Option<u64>,
    ) -> Result<EnclaveProcess, Error> {
        EnclaveProcess::start(
            enclave_bin,
            platform_dir,
            instance,
            PROTOCOL_VERSION,
            memory_budget,
        )
    }

    /// [`EnclaveProcess::spawn`], offering protocol version `version` (for tests of §5.1).
    #[doc(hidden)]
    pub fn spawn_with_version(
        enclave_bin: &Path,
        platform_dir: &Path,
        instance: Option<[u8; 16]>,
        version: u32,
    ) -> Result<EnclaveProcess, Error> {
        EnclaveProcess::start(enclave_bin, platform_dir, instance, version, None)
    }

    fn start(
        enclave_bin: &Path,
        platform_dir: &Path,
        instance: Option<[u8; 16]>,
        version: u32,
        memory_budget: Option<u64>,
    ) -> Result<EnclaveProcess, Error> {
        let mut command = Command::new(enclave_bin);
        command.arg("--platform").arg(platform_dir);
        match instance {
            None => command.arg("--new-instance"),
            Some(id) => command.arg("--instance").arg(hex::encode(id)),
        };
        if let Some(bytes) = memory_budget {
            command.arg("--memory-budget").arg(bytes.to_string());
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| Error::Spawn {
                path: enclave_bin.to_owned(),
                reason: e.to_string(),
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(Error::Spawn {
                path: enclave_bin.to_owned(),
                reason: "its standard input and output could not be piped".into(),
            });
        };
        widen_pipe(&stdin);
        let mut process = EnclaveProcess {
            child,
            input: Some(BufWriter::with_capacity(1 << 16, stdin)),
            output: FrameReader::new(BufReader::with_capacity(1 << 16, stdout)),
            ready: Ready {
                version,
                platform: String::new(),
                measurement: [0; 32],
                instance_id: [0; 16],
                sim: true,
            },
            defense_state: None,
            dead: None,
            #[cfg(target_os = "linux")]
            splice: true,
        };
        // An enclave that refuses to start says why in an Error frame before
        // it reads anything, so a failed write is no reason to stop reading.
        let _ = process.send(MessageType::Hello, &Hello { version }, &[]);
        process.ready = process.expect(MessageType::Ready)?;
        if process.ready.version != PROTOCOL_VERSION {
            let found = process.ready.version;
            process.dead = Some("it speaks another protocol version".into());
            return Err(Error::UnsupportedVersion {
                expected: PROTOCOL_VERSION,
                found,
            });
        }
        Ok(process)
    }

    /// Who the enclave is: platform, measurement, instance id.
    pub fn info(&self) -> &Ready {
        &self.ready
    }

    /// The enclave's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The enclave process's peak resident memory so far, in bytes: `VmHWM` in
    /// `/proc/<pid>/status`, which the host may read although the enclave is not
    /// dumpable. `None` where there is no such file.
    pub fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    /// `SetupKey` (§5.2): the enclave makes a key pair and returns its public half.
    pub fn setup_key(&mut self) -> Result<[u8; 32], Error> {
        self.send(MessageType::SetupKey, &Empty {}, &[])?;
        let reply: EnclavePublic = self.expect(MessageType::EnclaveKey)?;
        Ok(reply.enclave_public)
    }

    /// `Attest` (§5.3): evidence for
    /// `report_data(setup key, instance id, nonce)`, to send to the server.
    pub fn attest(&mut self, nonce: &[u8]) -> Result<Evidence, Error> {
        let request = AttestRequest {
            nonce: nonce.to_vec(),
        };
        self.send(MessageType::Attest, &request, &[])?;
        self.expect(MessageType::Evidence)
    }

    /// `Provision` (§5.4): hands the server's sealed grant to the enclave and
    /// returns the sealed licence state, to be stored by the caller.
    pub fn provision(&mut self, nonce: &[u8], grant: &SealedGrant) -> Result<Vec<u8>, Error> {
        let request = ProvisionRequest {
            nonce: nonce.to_vec(),
            sealed_grant: grant.clone(),
        };
        self.send(MessageType::Provision, &request, &[])?;
        let reply: Provisioned = self.expect(MessageType::Provisioned)?;
        Ok(reply.sealed_state)
    }

    /// `Load` (§5.5): the sealed licence state and the capsule's header, for a capsule
    /// whose policy keeps no defense state, or the first run of one that does.
    pub fn load(
        &mut self,
        sealed_state: &[u8],
        capsule: &(impl CapsuleSource + ?Sized),
    ) -> Result<Status, Error> {
        self.load_with_defense(sealed_state, capsule, None)
    }

    /// `Load` (§5.5) with the sealed defense state stored after the last counted query
    /// (§7.4), if there is one.
    pub fn load_with_defense(
        &mut self,
        sealed_state: &[u8],
        capsule: &(impl CapsuleSource + ?Sized),
        sealed_defense: Option<&[u8]>,
    ) -> Result<Status, Error> {
        let defense = sealed_defense.unwrap_or_default();
        let request = LoadRequest {
            sealed_state: sealed_state.to_vec(),
            defense_len: defense.len() as u64,
        };
        let blob = [capsule.prefix(), defense].concat();
        self.send(MessageType::Load, &request, &blob)?;
        self.expect(MessageType::StatusReport)
    }

    /// The sealed defense state that came with the last counted query (answered or
    /// refused) or resynchronising top-up, if any (§5.6, §7.4). Store it, replacing the
    /// old one, **before** showing the answer: an enclave loaded later with an older state
    /// refuses to answer until a top-up resynchronises it.
    pub fn take_defense_state(&mut self) -> Option<Vec<u8>> {
        self.defense_state.take()
    }

    /// Runs one batch `input` (§5.6) and returns the model's first output and
    /// the status after the query was counted. The batch size is `input`'s
    /// first dimension; each item costs one query.
    pub fn query(
        &mut self,
        capsule: &(impl CapsuleSource + ?Sized),
        input: &Tensor,
    ) -> Result<(Tensor, Status), Error> {
        let (outputs, status) = self.query_all(capsule, std::slice::from_ref(input))?;
        let first = outputs.into_iter().next().ok_or_else(|| Error::Protocol {
            reason: "the Output frame holds no tensor".into(),
        })?;
        Ok((first, status))
    }

    /// Runs one batch on a model with several inputs, and returns every output.
    pub fn query_all(
        &mut self,
        capsule: &(impl CapsuleSource + ?Sized),
        inputs: &[Tensor],
    ) -> Result<(Vec<Tensor>, Status), Error> {
        let request = QueryRequest {
            inputs: inputs.iter().map(|t| t.shape().to_vec()).collect(),
        };
        let blob = protocol::encode_tensors(inputs);
        if protocol::frame_len(4096 + 32 * inputs.len(), blob.len()).is_none() {
            return Err(Error::InvalidInput {
                reason: format!(
                    "the batch is {} bytes, more than one {}-byte frame holds; split it into smaller batches",
                    blob.len(),
                    protocol::MAX_FRAME_LEN
                ),
            });
        }
        self.send(MessageType::Query, &request, &blob)?;
        let _: Empty = self.expect(MessageType::SendLayers)?;
        self.stream_layers(capsule)?;
        let (report, blob): (OutputReport, Vec<u8>) = self.expect_with_blob(MessageType::Output)?;
        let outputs = protocol::decode_tensors(&report.outputs, &blob)?;
        Ok((outputs, report.status))
    }

    /// Streams every layer's sealed chunks, in order (§5.6). If the capsule cannot be
    /// read to the end, the enclave is left waiting for chunks: it is out of step, and
    /// this handle is closed.
    fn stream_layers(&mut self, capsule: &(impl CapsuleSource + ?Sized)) -> Result<(), Error> {
        let mut buf = Vec::new();
        for layer in 0..capsule.header().layers.len() {
            let mut chunk = 0u64;
            let sent = capsule.each_chunk(layer, &mut |sealed| {
                let at = LayerChunk {
                    layer: layer as u32,
                    chunk,
                };
                chunk += 1;
                match sealed {
                    SealedChunk::Bytes(bytes) => self.write(MessageType::Layer, &at, bytes, false),
                    SealedChunk::File(file) => self.write_file_chunk(&at, &file, &mut buf),
                }
            });
            if let Err(e @ Error::CapsuleFile { .. }) = sent {
                self.dead = Some(e.to_string());
                return Err(e);
            }
            sent?;
        }
        self.flush()
    }

    /// `Status` (§5.7).
    pub fn status(&mut self) -> Result<Status, Error> {
        self.send(MessageType::Status, &Empty {}, &[])?;
        self.expect(MessageType::StatusReport)
    }

    /// `TopUp` (§5.8): applies a signed token; returns the new sealed state,
    /// which replaces the old one, and the new status.
    pub fn topup(&mut self, token: &str) -> Result<(Vec<u8>, Status), Error> {
        let request = TopUpRequest {
            token: token.trim().to_owned(),
        };
        self.send(MessageType::TopUp, &request, &[])?;
        let reply: ToppedUp = self.expect(MessageType::ToppedUp)?;
        Ok((reply.sealed_state, reply.status))
    }

    /// Closes the enclave's input and waits for it to exit.
    pub fn close(mut self) -> Result<ExitStatus, Error> {
        self.shut_down().ok_or_else(|| Error::EnclaveDied {
            reason: "it could not be waited for".into(),
        })
    }

    fn send<T: Serialize>(
        &mut self,
        kind: MessageType,
        control: &T,
        blob: &[u8],
    ) -> Result<(), Error> {
        self.write(kind, control, blob, true)
    }

    fn write<T: Serialize>(
        &mut self,
        kind: MessageType,
        control: &T,
        blob: &[u8],
        flush: bool,
    ) -> Result<(), Error> {
        self.write_head(kind, control, blob.len())?;
        let Some(input) = self.input.as_mut() else {
            return Err(self.died("its input was closed"));
        };
        let mut result = input.write_all(blob);
        if flush && result.is_ok() {
            result = input.flush();
        }
        result.map_err(|e| self.died(&format!("writing to it failed: {e}")))
    }

    /// Writes a frame's length, type and JSON part (§2, §3), for a blob of `blob_len`
    /// bytes that the caller writes next.
    fn write_head<T: Serialize>(
        &mut self,
        kind: MessageType,
        control: &T,
        blob_len: usize,
    ) -> Result<(), Error> {
        if let Some(reason) = &self.dead {
            return Err(Error::EnclaveDied {
                reason: reason.clone(),
            });
        }
        let json = serde_json::to_vec(control).map_err(|e| Error::Protocol {
            reason: e.to_string(),
        })?;
        let Some(input) = self.input.as_mut() else {
            return Err(self.died("its input was closed"));
        };
        let len = protocol::frame_len(json.len(), blob_len).ok_or_else(|| Error::InvalidInput {
            reason: format!(
                "a {kind:?} frame would exceed {} bytes",
                protocol::MAX_FRAME_LEN
            ),
        })?;
        let result = (|| {
            input.write_all(&len.to_be_bytes())?;
            input.write_all(&[kind as u8])?;
            input.write_all(&(json.len() as u32).to_be_bytes())?;
            input.write_all(&json)
        })();
        result.map_err(|e| self.died(&format!("writing to it failed: {e}")))
    }

    /// Writes the `Layer` frame `at` of a chunk of a capsule file. Its bytes go from the
    /// file to the pipe by `splice` (Linux): the kernel hands the file's cached pages to
    /// the pipe, and this process copies nothing (`pread` then `write` copied each
    /// byte twice, and was what held ResNet-18's layers back on their way into the
    /// enclave). Where the file cannot be spliced, they are read and written.
    fn write_file_chunk(
        &mut self,
        at: &LayerChunk,
        chunk: &FileChunk<'_>,
        buf: &mut Vec<u8>,
    ) -> Result<(), Error> {
        #[cfg(target_os = "linux")]
        if self.splice {
            self.write_head(MessageType::Layer, at, chunk.len())?;
            self.flush()?;
            let Some(input) = self.input.as_mut() else {
                return Err(self.died("its input was closed"));
            };
            match splice_chunk(chunk, input.get_ref()) {
                Ok(()) => return Ok(()),
                Err(Spliced::Unsupported) => {
                    // Nothing of the blob was sent: read and write it, and do so from now on.
                    self.splice = false;
                    let bytes = chunk.read(buf)?;
                    let written = input.write_all(bytes);
                    return written.map_err(|e| self.died(&format!("writing to it failed: {e}")));
                }
                Err(Spliced::File(e)) => return Err(chunk.failed(e)),
                Err(Spliced::Pipe(e)) => {
                    return Err(self.died(&format!("writing to it failed: {e}")));
                }
            }
        }
        let bytes = chunk.read(buf)?;
        self.write(MessageType::Layer, at, bytes, false)
    }

    fn flush(&mut self) -> Result<(), Error> {
        let result = match self.input.as_mut() {
            Some(input) => input.flush(),
            None => Ok(()),
        };
        result.map_err(|e| self.died(&format!("writing to it failed: {e}")))
    }

    /// Reads the reply: a frame of type `kind`, or an `Error` frame.
    fn expect<T: DeserializeOwned>(&mut self, kind: MessageType) -> Result<T, Error> {
        let (control, blob) = self.expect_with_blob(kind)?;
        if !blob.is_empty() {
            return Err(self.out_of_step(format!("a {kind:?} frame carries no raw bytes")));
        }
        Ok(control)
    }

    fn expect_with_blob<T: DeserializeOwned>(
        &mut self,
        kind: MessageType,
    ) -> Result<(T, Vec<u8>), Error> {
        // A counted query's answer or refusal, and a resynchronising top-up, come after
        // the new defense state (§5.6, §5.8).
        let defense_may_come = matches!(kind, MessageType::Output | MessageType::ToppedUp);
        let parsed = loop {
            let parsed = match self.output.read() {
                Ok(frame) if defense_may_come && frame.kind == MessageType::DefenseState => {
                    match frame.json_part::<DefenseStamp>() {
                        Ok(_) => {
                            self.defense_state = Some(frame.blob.to_vec());
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                Ok(frame) if frame.kind == kind => frame
                    .json_part::<T>()
                    .map(|control| Ok((control, frame.blob.to_vec()))),
                Ok(frame) if frame.kind == MessageType::Error => frame
                    .json_part::<ErrorReport>()
                    .map(|report| Err(report.into_error())),
                Ok(frame) => Err(Error::Protocol {
                    reason: format!("expected a {kind:?} frame, got {:?}", frame.kind),
                }),
                Err(ReadError::Closed) => return Err(self.died("it closed its output")),
                Err(ReadError::Io(e)) => {
                    return Err(self.died(&format!("reading from it failed: {e}")));
                }
                Err(ReadError::Malformed(e)) => Err(e),
            };
            break parsed;
        };
        match parsed {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(reported)) => {
                if reported.is_fatal() {
                    self.dead = Some(format!("it stopped after reporting: {reported}"));
                }
                Err(reported)
            }
            Err(broken) => {
                let reason = broken.to_string();
                Err(self.out_of_step(reason))
            }
        }
    }

    /// The enclave broke the protocol: nothing it says can be trusted to be in step.
    fn out_of_step(&mut self, reason: String) -> Error {
        self.dead = Some("it broke the protocol".into());
        let _ = self.child.kill();
        Error::Protocol { reason }
    }

    /// The enclave is gone; says how, as far as can be told.
    fn died(&mut self, what: &str) -> Error {
        self.input = None;
        let Some(status) = self.wait_for_exit(Duration::from_secs(2)) else {
            let reason = format!("{what}; it is still running");
            self.dead = Some(reason.clone());
            return Error::EnclaveDied { reason };
        };
        // An enclave that stops on a fatal error (say, while the host was
        // still streaming layers to it) wrote why before it exited.
        if let Ok(frame) = self.output.read()
            && frame.kind == MessageType::Error
            && let Ok(report) = frame.json_part::<ErrorReport>()
        {
            let reported = report.into_error();
            self.dead = Some(format!("it stopped after reporting: {reported}"));
            return reported;
        }
        let how = describe(status);
        let reason = format!("{what}; {how}");
        self.dead = Some(reason.clone());
        Error::EnclaveDied { reason }
    }

    fn wait_for_exit(&mut self, patience: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if start.elapsed() < patience => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None,
            }
        }
    }

    fn shut_down(&mut self) -> Option<ExitStatus> {
        // Closing its input is the enclave's signal to exit.
        self.input = None;
        if let Some(status) = self.wait_for_exit(Duration::from_secs(5)) {
            return Some(status);
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for EnclaveProcess {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// How splicing a chunk into the pipe failed.
#[cfg(target_os = "linux")]
enum Spliced {
    /// The file cannot be spliced (its file system does not support it); nothing was
    /// sent.
    Unsupported,
    /// Reading the file failed, or it ended early (`UnexpectedEof`).
    File(std::io::Error),
    /// Writing to the pipe failed: the enclave is gone.
    Pipe(std::io::Error),
}

/// Moves `chunk` from its file into `pipe`, whole.
#[cfg(target_os = "linux")]
fn splice_chunk(chunk: &FileChunk<'_>, pipe: &ChildStdin) -> Result<(), Spliced> {
    use rustix::io::Errno;
    use rustix::pipe::{SpliceFlags, splice};

    let (file, mut offset) = chunk.file();
    let mut left = chunk.len();
    while left > 0 {
        match splice(
            file,
            Some(&mut offset),
            pipe,
            None,
            left,
            SpliceFlags::empty(),
        ) {
            Ok(0) => return Err(Spliced::File(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => left -= n,
            Err(Errno::INTR) => {}
            Err(Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) if left == chunk.len() => {
                return Err(Spliced::Unsupported);
            }
            Err(e @ Errno::PIPE) => return Err(Spliced::Pipe(e.into())),
            Err(e) => return Err(Spliced::File(e.into())),
        }
    }
    Ok(())
}

/// Bytes the pipe to the enclave is asked to hold: Linux's default most for an
/// unprivileged process (`/proc/sys/fs/pipe-max-size`).
const PIPE_BYTES: usize = 1 << 20;

/// Grows the pipe that carries every query's sealed layers from its default 64 KiB to
/// [`PIPE_BYTES`], so that each side waits for the other less often: 256 KiB writes
/// through a pipe moved 0.81 GB/s with 64 KiB and 1.41 GB/s with 1 MiB on this
/// machine. Best effort: a smaller limit leaves the pipe as it is.
fn widen_pipe(stdin: &std::process::ChildStdin) {
    #[cfg(target_os = "linux")]
    let _ = rustix::pipe::fcntl_setpipe_size(stdin, PIPE_BYTES);
    #[cfg(not(target_os = "linux"))]
    let _ = stdin;
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let name = match signal {
                9 => " (SIGKILL)",
                6 => " (SIGABRT)",
                11 => " (SIGSEGV)",
                15 => " (SIGTERM)",
                31 => " (SIGSYS: a forbidden system call)",
                _ => "",
            };
            return format!("it was killed by signal {signal}{name}");
        }
    }
    match status.code() {
        Some(code) => format!("it exited with status {code}"),
        None => "it exited".into(),
    }
}

#[cfg(test)]
mod tests {
    /// The pipe to the enclave holds a megabyte where the system lets it.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_layer_pipe_is_widened() {
        let max: usize = std::fs::read_to_string("/proc/sys/fs/pipe-max-size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut child = std::process::Command::new("cat")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let before = rustix::pipe::fcntl_getpipe_size(&stdin).unwrap();
        super::widen_pipe(&stdin);
        let after = rustix::pipe::fcntl_getpipe_size(&stdin).unwrap();
        drop(stdin);
        child.wait().unwrap();
        if max >= super::PIPE_BYTES {
            assert!(
                before < super::PIPE_BYTES,
                "the default pipe is {before} bytes"
            );
            assert_eq!(after, super::PIPE_BYTES);
        } else {
            assert_eq!(after, before, "a smaller limit leaves the pipe as it is");
        }
    }

    /// The host must have no way to a key or a plaintext weight: nothing in
    /// this file, nor in what it streams capsules from, calls what takes a key or
    /// yields plaintext.
    #[test]
    fn host_never_touches_keys_or_plaintext() {
        for (file, source) in [
            ("host.rs", include_str!("host.rs")),
            ("source.rs", include_str!("source.rs")),
        ] {
            let code = &source[..source.find("#[cfg(test)]").unwrap()];
            host_code_never_mentions_keys(file, code);
        }
    }

    fn host_code_never_mentions_keys(file: &str, code: &str) {
        for forbidden in [
            "unseal",
            "open_layer",
            "open_prefix",
            "open_all",
            "model_key",
            "ModelKey",
            "Unsealer",
            "SealedModel",
            "open_grant",
            "EnclaveKey::",
            "layer_tensors",
        ] {
            assert!(!code.contains(forbidden), "{file} mentions `{forbidden}`");
        }
    }
}
