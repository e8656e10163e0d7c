//! `mlcapsule-enclave --hardening-selftest`: after hardening exactly as the
//! enclave does, sockets, opening files and creating files are refused, and
//! the kernel reports the process not dumpable and under a seccomp filter.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use capsule_enclave::hardening::SelftestReport;
use common::{enclave_bin, proc_status_field};

#[test]
fn the_sandbox_refuses_sockets_and_files() {
    // Skip only where the kernel has no seccomp at all.
    if proc_status_field(std::process::id(), "Seccomp").is_none() {
        eprintln!("skipped: this kernel reports no Seccomp field in /proc/self/status");
        return;
    }
    let mut child = Command::new(enclave_bin())
        .arg("--hardening-selftest")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let report: SelftestReport = serde_json::from_str(&line).expect(&line);

    // Seen from outside, while it waits for its input to close.
    let pid = child.id();
    assert_eq!(proc_status_field(pid, "Seccomp").as_deref(), Some("2"));
    assert_eq!(proc_status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
    drop(child.stdin.take());
    let status = child.wait().unwrap();

    let scratch = std::env::temp_dir().join(format!("mlcapsule-enclave-selftest-{pid}"));
    let leaked = std::fs::remove_file(&scratch).is_ok();
    assert!(report.socket.refused, "socket: {}", report.socket.outcome);
    assert!(
        report.open_read.refused,
        "open: {}",
        report.open_read.outcome
    );
    assert!(
        report.create_file.refused && !leaked,
        "create: {}",
        report.create_file.outcome
    );
    assert!(!report.dumpable, "the process is still dumpable");
    assert!(report.no_new_privs && report.seccomp_filter);
    assert_eq!(report.core_limit, Some(0));
    assert!(report.passed());
    assert!(status.success());
}
