//! The `sim` monotonic counter (`spec/attestation.md` §4.4): a file of two authenticated
//! slots, written alternately, so that a torn write leaves the other slot valid.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use aws_lc_rs::hmac;

use super::keys::Key;
use crate::{Error, MonotonicCounter};

/// Length of an enclave instance id.
pub(crate) const INSTANCE_ID_LEN: usize = 16;
/// One slot: `value (u64 BE) || HMAC-SHA256 (32 bytes)`.
pub(crate) const SLOT_LEN: usize = 8 + 32;
/// A counter file: slot 0 then slot 1.
pub(crate) const COUNTER_FILE_LEN: usize = 2 * SLOT_LEN;
/// Domain separation of the slot MAC.
const SLOT_CONTEXT: &[u8] = b"mlcapsule/v1 counter";

/// The slot holding `value`: `value` lives in slot `value % 2`.
fn slot_of(value: u64) -> usize {
    (value % 2) as usize
}

fn slot_mac_input(instance_id: &[u8; INSTANCE_ID_LEN], value: u64) -> Vec<u8> {
    [SLOT_CONTEXT, instance_id, &value.to_be_bytes()].concat()
}

/// `value || HMAC(counter key, "mlcapsule/v1 counter" || instance_id || value)`.
pub(crate) fn encode_slot(
    key: &Key,
    instance_id: &[u8; INSTANCE_ID_LEN],
    value: u64,
) -> [u8; SLOT_LEN] {
    let mac = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, &key[..]),
        &slot_mac_input(instance_id, value),
    );
    let mut slot = [0u8; SLOT_LEN];
    slot[..8].copy_from_slice(&value.to_be_bytes());
    slot[8..].copy_from_slice(mac.as_ref());
    slot
}

/// The bytes of a newly created counter: slot 0 holds 0, slot 1 is all zeros (invalid).
pub(crate) fn initial_file(
    key: &Key,
    instance_id: &[u8; INSTANCE_ID_LEN],
) -> [u8; COUNTER_FILE_LEN] {
    let mut file = [0u8; COUNTER_FILE_LEN];
    file[..SLOT_LEN].copy_from_slice(&encode_slot(key, instance_id, 0));
    file
}

/// The counter's value in a counter file: the larger of the valid slots, where slot `i` is
/// valid if its MAC verifies and its value is `i` modulo 2. `None` if the file is not
/// [`COUNTER_FILE_LEN`] bytes or neither slot is valid.
pub(crate) fn decode_file(
    key: &Key,
    instance_id: &[u8; INSTANCE_ID_LEN],
    bytes: &[u8],
) -> Option<u64> {
    if bytes.len() != COUNTER_FILE_LEN {
        return None;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, &key[..]);
    bytes
        .chunks_exact(SLOT_LEN)
        .enumerate()
        .filter_map(|(index, slot)| {
            let value = u64::from_be_bytes(slot[..8].try_into().expect("8 bytes"));
            let valid = slot_of(value) == index
                && hmac::verify(&key, &slot_mac_input(instance_id, value), &slot[8..]).is_ok();
            valid.then_some(value)
        })
        .max()
}

/// Reads a whole counter file through `file` (positioned reads, no seek, no reopen).
pub(crate) fn read_file(file: &File, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let len = file
        .metadata()
        .map_err(Error::io("read the counter", path))?
        .len();
    // A file of the wrong length is invalid; do not read an arbitrary amount to find out.
    let mut bytes = vec![
        0u8;
        usize::try_from(len)
            .map_or(COUNTER_FILE_LEN + 1, |l| l.min(COUNTER_FILE_LEN + 1))
    ];
    file.read_exact_at(&mut bytes, 0)
        .map_err(Error::io("read the counter", path))?;
    Ok(bytes)
}

