//! MLCapsule's trusted side, and the host's handle on it.
//!
//! A client runs a capsule through an *enclave*: the only place where the
//! model key and the plaintext weights exist, and where the query budget is
//! enforced. This crate holds both halves of that boundary and the protocol
//! between them (`spec/enclave-protocol.md`):
//!
//! - **In the enclave process** (`mlcapsule-enclave`, this crate's binary):
//!   [`Session`] serves the paper's ECALLs over stdin/stdout: make a setup key
//!   and have the platform attest it, open the grant the provisioning server
//!   sealed to that key, seal the licence state to the platform, and answer
//!   queries. For each query the host streams every layer's sealed chunks;
//!   the enclave unseals a layer just before the first node that reads it and
//!   zeroizes it after the last, runs the engine, and releases the output
//!   only after the platform's monotonic counter has durably counted it. At
//!   start it sandboxes itself ([`hardening`]): not dumpable, no core files,
//!   and a seccomp filter under which it cannot open a file or a socket.
//! - **The provider's defenses**, inside that process, on every query, as the
//!   capsule's authenticated policy says (`spec/policy.md`, `capsule-defense`):
//!   the input detector sealed beside the model runs first and can refuse the
//!   query before any of the model's layers is opened; then the model; then
//!   PRADA on the input and the predicted class; then noising and the output
//!   policies on what leaves. PRADA's memory and the detections live in a
//!   sealed *defense state* stamped with the query counter, which the host
//!   must store with every answer: an older copy is refused until a top-up
//!   resynchronises it, and alarms and refusals also advance monotonic
//!   counters of their own, so that no rollback undoes them.
//! - **On the host** (the CLI, untrusted): [`EnclaveProcess`] starts the
//!   enclave, passes it public and sealed bytes and reads back public values,
//!   sealed blobs and counted outputs. It never sees a model key or a weight.
//! - **In-process**, for the provider's developer mode only: [`SealedModel`]
//!   opens a capsule with its model key in the calling process and runs the
//!   model alone, without the policy; [`measure_defense_costs`] times the
//!   defenses' own code for benchmarks.
//!
//! ```no_run
//! # fn demo(capsule_bytes: &[u8], sealed_state: &[u8], x: capsule_engine::Tensor)
//! #     -> Result<(), capsule_enclave::Error> {
//! use capsule_enclave::{EnclaveProcess, default_enclave_binary};
//! let capsule = capsule_format::Capsule::parse(capsule_bytes)?;
//! let instance = [0u8; 16]; // from `mlcapsule setup`
//! let mut enclave = EnclaveProcess::spawn(
//!     &default_enclave_binary(),
//!     std::path::Path::new("/home/me/.mlcapsule/platform"),
//!     Some(instance),
//! )?;
//! enclave.load(sealed_state, &capsule)?;
//! let (scores, status) = enclave.query(&capsule, &x)?;
//! println!("{} queries left", status.left);
//! # Ok(()) }
//! ```
//!
//! # What the `sim` platform does not protect
//!
//! On `sim` (the only platform so far) the "enclave" is an ordinary process
//! of the client's user, sandboxed by the operating system, and the
//! platform's keys are a secret file in the platform directory. That keeps
//! other unprivileged processes out, and keeps a state copied to another
//! machine from opening. It does **not** protect against the machine's owner
//! or root: they can read the platform secret, and with it forge evidence,
//! unseal the licence state (and the model key in it), and reset or roll back
//! the monotonic counter; they can also read the enclave's memory with
//! root's ptrace and set the clock that expiry dates are checked against.
//! Like SGX's simulation mode, `sim` is for development and evaluation; the
//! provisioning server refuses `sim` evidence unless it was told to accept it,
//! and `Ready::sim` lets the host say so every time.
//!
//! What this crate does not do: parse ONNX, talk to a network, or read files
//! (the enclave reads only its platform directory, before it hardens). The
//! engine's own scratch buffers (GEMM packing, im2col) are freed without being
//! zeroized.

mod ahead;
mod cost;
mod defense;
mod error;
mod grouping;
pub mod hardening;
mod host;
mod ledger;
mod model;
pub mod protocol;
mod session;
mod source;
mod stream;

pub use cost::{DefenseCosts, measure_defense_costs};
pub use defense::{Detection, detection_counter_id};
pub use error::{Error, WireDetails};
pub use grouping::seal_layers;
pub use host::{ENCLAVE_ENV, EnclaveProcess, default_enclave_binary};
pub use model::{SealedModel, StreamingModel};
pub use protocol::{DefenseStatus, PROTOCOL_VERSION, PradaStatus, Ready, Status};
pub use session::{MAX_DEFENSE_STATE, Session};
pub use source::{CapsuleFile, CapsuleSource, FileChunk, SealedChunk};
