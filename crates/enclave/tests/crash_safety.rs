//! Crash safety: an enclave killed at any moment never has released more
//! outputs than its monotonic counter has counted (the counter is committed
//! before the output is written), and loses at most the query in flight.

mod common;

use std::time::{Duration, Instant};

use capsule_attest::{MonotonicCounter, SimPlatform};
use capsule_enclave::{EnclaveProcess, Error};
use capsule_format::{Capsule, Policy};
use common::{Terms, enclave_bin, input, mnist_capsule, ready_enclave, server_key};
use rustix::process::{Pid, Signal, kill_process};

/// A small xorshift generator: the delays only need to spread, not be secret.
struct Delays(u64);

impl Delays {
    fn next(&mut self, max_micros: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_micros(self.0 % max_micros)
    }
}

#[test]
fn a_killed_enclave_never_released_an_uncounted_output() {
    const ITERATIONS: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let platform = dir.path().join("platform");
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let terms = Terms {
        queries: 1_000_000,
        ..Terms::default()
    };
    let (enclave, state, _) = ready_enclave(&platform, &sealed, &server_key(), terms);
    let id = enclave.info().instance_id;
    drop(enclave);

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("delay seed {seed}");
    let mut delays = Delays(seed);
    let started = Instant::now();
    let mut received = 0u64;
    let mut killed_mid_query = 0;
    for iteration in 0..ITERATIONS {
        let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, Some(id)).unwrap();
        enclave.load(&state, &capsule).unwrap();
        let pid = Pid::from_raw(enclave.id() as i32).unwrap();
        let delay = delays.next(40_000);
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            kill_process(pid, Signal::KILL).unwrap();
        });
        let mut seed = iteration as u32 * 1000;
        let died = loop {
            seed += 1;
            match enclave.query(&capsule, &input(1, seed)) {
                Ok((_, status)) => {
                    received += 1;
                    assert!(status.used >= received);
                }
                Err(e) => break e,
            }
        };
        killer.join().unwrap();
        assert!(matches!(died, Error::EnclaveDied { .. }), "{died:?}");
        assert!(
            died.to_string().contains("SIGKILL")
                && died
                    .to_string()
                    .contains("not counted unless the status shows it"),
            "{died}"
        );
        drop(enclave);

        let counted = SimPlatform::open_or_create(&platform)
            .unwrap()
            .open_counter(&id)
            .unwrap()
            .value();
        assert!(
            received <= counted,
            "iteration {iteration}: {received} outputs received but only {counted} counted"
        );
        let lost = counted - received;
        assert!(
            lost <= iteration as u64 + 1,
            "iteration {iteration}: {lost} queries counted without an output, more than one per crash"
        );
        if lost as usize == killed_mid_query + 1 {
            killed_mid_query += 1;
        }
    }
    eprintln!(
        "{ITERATIONS} kills in {:.1?}: {received} outputs received, {killed_mid_query} kills between counting and answering",
        started.elapsed()
    );
    // The status agrees with the counter after all this.
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, Some(id)).unwrap();
    let status = enclave.load(&state, &capsule).unwrap();
    assert!(status.used >= received);
}