/// The `sim` platform's [`MonotonicCounter`] of one enclave instance, made by
/// [`crate::SimPlatform::create_counter`] or [`crate::SimPlatform::open_counter`].
///
/// It keeps its file open, with an exclusive lock, for its whole life and never reopens it
/// by path: the enclave process opens its counter before it locks itself down and then only
/// needs `pwrite64(2)` and `fdatasync(2)` on that descriptor to [`increment`]. The lock
/// (released when the counter is dropped or the process exits) keeps a second handle, in
/// this or another process, from counting the same values twice.
///
/// [`increment`]: MonotonicCounter::increment
pub struct SimCounter {
    file: File,
    /// For error messages only: the file is never reopened.
    path: PathBuf,
    instance_id: [u8; INSTANCE_ID_LEN],
    key: Key,
    value: u64,
}

impl std::fmt::Debug for SimCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimCounter")
            .field("path", &self.path)
            .field("instance_id", &hex::encode(self.instance_id))
            .field("value", &self.value)
            .finish_non_exhaustive()
    }
}

impl SimCounter {
    /// A counter over an open, locked file whose current value is `value`.
    pub(crate) fn new(
        file: File,
        path: PathBuf,
        instance_id: [u8; INSTANCE_ID_LEN],
        key: Key,
        value: u64,
    ) -> SimCounter {
        SimCounter {
            file,
            path,
            instance_id,
            key,
            value,
        }
    }

    /// The enclave instance this counter belongs to.
    pub fn instance_id(&self) -> [u8; 16] {
        self.instance_id
    }
}

impl MonotonicCounter for SimCounter {
    fn value(&self) -> u64 {
        self.value
    }

