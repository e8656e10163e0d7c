//! The `sim` platform (`spec/attestation.md` §3–§5): a TEE emulated in software for
//! development. A 32-byte secret in a private directory stands in for the keys a real
//! TEE keeps in hardware.
//!
//! Everything that touches files is here, in [`SimPlatform`]; the attester and the counter
//! hold in-memory keys and already-open handles only.

mod attester;
mod counter;
mod keys;
mod verifier;

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub use attester::SimAttester;
pub use counter::SimCounter;
pub use verifier::SimVerifier;

use crate::Error;
use counter::INSTANCE_ID_LEN;
use keys::{KEY_LEN, Key};

/// Name of the platform secret in the platform directory.
const SECRET_FILE: &str = "platform-secret";
/// Name of the directory of counter files in the platform directory.
const COUNTERS_DIR: &str = "counters";
/// Mode of the directories the platform creates.
const DIR_MODE: u32 = 0o700;
/// Mode of the files the platform creates.
const FILE_MODE: u32 = 0o600;
/// Permission bits of the secret and of `counters/` that would let other users in.
const GROUP_OTHER_BITS: u32 = 0o077;
/// Permission bits of the platform directory that would let other users replace its
/// entries. Reading or listing it reveals only names (`platform-secret`, `counters`), so a
/// directory someone else created with the usual `0755` (a temporary directory, say) is
/// accepted; the platform creates its own with `0700`.
const GROUP_OTHER_WRITE_BITS: u32 = 0o022;

/// A `sim` platform: one directory holding the platform secret and the counters.
///
/// It emulates a TEE for development. It protects against other unprivileged users of the
/// machine (the directory is private) and against copying state to another machine (another
/// directory has another secret). It does **not** protect against whoever can read the
/// directory, the machine's owner or root: they can forge evidence for any measurement,
/// unseal any state and reset counters (`spec/attestation.md` §2).
///
/// Layout (`spec/attestation.md` §3):
///
/// ```text
/// <dir>/                       mode 0700
///   platform-secret            32 random bytes, mode 0600
///   counters/                  mode 0700
///     <hex instance id>        80 bytes, mode 0600 (spec §4.4)
/// ```
pub struct SimPlatform {
    dir: PathBuf,
    secret: Key,
}

impl std::fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPlatform")
            .field("dir", &self.dir)
            .field("platform_id", &hex::encode(self.platform_id()))
            .finish_non_exhaustive()
    }
}

