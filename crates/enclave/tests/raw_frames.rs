//! The enclave process against raw bytes (`spec/enclave-protocol.md` §2, §4):
//! a malformed frame gets an `Error` frame, then the process exits.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use capsule_enclave::protocol::{
    self, ErrorReport, FrameReader, Hello, MessageType, PROTOCOL_VERSION, Ready,
};
use common::enclave_bin;

/// Starts a new instance, says `Hello`, sends `garbage`, and returns the
/// error the enclave reported and whether it exited unsuccessfully.
fn send_after_hello(garbage: &[u8]) -> (ErrorReport, bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(enclave_bin())
        .arg("--platform")
        .arg(dir.path().join("platform"))
        .arg("--new-instance")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut frames = FrameReader::new(child.stdout.take().unwrap());
    protocol::write_frame(
        &mut stdin,
        MessageType::Hello,
        &Hello {
            version: PROTOCOL_VERSION,
        },
        &[],
    )
    .unwrap();
    let ready = frames.read().unwrap();
    assert_eq!(ready.kind, MessageType::Ready);
    let _: Ready = ready.control().unwrap();
    stdin.write_all(garbage).unwrap();
    stdin.flush().unwrap();
    let frame = frames.read().unwrap();
    assert_eq!(frame.kind, MessageType::Error);
    let report: ErrorReport = frame.json_part().unwrap();
    // It exits without waiting for its input to close.
    let status = child.wait().unwrap();
    (report, !status.success())
}

fn frame(kind: u8, json: &[u8], blob: &[u8]) -> Vec<u8> {
    let mut out = ((1 + 4 + json.len() + blob.len()) as u32)
        .to_be_bytes()
        .to_vec();
    out.push(kind);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    out.extend_from_slice(blob);
    out
}

#[test]
fn an_unknown_message_type_is_reported_then_the_enclave_exits() {
    let (report, failed) = send_after_hello(&frame(0x42, b"{}", b""));
    assert_eq!(report.code, "malformed_frame");
    assert!(report.message.contains("0x42"), "{}", report.message);
    assert!(failed);
}

#[test]
fn an_oversized_length_is_reported_then_the_enclave_exits() {
    let (report, failed) = send_after_hello(&[0xff, 0xff, 0xff, 0xff, 0x08]);
    assert_eq!(report.code, "malformed_frame");
    assert!(failed);
}

#[test]
fn bad_json_and_out_of_place_frames_are_reported_then_the_enclave_exits() {
    let (report, failed) = send_after_hello(&frame(0x08, b"{\"x\":1}", b""));
    assert_eq!(report.code, "malformed_frame");
    assert!(failed);
    let (report, failed) = send_after_hello(&frame(0x07, b"{\"layer\":0,\"chunk\":0}", b"x"));
    assert_eq!(report.code, "malformed_frame");
    assert!(report.message.contains("Layer"), "{}", report.message);
    assert!(failed);
    let (report, failed) = send_after_hello(&frame(0x01, b"{\"version\":1}", b""));
    assert_eq!(report.code, "malformed_frame");
    assert!(failed);
}

#[test]
fn the_first_frame_must_be_hello() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(enclave_bin())
        .arg("--platform")
        .arg(dir.path().join("platform"))
        .arg("--new-instance")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&frame(0x08, b"{}", b"")).unwrap();
    let mut frames = FrameReader::new(child.stdout.take().unwrap());
    let reply = frames.read().unwrap();
    assert_eq!(reply.kind, MessageType::Error);
    let report: ErrorReport = reply.json_part().unwrap();
    assert_eq!(report.code, "malformed_frame");
    assert!(!child.wait().unwrap().success());
}

#[test]
fn bad_arguments_are_a_usage_error() {
    let out = Command::new(enclave_bin())
        .arg("--platform")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage:"));
    let out = Command::new(enclave_bin())
        .args(["--platform", "/tmp/x", "--instance", "zz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