    fn increment(&mut self) -> Result<u64, Error> {
        let next = self.value.checked_add(1).ok_or(Error::CounterExhausted {
            instance_id: self.instance_id,
        })?;
        let slot = encode_slot(&self.key, &self.instance_id, next);
        // The other slot still holds `value`: if this write tears, reading falls back to it.
        let offset = (slot_of(next) * SLOT_LEN) as u64;
        self.file
            .write_all_at(&slot, offset)
            .map_err(Error::io("write the counter", &self.path))?;
        self.file
            .sync_data()
            .map_err(Error::io("sync the counter", &self.path))?;
        self.value = next;
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimPlatform;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    const ID: [u8; 16] = [0x0f; 16];

    fn platform() -> (tempfile::TempDir, SimPlatform) {
        let dir = tempfile::tempdir().unwrap();
        let platform = SimPlatform::open_or_create(dir.path()).unwrap();
        (dir, platform)
    }

    fn counter_path(dir: &tempfile::TempDir, id: &[u8; 16]) -> PathBuf {
        dir.path().join("counters").join(hex::encode(id))
    }

    #[test]
    fn a_new_counter_starts_at_zero_and_increments_durably_across_reopen() {
        let (dir, platform) = platform();
        let mut counter = platform.create_counter(&ID).unwrap();
        assert_eq!(counter.value(), 0);
        assert_eq!(counter.instance_id(), ID);
        for expected in 1..=5 {
            assert_eq!(counter.increment().unwrap(), expected);
            assert_eq!(counter.value(), expected);
        }
        drop(counter);
        assert_eq!(platform.read_counter(&ID).unwrap(), 5);

        // A new process: a new platform handle on the same directory.
        let platform = SimPlatform::open_or_create(dir.path()).unwrap();
        let mut counter = platform.open_counter(&ID).unwrap();
        assert_eq!(counter.value(), 5);
        assert_eq!(counter.increment().unwrap(), 6);
        drop(counter);
        assert_eq!(platform.open_counter(&ID).unwrap().value(), 6);
        let bytes = std::fs::read(counter_path(&dir, &ID)).unwrap();
        assert_eq!(bytes.len(), COUNTER_FILE_LEN);
    }

    #[test]
    fn counters_of_different_instances_are_independent() {
        let (_dir, platform) = platform();
        let mut a = platform.create_counter(&[1; 16]).unwrap();
        let mut b = platform.create_counter(&[2; 16]).unwrap();
        a.increment().unwrap();
        a.increment().unwrap();
        b.increment().unwrap();
        drop((a, b));
        assert_eq!(platform.read_counter(&[1; 16]).unwrap(), 2);
        assert_eq!(platform.read_counter(&[2; 16]).unwrap(), 1);
    }

    #[test]
    fn a_corrupted_slot_falls_back_to_the_other_slot() {
        let (dir, platform) = platform();
        let mut counter = platform.create_counter(&ID).unwrap();
        for _ in 0..3 {
            counter.increment().unwrap();
        }
        drop(counter);
        // Value 3 is in slot 1, value 2 in slot 0.
        let path = counter_path(&dir, &ID);
        let genuine = std::fs::read(&path).unwrap();

        // A torn write of 3 into slot 1: the counter reads 2, and the next increment is 3.
        let mut torn = genuine.clone();
        torn[SLOT_LEN + 20] ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        let mut counter = platform.open_counter(&ID).unwrap();
        assert_eq!(counter.value(), 2);
        assert_eq!(counter.increment().unwrap(), 3);
        drop(counter);
        assert_eq!(std::fs::read(&path).unwrap(), genuine);

        // Slot 0 corrupted: slot 1 still says 3.
        let mut torn = genuine.clone();
        torn[3] ^= 0x01;
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(platform.open_counter(&ID).unwrap().value(), 3);
    }

    #[test]
    fn both_slots_corrupted_is_tampering() {
        let (dir, platform) = platform();
        let mut counter = platform.create_counter(&ID).unwrap();
        counter.increment().unwrap();
        drop(counter);
        let path = counter_path(&dir, &ID);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[SLOT_LEN - 1] ^= 1;
        bytes[COUNTER_FILE_LEN - 1] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = platform.open_counter(&ID).unwrap_err();
        assert!(
            matches!(err, Error::CounterTampered { instance_id } if instance_id == ID),
            "{err}"
        );
        assert!(err.to_string().starts_with("counter tampered"), "{err}");
        assert!(platform.read_counter(&ID).is_err());
    }

    #[test]
    fn a_slot_moved_to_the_other_position_or_another_instance_is_invalid() {
        let key: Key = Zeroizing::new([1; 32]);
        let mut file = [0u8; COUNTER_FILE_LEN];
        // Value 4 belongs in slot 0; put it in slot 1.
        file[SLOT_LEN..].copy_from_slice(&encode_slot(&key, &ID, 4));
        assert_eq!(decode_file(&key, &ID, &file), None);
        file[..SLOT_LEN].copy_from_slice(&encode_slot(&key, &ID, 4));
        assert_eq!(decode_file(&key, &ID, &file), Some(4));
        assert_eq!(decode_file(&key, &[0; 16], &file), None);
        assert_eq!(decode_file(&Zeroizing::new([2; 32]), &ID, &file), None);
        assert_eq!(decode_file(&key, &ID, &file[..COUNTER_FILE_LEN - 1]), None);
        assert_eq!(decode_file(&key, &ID, &[&file[..], &[0]].concat()), None);
    }

    #[test]
    fn a_counter_file_copied_from_another_platform_or_instance_is_tampered() {
        let (dir, platform) = platform();
        let (other_dir, other) = self::platform();
        let mut counter = other.create_counter(&ID).unwrap();
        counter.increment().unwrap();
        drop(counter);
        drop(platform.create_counter(&ID).unwrap());
        std::fs::copy(counter_path(&other_dir, &ID), counter_path(&dir, &ID)).unwrap();
        assert!(matches!(
            platform.open_counter(&ID),
            Err(Error::CounterTampered { .. })
        ));

        drop(platform.create_counter(&[3; 16]).unwrap());
        std::fs::copy(counter_path(&dir, &[3; 16]), counter_path(&dir, &ID)).unwrap();
        assert!(matches!(
            platform.open_counter(&ID),
            Err(Error::CounterTampered { .. })
        ));
    }

    #[test]
    fn a_truncated_or_extended_counter_file_is_tampered() {
        let (dir, platform) = platform();
        drop(platform.create_counter(&ID).unwrap());
        let path = counter_path(&dir, &ID);
        let genuine = std::fs::read(&path).unwrap();
        for bytes in [
            Vec::new(),
            genuine[..SLOT_LEN].to_vec(),
            [&genuine[..], &[0u8; 1][..]].concat(),
            [&genuine[..], &[0u8; 4096][..]].concat(),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            assert!(matches!(
                platform.open_counter(&ID),
                Err(Error::CounterTampered { .. })
            ));
        }
    }

    #[test]
    fn opening_a_missing_counter_is_an_error_not_zero() {
        let (_dir, platform) = platform();
        let err = platform.open_counter(&ID).unwrap_err();
        assert!(
            matches!(err, Error::CounterMissing { instance_id } if instance_id == ID),
            "{err}"
        );
        assert!(err.to_string().contains(&hex::encode(ID)), "{err}");
        assert!(matches!(
            platform.read_counter(&ID),
            Err(Error::CounterMissing { .. })
        ));
    }

    #[test]
    fn creating_a_counter_twice_is_an_error_and_keeps_the_first() {
        let (dir, platform) = platform();
        let mut counter = platform.create_counter(&ID).unwrap();
        counter.increment().unwrap();
        drop(counter);
        assert!(matches!(
            platform.create_counter(&ID),
            Err(Error::CounterExists { instance_id }) if instance_id == ID
        ));
        assert_eq!(platform.open_counter(&ID).unwrap().value(), 1);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("counters"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(hex::encode(ID))]);
    }