impl SimPlatform {
    /// Opens the platform directory, creating it (mode 0700) and its secret (32 random
    /// bytes, file `platform-secret`, mode 0600) on first use.
    ///
    /// The secret is written to a temporary file and then hard-linked to its name, which
    /// fails if the name exists: the secret appears atomically and complete, and two
    /// processes racing to create it agree on the one that won.
    ///
    /// Refuses ([`Error::InsecurePermissions`]) a platform directory that other users can
    /// write, a secret or `counters` directory that they can access at all, and ([`Error::InvalidPlatformSecret`]) a secret that is not 32 bytes.
    pub fn open_or_create(dir: &Path) -> Result<SimPlatform, Error> {
        DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(Error::io("create the platform directory", dir))?;
        ensure_private_dir(dir, GROUP_OTHER_WRITE_BITS)?;
        let secret_path = dir.join(SECRET_FILE);
        let secret = match read_secret(&secret_path)? {
            Some(secret) => secret,
            None => create_secret(dir, &secret_path)?,
        };
        let counters = dir.join(COUNTERS_DIR);
        match DirBuilder::new().mode(DIR_MODE).create(&counters) {
            Ok(()) => sync_dir(dir)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io("create the counters directory", &counters)(e)),
        }
        ensure_private_dir(&counters, GROUP_OTHER_BITS)?;
        Ok(SimPlatform {
            dir: dir.to_path_buf(),
            secret,
        })
    }

    /// The platform directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The platform's Ed25519 attestation public key, as put in
    /// [`crate::Evidence::platform_key`].
    pub fn platform_key(&self) -> [u8; 32] {
        keys::attestation_public_key(&keys::attestation_seed(&self.secret))
    }

    /// SHA-256 of [`SimPlatform::platform_key`], as a verifier reports it in
    /// [`crate::VerifiedEvidence::platform_id`]: lets a server pin known machines.
    pub fn platform_id(&self) -> [u8; 32] {
        keys::platform_id(&self.platform_key())
    }

    /// The attester of the enclave build with this `measurement` (see
    /// [`crate::measure_file`]). It holds keys only, no file.
    pub fn attester(&self, measurement: [u8; 32]) -> SimAttester {
        SimAttester::new(&self.secret, measurement)
    }

    /// Creates the counter of one enclave instance at 0; fails with
    /// [`Error::CounterExists`] if it exists.
    ///
    /// The file is written and fsync'd under a temporary name, then hard-linked to
    /// `counters/<hex instance id>` (which fails if that exists), then the `counters`
    /// directory is fsync'd: the counter appears complete or not at all. The returned
    /// counter holds the file open and locked.
    pub fn create_counter(&self, instance_id: &[u8; 16]) -> Result<SimCounter, Error> {
        let counters = self.dir.join(COUNTERS_DIR);
        let path = self.counter_path(instance_id);
        let temporary = counters.join(format!(
            "{}.{}.tmp",
            hex::encode(instance_id),
            hex::encode(random_suffix()?)
        ));
        let key = keys::counter_key(&self.secret);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temporary)
            .map_err(Error::io("create the counter", &temporary))?;
        let linked = (|| {
            file.write_all_at(&counter::initial_file(&key, instance_id), 0)
                .map_err(Error::io("write the counter", &temporary))?;
            file.sync_all()
                .map_err(Error::io("sync the counter", &temporary))?;
            lock_counter(&file, &temporary, instance_id)?;
            fs::hard_link(&temporary, &path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::CounterExists {
                        instance_id: *instance_id,
                    }
                } else {
                    Error::io("create the counter", &path)(e)
                }
            })
        })();
        // Best effort: a leftover `*.tmp` file is never read and may be deleted.
        let _ = fs::remove_file(&temporary);
        linked?;
        sync_dir(&counters)?;
        Ok(SimCounter::new(file, path, *instance_id, key, 0))
    }

    /// Opens an existing counter; a missing ([`Error::CounterMissing`]) or tampered
    /// ([`Error::CounterTampered`]) counter is an error, never silently 0.
    ///
    /// The counter is locked while the returned handle lives: a second
    /// `open_counter` of the same instance, from this or another process, fails with
    /// [`Error::CounterInUse`] until it is dropped.
    pub fn open_counter(&self, instance_id: &[u8; 16]) -> Result<SimCounter, Error> {
        let path = self.counter_path(instance_id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| counter_open_error(e, &path, instance_id))?;
        lock_counter(&file, &path, instance_id)?;
        let key = keys::counter_key(&self.secret);
        let bytes = counter::read_file(&file, &path)?;
        let value =
            counter::decode_file(&key, instance_id, &bytes).ok_or(Error::CounterTampered {
                instance_id: *instance_id,
            })?;
        Ok(SimCounter::new(file, path, *instance_id, key, value))
    }

    /// The current value of a counter, read without taking it (for status displays; an
    /// open [`SimCounter`] may be incrementing it meanwhile). Errors as
    /// [`SimPlatform::open_counter`], except that it is never [`Error::CounterInUse`].
    pub fn read_counter(&self, instance_id: &[u8; 16]) -> Result<u64, Error> {
        let path = self.counter_path(instance_id);
        let file = File::open(&path).map_err(|e| counter_open_error(e, &path, instance_id))?;
        let bytes = counter::read_file(&file, &path)?;
        counter::decode_file(&keys::counter_key(&self.secret), instance_id, &bytes).ok_or(
            Error::CounterTampered {
                instance_id: *instance_id,
            },
        )
    }

    fn counter_path(&self, instance_id: &[u8; INSTANCE_ID_LEN]) -> PathBuf {
        self.dir.join(COUNTERS_DIR).join(hex::encode(instance_id))
    }

    /// The counter MAC key (tests forge counter files with it).
    #[cfg(test)]
    pub(crate) fn counter_key(&self) -> Key {
        keys::counter_key(&self.secret)
    }
}

fn counter_open_error(e: io::Error, path: &Path, instance_id: &[u8; 16]) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::CounterMissing {
            instance_id: *instance_id,
        }
    } else {
        Error::io("open the counter", path)(e)
    }
}

fn lock_counter(file: &File, path: &Path, instance_id: &[u8; 16]) -> Result<(), Error> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(Error::CounterInUse {
            instance_id: *instance_id,
        }),
        Err(TryLockError::Error(e)) => Err(Error::io("lock the counter", path)(e)),
    }
}

