//! How the `sim` enclave process sandboxes itself (`spec/enclave-protocol.md` §8).
//!
//! [`harden`] runs once, after the enclave has opened the only files it will
//! ever need (its platform secret and its counter) and before it reads a byte
//! from the host or starts a thread:
//!
//! 1. `PR_SET_DUMPABLE 0`: no core dumps, and other processes of the same user
//!    can neither `ptrace` it nor read its `/proc/<pid>/mem`;
//! 2. `RLIMIT_CORE 0`: no core files, even if something made it dumpable again;
//! 3. `PR_SET_NO_NEW_PRIVS`: nothing it could execute gains privileges (and
//!    seccomp requires it);
//! 4. a seccomp-BPF filter, on every thread (`SECCOMP_FILTER_FLAG_TSYNC`), under
//!    which opening or creating files, sockets, executing programs, tracing
//!    other processes and changing the file system fail with `EPERM`.
//!
//! It then checks that each step took effect, including that `socket()`
//! really fails, and refuses to go on otherwise: the enclave never runs
//! unhardened.
//!
//! The filter is a **deny-list** (default: allow). An allow-list would be
//! tighter, but which system calls the C library, Rust's standard library,
//! rayon and the allocator use varies with their versions and the kernel's
//! (`rseq`, `clone3`, `futex_waitv`, `mremap`, ...), and a missing one would
//! break the enclave in the field in ways no test here would see. What the
//! sandbox must prevent is narrow and well defined: reaching any file or
//! socket the enclave did not hold when it hardened, starting programs, and
//! reading other processes. The list covers every system call that names a
//! path to open or change, creates a socket, executes, or reads another
//! process's memory, plus the known ways around such a filter (`io_uring`
//! performs opens without the syscalls, `open_by_handle_at`, mounting,
//! `bpf`, `userfaultfd`), and on x86_64 the same calls through the x32 ABI.
//! Calls from a foreign architecture (32-bit `int 0x80`) kill the process.

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Sandboxes the calling process, for good (see the module documentation).
///
/// Call it before any thread is started; it still applies its filter to
/// every thread. Fails with [`Error::Hardening`] when any step fails or does
/// not verify; the caller must then refuse to serve.
pub fn harden() -> Result<(), Error> {
    imp::harden()
}

/// What `mlcapsule-enclave --hardening-selftest` found after hardening.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelftestReport {
    /// `socket(AF_INET, SOCK_DGRAM)`.
    pub socket: Probe,
    /// Opening `/etc/hostname` for reading.
    pub open_read: Probe,
    /// Creating a file in the temporary directory.
    pub create_file: Probe,
    /// `prctl(PR_GET_DUMPABLE)` after hardening: must be false.
    pub dumpable: bool,
    /// `prctl(PR_GET_NO_NEW_PRIVS)` after hardening: must be true.
    pub no_new_privs: bool,
    /// `prctl(PR_GET_SECCOMP)` reports filter mode.
    pub seccomp_filter: bool,
    /// The soft `RLIMIT_CORE` after hardening (`None`: unlimited).
    pub core_limit: Option<u64>,
}

/// The outcome of one forbidden operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// True when the operation failed with `EPERM`, as the filter makes it.
    pub refused: bool,
    /// What happened, for a person.
    pub outcome: String,
}

impl Probe {
    fn of<T>(result: std::io::Result<T>) -> Probe {
        match result {
            Ok(_) => Probe {
                refused: false,
                outcome: "allowed".into(),
            },
            Err(e) => Probe {
                refused: e.raw_os_error() == Some(EPERM),
                outcome: format!("refused: {e}"),
            },
        }
    }
}

const EPERM: i32 = 1;

impl SelftestReport {
    /// True when every forbidden operation was refused and every setting took.
    pub fn passed(&self) -> bool {
        self.socket.refused
            && self.open_read.refused
            && self.create_file.refused
            && !self.dumpable
            && self.no_new_privs
            && self.seccomp_filter
            && self.core_limit == Some(0)
    }
}

/// Hardens this process, then tries what the sandbox forbids.
///
/// `scratch` is where it tries to create a file; if that succeeds (the
/// sandbox failed) the file is left behind for the caller to remove.
pub fn selftest(scratch: &std::path::Path) -> Result<SelftestReport, Error> {
    harden()?;
    let socket = Probe::of(std::net::UdpSocket::bind("127.0.0.1:0"));
    let open_read = Probe::of(std::fs::File::open("/etc/hostname"));
    let create_file = Probe::of(
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(scratch),
    );
    let state = imp::state();
    Ok(SelftestReport {
        socket,
        open_read,
        create_file,
        dumpable: state.dumpable,
        no_new_privs: state.no_new_privs,
        seccomp_filter: state.seccomp_filter,
        core_limit: state.core_limit,
    })
}