    #[test]
    fn a_counter_has_one_handle_at_a_time() {
        let (_dir, platform) = platform();
        let mut first = platform.create_counter(&ID).unwrap();
        assert!(matches!(
            platform.open_counter(&ID),
            Err(Error::CounterInUse { instance_id }) if instance_id == ID
        ));
        first.increment().unwrap();
        // Reading is allowed meanwhile.
        assert_eq!(platform.read_counter(&ID).unwrap(), 1);
        drop(first);
        let second = platform.open_counter(&ID).unwrap();
        assert!(matches!(
            platform.open_counter(&ID),
            Err(Error::CounterInUse { .. })
        ));
        assert_eq!(second.value(), 1);
    }

    #[test]
    fn increment_keeps_working_after_the_file_is_renamed_away() {
        // The counter never reopens by path (the enclave cannot open files once locked down).
        let (dir, platform) = platform();
        let mut counter = platform.create_counter(&ID).unwrap();
        let path = counter_path(&dir, &ID);
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        assert_eq!(counter.increment().unwrap(), 1);
        assert_eq!(counter.increment().unwrap(), 2);
        drop(counter);
        std::fs::rename(&moved, &path).unwrap();
        assert_eq!(platform.open_counter(&ID).unwrap().value(), 2);
    }

    #[test]
    fn a_counter_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, platform) = platform();
        drop(platform.create_counter(&ID).unwrap());
        let mode = std::fs::metadata(counter_path(&dir, &ID))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        let (dir, platform) = platform();
        drop(platform.create_counter(&ID).unwrap());
        let key = platform.counter_key();
        let mut bytes = [0u8; COUNTER_FILE_LEN];
        bytes[SLOT_LEN..].copy_from_slice(&encode_slot(&key, &ID, u64::MAX));
        std::fs::write(counter_path(&dir, &ID), bytes).unwrap();
        let mut counter = platform.open_counter(&ID).unwrap();
        assert_eq!(counter.value(), u64::MAX);
        assert!(matches!(
            counter.increment(),
            Err(Error::CounterExhausted { .. })
        ));
        assert_eq!(counter.value(), u64::MAX);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn random_counter_bytes_never_decode_and_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let key: Key = Zeroizing::new([1; 32]);
            prop_assert_eq!(decode_file(&key, &ID, &bytes), None);
        }

        #[test]
        fn a_random_counter_file_never_opens_and_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let (dir, platform) = platform();
            drop(platform.create_counter(&ID).unwrap());
            std::fs::write(counter_path(&dir, &ID), &bytes).unwrap();
            prop_assert!(
                matches!(platform.open_counter(&ID), Err(Error::CounterTampered { .. })),
                "opened"
            );
        }
    }
}