/// Refuses a directory whose permission bits include any of `forbidden`.
fn ensure_private_dir(path: &Path, forbidden: u32) -> Result<(), Error> {
    let metadata = fs::metadata(path).map_err(Error::io("inspect the platform directory", path))?;
    if !metadata.is_dir() {
        return Err(Error::io("use as a platform directory", path)(
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    ensure_private_mode(path, metadata.mode(), forbidden)
}

fn ensure_private_mode(path: &Path, mode: u32, forbidden: u32) -> Result<(), Error> {
    if mode & forbidden != 0 {
        return Err(Error::InsecurePermissions {
            path: path.to_path_buf(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// The platform secret, or `None` if it does not exist yet.
fn read_secret(path: &Path) -> Result<Option<Key>, Error> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("open the platform secret", path)(e)),
    };
    let metadata = file
        .metadata()
        .map_err(Error::io("inspect the platform secret", path))?;
    if !metadata.is_file() || metadata.len() != KEY_LEN as u64 {
        return Err(Error::InvalidPlatformSecret {
            path: path.to_path_buf(),
        });
    }
    ensure_private_mode(path, metadata.mode(), GROUP_OTHER_BITS)?;
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    file.read_exact(&mut secret[..])
        .map_err(Error::io("read the platform secret", path))?;
    Ok(Some(secret))
}

/// Creates the platform secret, or returns the one another process created first.
fn create_secret(dir: &Path, path: &Path) -> Result<Key, Error> {
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    SystemRandom::new()
        .fill(&mut secret[..])
        .map_err(|_| Error::RandomFailed)?;
    let temporary = dir.join(format!(
        "{SECRET_FILE}.{}.tmp",
        hex::encode(random_suffix()?)
    ));
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&temporary)?;
        file.write_all(&secret[..])?;
        file.sync_all()
    })()
    .map_err(Error::io("write the platform secret", &temporary));
    let linked = written.and_then(|()| match fs::hard_link(&temporary, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::io("create the platform secret", path)(e)),
    });
    // Best effort: a leftover `*.tmp` file is never read and may be deleted.
    let _ = fs::remove_file(&temporary);
    if !linked? {
        // Another process won the race: use its secret.
        return read_secret(path)?.ok_or_else(|| {
            Error::io("read the platform secret", path)(io::ErrorKind::NotFound.into())
        });
    }
    sync_dir(dir)?;
    // The platform directory itself may be new: make its name durable too.
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent)?,
        _ => sync_dir(Path::new("."))?,
    }
    Ok(secret)
}

fn random_suffix() -> Result<[u8; 8], Error> {
    let mut suffix = [0u8; 8];
    SystemRandom::new()
        .fill(&mut suffix)
        .map_err(|_| Error::RandomFailed)?;
    Ok(suffix)
}