/// The process's hardening state as the kernel reports it.
struct State {
    dumpable: bool,
    no_new_privs: bool,
    seccomp_filter: bool,
    core_limit: Option<u64>,
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod imp {
    use std::collections::BTreeMap;

    use rustix::process::{DumpableBehavior, Resource, Rlimit};
    use rustix::thread::SecureComputingMode;
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

    use super::{EPERM, State};
    use crate::error::Error;

    #[cfg(target_arch = "x86_64")]
    const ARCH: TargetArch = TargetArch::x86_64;
    #[cfg(target_arch = "aarch64")]
    const ARCH: TargetArch = TargetArch::aarch64;

    /// `fchmodat2` (Linux 6.6), the same number on every architecture; not in every libc release.
    const SYS_FCHMODAT2: i64 = 452;

    /// System calls that fail with `EPERM` once hardened.
    fn denied() -> Vec<i64> {
        let mut calls = vec![
            // Sockets.
            libc::SYS_socket,
            libc::SYS_socketpair,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept,
            libc::SYS_accept4,
            // Opening or creating files by path or handle.
            libc::SYS_openat,
            libc::SYS_openat2,
            libc::SYS_open_by_handle_at,
            // Changing the file system.
            libc::SYS_mknodat,
            libc::SYS_linkat,
            libc::SYS_symlinkat,
            libc::SYS_renameat2,
            libc::SYS_unlinkat,
            libc::SYS_mkdirat,
            libc::SYS_truncate,
            libc::SYS_fchmodat,
            SYS_FCHMODAT2,
            libc::SYS_fchownat,
            libc::SYS_setxattr,
            libc::SYS_lsetxattr,
            libc::SYS_removexattr,
            libc::SYS_lremovexattr,
            libc::SYS_acct,
            // Running programs.
            libc::SYS_execve,
            libc::SYS_execveat,
            // Reading or steering other processes.
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_pidfd_getfd,
            // Ways around a system-call filter.
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_open_tree,
            libc::SYS_move_mount,
            libc::SYS_fsopen,
            libc::SYS_fsconfig,
            libc::SYS_fsmount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_perf_event_open,
            libc::SYS_userfaultfd,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_swapon,
            libc::SYS_swapoff,
        ];
        #[cfg(target_arch = "x86_64")]
        {
            // Path-based calls that only x86_64 still has (aarch64 has only the *at forms).
            calls.extend([
                libc::SYS_open,
                libc::SYS_creat,
                libc::SYS_mknod,
                libc::SYS_link,
                libc::SYS_symlink,
                libc::SYS_rename,
                libc::SYS_renameat,
                libc::SYS_unlink,
                libc::SYS_mkdir,
                libc::SYS_rmdir,
                libc::SYS_chmod,
                libc::SYS_chown,
                libc::SYS_lchown,
                libc::SYS_uselib,
                libc::SYS_kexec_file_load,
            ]);
            // The x32 ABI reaches the same calls with bit 30 set (when the
            // kernel enables it), and some through their own numbers.
            const X32: i64 = 0x4000_0000;
            let x32_only = [520, 521, 539, 540, 545]; // execve, ptrace, process_vm_readv/writev, execveat
            let mut x32: Vec<i64> = calls.iter().map(|nr| nr | X32).collect();
            x32.extend(x32_only.iter().map(|nr| nr | X32));
            calls.extend(x32);
        }
        #[cfg(target_arch = "aarch64")]
        calls.push(libc::SYS_renameat);
        calls
    }

    fn failed(step: &str, e: impl std::fmt::Display) -> Error {
        Error::Hardening {
            reason: format!("{step}: {e}"),
        }
    }

    pub(super) fn harden() -> Result<(), Error> {
        rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)
            .map_err(|e| failed("PR_SET_DUMPABLE", e))?;
        let none = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        rustix::process::setrlimit(Resource::Core, none).map_err(|e| failed("RLIMIT_CORE", e))?;
        rustix::thread::set_no_new_privs(true).map_err(|e| failed("PR_SET_NO_NEW_PRIVS", e))?;

        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            denied().into_iter().map(|nr| (nr, Vec::new())).collect();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(EPERM as u32),
            ARCH,
        )
        .map_err(|e| failed("building the seccomp filter", e))?;
        let program: BpfProgram = filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| failed("compiling the seccomp filter", e))?;
        seccompiler::apply_filter_all_threads(&program).map_err(|e| {
            failed(
                "installing the seccomp filter (does this kernel have seccomp?)",
                e,
            )
        })?;

        let state = state();
        if state.dumpable {
            return Err(failed("PR_SET_DUMPABLE", "the process is still dumpable"));
        }
        if state.core_limit != Some(0) {
            return Err(failed("RLIMIT_CORE", "core files are still allowed"));
        }
        if !state.no_new_privs {
            return Err(failed("PR_SET_NO_NEW_PRIVS", "the flag is not set"));
        }
        if !state.seccomp_filter {
            return Err(failed("seccomp", "the kernel reports no filter"));
        }
        match std::net::UdpSocket::bind("127.0.0.1:0") {
            Err(e) if e.raw_os_error() == Some(EPERM) => Ok(()),
            Err(e) => Err(failed(
                "seccomp",
                format!("socket() failed with {e}, not EPERM"),
            )),
            Ok(_) => Err(failed("seccomp", "socket() still works")),
        }
    }

    pub(super) fn state() -> State {
        State {
            dumpable: !matches!(
                rustix::process::dumpable_behavior(),
                Ok(DumpableBehavior::NotDumpable)
            ),
            no_new_privs: rustix::thread::no_new_privs().unwrap_or(false),
            seccomp_filter: matches!(
                rustix::thread::secure_computing_mode(),
                Ok(SecureComputingMode::Filter)
            ),
            core_limit: rustix::process::getrlimit(Resource::Core).current,
        }
    }
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod imp {
    use super::State;
    use crate::error::Error;

    pub(super) fn harden() -> Result<(), Error> {
        Err(Error::Hardening {
            reason:
                "the sim enclave's sandbox (seccomp) exists only on Linux on x86_64 and aarch64"
                    .into(),
        })
    }

    pub(super) fn state() -> State {
        State {
            dumpable: true,
            no_new_privs: false,
            seccomp_filter: false,
            core_limit: None,
        }
    }
}
