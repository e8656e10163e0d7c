//! `mlcapsule-enclave`: the enclave process of the `sim` platform
//! (`spec/enclave-protocol.md` §1, §8).
//!
//! ```text
//! mlcapsule-enclave --platform DIR (--new-instance | --instance HEX) [--memory-budget BYTES]
//! ```
//!
//! Start-up, in this order: measure its own binary; open the platform; create
//! (new instance) or open (existing instance) its monotonic counter and its two
//! detection counters; harden
//! itself; then serve the protocol on stdin/stdout until stdin closes. A
//! start-up failure is reported as one `Error` frame on stdout. Started by
//! the host (`capsule_enclave::EnclaveProcess`), not by people.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use capsule_attest::{SimPlatform, measure_file};
use capsule_enclave::{Detection, Error, Session, detection_counter_id, hardening, protocol};

/// Weight buffers and tensors start on cache lines, so that a kernel's speed
/// does not depend on where `malloc` put them (see [`capsule_engine::LineAligned`]).
#[global_allocator]
static ALLOCATOR: capsule_engine::LineAligned = capsule_engine::LineAligned;

const USAGE: &str = "usage: mlcapsule-enclave --platform DIR (--new-instance | --instance HEX) [--memory-budget BYTES]\n\
                     This program is started by 'mlcapsule'; it speaks a binary protocol on stdin/stdout.";

enum Mode {
    Serve {
        platform: PathBuf,
        instance: Option<[u8; 16]>,
        memory_budget: Option<u64>,
    },
    Selftest,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse_args(&args) {
        Ok(Mode::Serve {
            platform,
            instance,
            memory_budget,
        }) => serve(&platform, instance, memory_budget),
        Ok(Mode::Selftest) => selftest(),
        Err(message) => {
            eprintln!("mlcapsule-enclave: {message}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse_args(args: &[String]) -> Result<Mode, String> {
    if args == ["--hardening-selftest"] {
        return Ok(Mode::Selftest);
    }
    let mut platform = None;
    let mut instance = None;
    let mut new_instance = false;
    let mut memory_budget = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--platform" => {
                let dir = it.next().ok_or("--platform needs a directory")?;
                platform = Some(PathBuf::from(dir));
            }
            "--new-instance" => new_instance = true,
            "--instance" => {
                let hex_id = it.next().ok_or("--instance needs an instance id")?;
                let mut id = [0u8; 16];
                hex::decode_to_slice(hex_id, &mut id)
                    .map_err(|_| format!("--instance '{hex_id}' is not 32 hexadecimal digits"))?;
                instance = Some(id);
            }
            "--memory-budget" => {
                let bytes = it.next().ok_or("--memory-budget needs a number of bytes")?;
                let bytes = bytes
                    .parse::<u64>()
                    .ok()
                    .filter(|&b| b > 0)
                    .ok_or_else(|| format!("--memory-budget '{bytes}' is not a number of bytes"))?;
                memory_budget = Some(bytes);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    let platform = platform.ok_or("--platform is required")?;
    match (new_instance, instance) {
        (true, None) => Ok(Mode::Serve {
            platform,
            instance: None,
            memory_budget,
        }),
        (false, Some(id)) => Ok(Mode::Serve {
            platform,
            instance: Some(id),
            memory_budget,
        }),
        _ => Err("give exactly one of --new-instance and --instance HEX".into()),
    }
}

fn serve(platform: &Path, instance: Option<[u8; 16]>, memory_budget: Option<u64>) -> ExitCode {
    // Our own handles on stdin/stdout: unbuffered by std, and taken before
    // hardening (duplicating a descriptor is allowed after it anyway).
    let (input, output, hook_output) = match (
        dup(std::io::stdin()),
        dup(std::io::stdout()),
        dup(std::io::stdout()),
    ) {
        (Ok(i), Ok(o), Ok(h)) => (i, o, h),
        _ => {
            eprintln!("mlcapsule-enclave: cannot use standard input and output");
            return ExitCode::from(2);
        }
    };
    // Code should not panic; if it does, the host gets an error frame, not silence.
    std::panic::set_hook(Box::new(move |info| {
        let error = Error::Internal {
            reason: info.to_string().replace('\n', " "),
        };
        let _ = protocol::write_error(&mut &hook_output, &error);
        std::process::exit(70);
    }));
    let mut output = output;
    let mut session = match start(platform, instance) {
        Ok(session) => session.with_memory_budget(memory_budget),
        Err(e) => {
            let _ = protocol::write_error(&mut output, &e);
            return ExitCode::FAILURE;
        }
    };
    match session.serve(input, output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// Measure, open the platform and the counter, then harden: after this no
/// file or socket can be opened, so everything the enclave will ever need
/// from the file system is in hand.
fn start(platform_dir: &Path, instance: Option<[u8; 16]>) -> Result<Session, Error> {
    let platform_error = |e: capsule_attest::Error| Error::Platform {
        reason: e.to_string(),
    };
    let measurement = measure_file(Path::new("/proc/self/exe")).map_err(platform_error)?;
    let platform = SimPlatform::open_or_create(platform_dir).map_err(platform_error)?;
    let (instance_id, counter) = match instance {
        None => {
            let mut id = [0u8; 16];
            SystemRandom::new()
                .fill(&mut id)
                .map_err(|_| Error::Platform {
                    reason: "the system's random number generator failed".into(),
                })?;
            (id, platform.create_counter(&id).map_err(platform_error)?)
        }
        Some(id) => match platform.open_counter(&id) {
            Ok(counter) => (id, counter),
            Err(capsule_attest::Error::CounterMissing { .. }) => return Err(Error::NoCounter),
            Err(e) => return Err(platform_error(e)),
        },
    };
    // Detections have counters of their own (enclave-protocol §7.4). Instances set up
    // before they existed get them, at 0, on their next start.
    let detections = |kind| {
        let id = detection_counter_id(&instance_id, kind);
        match platform.open_counter(&id) {
            Ok(counter) => Ok(counter),
            Err(capsule_attest::Error::CounterMissing { .. }) => {
                platform.create_counter(&id).map_err(platform_error)
            }
            Err(e) => Err(platform_error(e)),
        }
    };
    let alarms = detections(Detection::PradaAlarm)?;
    let refusals = detections(Detection::DetectorRefusal)?;
    let attester = platform.attester(measurement);
    hardening::harden()?;
    Ok(
        Session::new(Box::new(attester), Box::new(counter), instance_id)
            .with_detection_counters(Box::new(alarms), Box::new(refusals)),
    )
}

/// `--hardening-selftest`: harden exactly as the enclave does, try what the
/// sandbox forbids, print one JSON line, then wait for stdin to close (so
/// that a test can inspect `/proc/<pid>/status`). Exits 0 only if every
/// forbidden operation was refused.
fn selftest() -> ExitCode {
    let scratch =
        std::env::temp_dir().join(format!("mlcapsule-enclave-selftest-{}", std::process::id()));
    let report = match hardening::selftest(&scratch) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("mlcapsule-enclave: {e}");
            return ExitCode::FAILURE;
        }
    };
    let line = serde_json::to_string(&report).unwrap_or_default();
    println!("{line}");
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn dup(stream: impl AsFd) -> std::io::Result<File> {
    Ok(File::from(stream.as_fd().try_clone_to_owned()?))
}