/// Makes the entries of a directory durable.
fn sync_dir(path: &Path) -> Result<(), Error> {
    File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(Error::io("sync the directory", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Attester, MonotonicCounter, SimVerifier, Verifier};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_platform_is_private() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/b/platform");
        let platform = SimPlatform::open_or_create(&dir).unwrap();
        assert_eq!(platform.dir(), dir);
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(SECRET_FILE)), 0o600);
        assert_eq!(mode(&dir.join(COUNTERS_DIR)), 0o700);
        assert_eq!(fs::read(dir.join(SECRET_FILE)).unwrap().len(), 32);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [COUNTERS_DIR, SECRET_FILE]);
    }

    #[test]
    fn reopening_keeps_the_secret() {
        let root = tempfile::tempdir().unwrap();
        let first = SimPlatform::open_or_create(root.path()).unwrap();
        let second = SimPlatform::open_or_create(root.path()).unwrap();
        assert_eq!(first.platform_id(), second.platform_id());
        let sealed = first.attester([1; 32]).seal(b"", b"state").unwrap();
        assert_eq!(
            &second.attester([1; 32]).unseal(b"", &sealed).unwrap()[..],
            b"state"
        );
        let other = SimPlatform::open_or_create(&root.path().join("other")).unwrap();
        assert_ne!(first.platform_id(), other.platform_id());
    }

    #[test]
    fn concurrent_first_use_yields_one_secret() {
        for _ in 0..5 {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("platform");
            let threads = 8;
            let barrier = std::sync::Barrier::new(threads);
            let ids: Vec<[u8; 32]> = std::thread::scope(|scope| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        scope.spawn(|| {
                            barrier.wait();
                            SimPlatform::open_or_create(&dir).unwrap().platform_id()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
            assert_eq!(
                SimPlatform::open_or_create(&dir).unwrap().platform_id(),
                ids[0]
            );
            // No temporary file is left behind.
            assert_eq!(fs::read_dir(&dir).unwrap().count(), 2);
        }
    }

    #[test]
    fn a_directory_others_can_access_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("platform");
        SimPlatform::open_or_create(&dir).unwrap();

        // Readable by others (e.g. a temporary directory made with umask 022): names only.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        SimPlatform::open_or_create(&dir).unwrap();
        // Writable by others: they could replace the secret or the counters.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o775)).unwrap();
        let err = SimPlatform::open_or_create(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::InsecurePermissions { path, mode: 0o775 } if *path == dir),
            "{err}"
        );
        assert!(err.to_string().contains("chmod go-rwx"), "{err}");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();

        let secret = dir.join(SECRET_FILE);
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            SimPlatform::open_or_create(&dir),
            Err(Error::InsecurePermissions { path, .. }) if path == secret
        ));
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();

        let counters = dir.join(COUNTERS_DIR);
        fs::set_permissions(&counters, fs::Permissions::from_mode(0o701)).unwrap();
        assert!(matches!(
            SimPlatform::open_or_create(&dir),
            Err(Error::InsecurePermissions { path, .. }) if path == counters
        ));
        fs::set_permissions(&counters, fs::Permissions::from_mode(0o700)).unwrap();
        SimPlatform::open_or_create(&dir).unwrap();
    }

    #[test]
    fn a_secret_of_the_wrong_length_is_refused_not_replaced() {
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join(SECRET_FILE);
        for len in [0, 31, 33] {
            fs::write(&secret, vec![1u8; len]).unwrap();
            fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
            let err = SimPlatform::open_or_create(root.path()).unwrap_err();
            assert!(matches!(err, Error::InvalidPlatformSecret { .. }), "{err}");
            assert_eq!(fs::read(&secret).unwrap().len(), len);
        }
    }

    #[test]
    fn a_file_where_the_directory_should_be_is_an_io_error() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(
            SimPlatform::open_or_create(&file),
            Err(Error::Io { .. })
        ));
    }

    #[test]
    fn debug_shows_no_secret() {
        let root = tempfile::tempdir().unwrap();
        let platform = SimPlatform::open_or_create(root.path()).unwrap();
        let secret = hex::encode(fs::read(root.path().join(SECRET_FILE)).unwrap());
        let mut counter = platform.create_counter(&[1; 16]).unwrap();
        counter.increment().unwrap();
        for debug in [
            format!("{platform:?}"),
            format!("{:?}", platform.attester([0; 32])),
            format!("{counter:?}"),
        ] {
            assert!(!debug.contains(&secret), "{debug}");
            assert!(
                !debug.contains(&hex::encode(&platform.counter_key()[..])),
                "{debug}"
            );
        }
    }

    /// The worked example of `spec/attestation.md` §6, recomputed from a fixed secret.
    fn vector_lines() -> Vec<String> {
        let secret: Key = Zeroizing::new(std::array::from_fn(|i| i as u8));
        let measurement = [0x11; 32];
        let report_data = [0x22; 64];
        let instance_id = [0x0f; 16];
        let nonce: [u8; 12] = std::array::from_fn(|i| 0xa0 + i as u8);
        let attester = SimAttester::new(&secret, measurement);
        let evidence = attester.attest(&report_data).unwrap();
        SimVerifier.verify(&evidence, &report_data).unwrap();
        let sealed = attester.seal_with_nonce(nonce, b"state", b"hello").unwrap();
        assert_eq!(&attester.unseal(b"state", &sealed).unwrap()[..], b"hello");
        let counter_key = keys::counter_key(&secret);
        let mut after_one = counter::initial_file(&counter_key, &instance_id);
        after_one[counter::SLOT_LEN..].copy_from_slice(&counter::encode_slot(
            &counter_key,
            &instance_id,
            1,
        ));
        assert_eq!(
            counter::decode_file(&counter_key, &instance_id, &after_one),
            Some(1)
        );
        let seed = keys::attestation_seed(&secret);
        [
            ("secret", hex::encode(&secret[..])),
            ("attestation seed", hex::encode(&seed[..])),
            ("platform key", hex::encode(&evidence.platform_key)),
            (
                "platform id",
                hex::encode(keys::platform_id(&evidence.platform_key)),
            ),
            ("measurement", hex::encode(measurement)),
            ("report data", hex::encode(report_data)),
            (
                "signed message",
                hex::encode(verifier::signed_report(
                    crate::SIM,
                    &measurement,
                    &report_data,
                )),
            ),
            ("signature", hex::encode(&evidence.signature)),
            (
                "seal key",
                hex::encode(&keys::seal_key(&secret, &measurement)[..]),
            ),
            ("seal nonce", hex::encode(nonce)),
            ("seal aad", hex::encode(b"state")),
            ("seal plaintext", hex::encode(b"hello")),
            ("sealed", hex::encode(&sealed)),
            ("counter key", hex::encode(&counter_key[..])),
            ("instance id", hex::encode(instance_id)),
            (
                "counter file at 0",
                hex::encode(counter::initial_file(&counter_key, &instance_id)),
            ),
            ("counter file at 1", hex::encode(after_one)),
        ]
        .into_iter()
        .map(|(name, value)| format!("{name}: {value}"))
        .collect()
    }

    #[test]
    fn the_spec_example_matches_the_code() {
        let spec = include_str!("../../../../spec/attestation.md");
        let lines = vector_lines();
        let missing: Vec<_> = lines
            .iter()
            .filter(|line| !spec.lines().any(|l| l == line.as_str()))
            .collect();
        assert!(
            missing.is_empty(),
            "spec/attestation.md §6 lacks {missing:#?}\nthe section should read:\n{}",
            lines.join("\n")
        );
    }
}
