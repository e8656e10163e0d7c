//! The enclave as its own process, through `EnclaveProcess`: setup,
//! provisioning, queries and the budget, top-ups, sealed state, and refusals.

mod common;

use capsule_enclave::{CapsuleFile, EnclaveProcess, Error, SealedModel};
use capsule_format::{Capsule, Policy};
use common::{
    SealedCapsule, Terms, bits, enclave_bin, input, mnist_capsule, proc_status_field, provision,
    ready_enclave, server_key, topup_token,
};

fn platform_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let platform = dir.path().join("platform");
    (dir, platform)
}

#[test]
fn full_flow_counts_every_query_and_matches_the_in_process_model() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let server = server_key();
    let reference = SealedModel::open(&capsule, &sealed.key).unwrap();

    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, None).unwrap();
    let info = enclave.info().clone();
    assert!(info.sim);
    assert_eq!(info.platform, "sim");
    assert_eq!(
        info.measurement,
        capsule_attest::measure_file(&enclave_bin()).unwrap()
    );
    // The real enclave, not only the self-test, runs sandboxed.
    if proc_status_field(std::process::id(), "Seccomp").is_some() {
        assert_eq!(
            proc_status_field(enclave.id(), "Seccomp").as_deref(),
            Some("2")
        );
        assert_eq!(
            proc_status_field(enclave.id(), "NoNewPrivs").as_deref(),
            Some("1")
        );
    }

    let state = provision(
        &mut enclave,
        &sealed,
        &server,
        Terms {
            queries: 4,
            ..Terms::default()
        },
    )
    .unwrap();
    let status = enclave.load(&state, &capsule).unwrap();
    assert_eq!(
        (status.used, status.total, status.left, status.topup_seq),
        (0, 4, 4, 0)
    );
    assert_eq!(status.instance_id, info.instance_id);

    for seed in 0..2 {
        let x = input(1, seed);
        let (y, status) = enclave.query(&capsule, &x).unwrap();
        let expected = reference.run(&[x]).unwrap();
        assert_eq!(bits(&y), bits(&expected[0]), "seed {seed}");
        assert_eq!(y.shape(), &[1, 10]);
        assert_eq!(status.used, seed as u64 + 1);
    }
    // A batch of two costs two queries.
    let x = input(2, 7);
    let (y, status) = enclave.query(&capsule, &x).unwrap();
    assert_eq!(bits(&y), bits(&reference.run(&[x]).unwrap()[0]));
    assert_eq!((status.used, status.left), (4, 0));

    let refused = enclave.query(&capsule, &input(1, 9)).unwrap_err();
    assert!(
        matches!(refused, Error::BudgetExhausted { used: 4, total: 4 }),
        "{refused:?}"
    );
    let message = refused.to_string();
    assert!(
        message.contains("4 of 4") && message.contains("mlcapsule topup"),
        "{message}"
    );
    assert_eq!(enclave.status().unwrap().used, 4);

    let id = info.instance_id;
    let (_state2, status) = enclave.topup(&topup_token(&server, id, 1, 6)).unwrap();
    assert_eq!((status.total, status.left, status.topup_seq), (6, 2, 1));
    for seed in 10..12 {
        let x = input(1, seed);
        let (y, _) = enclave.query(&capsule, &x).unwrap();
        assert_eq!(bits(&y), bits(&reference.run(&[x]).unwrap()[0]));
    }
    assert!(matches!(
        enclave.query(&capsule, &input(1, 12)),
        Err(Error::BudgetExhausted { used: 6, total: 6 })
    ));

    // The same token again, then an older one after a newer one.
    assert!(matches!(
        enclave.topup(&topup_token(&server, id, 1, 6)),
        Err(Error::TopUpReplayed { seq: 1, applied: 1 })
    ));
    enclave.topup(&topup_token(&server, id, 3, 8)).unwrap();
    assert!(matches!(
        enclave.topup(&topup_token(&server, id, 2, 100)),
        Err(Error::TopUpReplayed { seq: 2, applied: 3 })
    ));
    assert!(matches!(
        enclave.topup(&topup_token(&server, [0xee; 16], 4, 100)),
        Err(Error::TopUpWrongInstance)
    ));
    assert!(matches!(
        enclave.topup(&topup_token(&server_key(), id, 4, 100)),
        Err(Error::InvalidToken)
    ));
    let status = enclave.status().unwrap();
    assert_eq!((status.used, status.total, status.topup_seq), (6, 8, 3));
    assert!(enclave.close().unwrap().success());
}

#[test]
fn restoring_an_older_state_does_not_restore_queries() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let server = server_key();
    let terms = Terms {
        queries: 3,
        ..Terms::default()
    };
    let (mut enclave, old_state, _) = ready_enclave(&platform, &sealed, &server, terms);
    let id = enclave.info().instance_id;
    let (new_state, _) = enclave.topup(&topup_token(&server, id, 1, 5)).unwrap();
    for seed in 0..5 {
        enclave.query(&capsule, &input(1, seed)).unwrap();
    }
    drop(enclave);

    // The client puts the state from before the top-up and the queries back.
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, Some(id)).unwrap();
    let status = enclave.load(&old_state, &capsule).unwrap();
    assert_eq!((status.used, status.total, status.left), (5, 3, 0));
    assert!(matches!(
        enclave.query(&capsule, &input(1, 9)),
        Err(Error::BudgetExhausted { used: 5, total: 3 })
    ));
    // The newest state still works, with what is left of it.
    let status = enclave.load(&new_state, &capsule).unwrap();
    assert_eq!((status.used, status.total, status.left), (5, 5, 0));
}

#[test]
fn tampered_state_is_refused() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let (mut enclave, state, _) =
        ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    for at in [0, state.len() / 2, state.len() - 1] {
        let mut tampered = state.clone();
        tampered[at] ^= 0x01;
        let refused = enclave.load(&tampered, &capsule).unwrap_err();
        assert!(matches!(refused, Error::StateRejected), "{refused:?}");
    }
    assert!(matches!(
        enclave.load(&state[..state.len() - 1], &capsule),
        Err(Error::StateRejected)
    ));
    enclave.load(&state, &capsule).unwrap();
}

#[test]
fn state_from_another_platform_is_refused() {
    let (_dir, platform) = platform_dir();
    let (_other_dir, other) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let (enclave, state, _) = ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    let id = enclave.info().instance_id;
    drop(enclave);

    // Even with a counter of the same instance id there, another machine's
    // platform secret does not open the state.
    let other_platform = capsule_attest::SimPlatform::open_or_create(&other).unwrap();
    drop(other_platform.create_counter(&id).unwrap());
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &other, Some(id)).unwrap();
    let refused = enclave.load(&state, &capsule).unwrap_err();
    assert!(matches!(refused, Error::StateRejected), "{refused:?}");
    assert!(refused.to_string().contains("mlcapsule setup"), "{refused}");
}

#[test]
fn an_instance_without_a_counter_refuses_to_start() {
    let (_dir, platform) = platform_dir();
    let refused = match EnclaveProcess::spawn(&enclave_bin(), &platform, Some([0x42; 16])) {
        Err(e) => e,
        Ok(_) => panic!("an enclave without a counter started"),
    };
    assert!(matches!(refused, Error::NoCounter), "{refused:?}");
    let message = refused.to_string();
    assert!(
        message.contains("no counter on this platform")
            && message.contains("mlcapsule setup' again"),
        "{message}"
    );
}

#[test]
fn a_grant_for_another_instance_is_refused() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, None).unwrap();
    let terms = Terms {
        instance_id: Some([0x77; 16]),
        ..Terms::default()
    };
    let refused = provision(&mut enclave, &sealed, &server_key(), terms).unwrap_err();
    assert!(matches!(refused, Error::GrantWrongInstance), "{refused:?}");
    assert!(matches!(enclave.status(), Err(Error::NotProvisioned)));
}

#[test]
fn a_grant_opens_only_for_the_nonce_of_its_setup() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let server = server_key();
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, None).unwrap();
    let public = enclave.setup_key().unwrap();
    let grant = capsule_format::Grant::new(
        "lic".into(),
        enclave.info().instance_id,
        capsule.header().capsule_id,
        &sealed.key,
        5,
        None,
        capsule_format::server_public_key(&server),
    );
    let sealed_grant = capsule_format::seal_grant(&grant, &public, b"nonce-1").unwrap();
    assert!(matches!(
        enclave.provision(b"nonce-2", &sealed_grant),
        Err(Error::InvalidGrant)
    ));
    enclave.provision(b"nonce-1", &sealed_grant).unwrap();
    // The setup key is single-use.
    assert!(matches!(
        enclave.provision(b"nonce-1", &sealed_grant),
        Err(Error::NoEnclaveKey)
    ));
}

#[test]
fn a_wrong_protocol_version_is_refused() {
    let (_dir, platform) = platform_dir();
    let refused = match EnclaveProcess::spawn_with_version(&enclave_bin(), &platform, None, 99) {
        Err(e) => e,
        Ok(_) => panic!("the enclave accepted protocol version 99"),
    };
    assert!(
        matches!(
            refused,
            Error::UnsupportedVersion {
                expected: 1,
                found: 99
            }
        ),
        "{refused:?}"
    );
}

#[test]
fn a_capsule_the_licence_is_not_for_is_refused() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let other = mnist_capsule(Policy::default());
    let other_capsule = Capsule::parse(&other.bytes).unwrap();
    let (mut enclave, state, _) =
        ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    let refused = enclave.load(&state, &other_capsule).unwrap_err();
    let expected = hex::encode(other_capsule.header().capsule_id);
    assert!(
        matches!(&refused, Error::CapsuleMismatch { found, .. } if *found == expected),
        "{refused:?}"
    );
}

#[test]
fn a_tampered_layer_is_refused_uncounted_and_the_session_goes_on() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let (mut enclave, _, _) = ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    let mut tampered_bytes = sealed.bytes.clone();
    let at = capsule.prefix().len() + capsule.sealed_layer(0).len() + 10; // inside layer 1
    tampered_bytes[at] ^= 0x01;
    let tampered = Capsule::parse(&tampered_bytes).unwrap();
    let refused = enclave.query(&tampered, &input(1, 0)).unwrap_err();
    assert!(
        matches!(refused, Error::CapsuleRejected { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("chunk 0"), "{refused}");
    assert_eq!(enclave.status().unwrap().used, 0);
    let (_, status) = enclave.query(&capsule, &input(1, 0)).unwrap();
    assert_eq!(status.used, 1);
}

/// A capsule file streams as the capsule in memory does (its chunks go from the file
/// into the pipe by `splice`): the same outputs; a byte changed in the file is a
/// rejected layer, uncounted; a file cut after it was opened fails naming the file,
/// and the handle, out of step, refuses to go on.
#[test]
fn a_capsule_file_streams_like_the_capsule_in_memory() {
    let (dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let (mut enclave, _, _) = ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    let path = dir.path().join("mnist.capsule");
    std::fs::write(&path, &sealed.bytes).unwrap();
    let file = CapsuleFile::open(&path).unwrap();
    for seed in 0..3 {
        let (from_memory, _) = enclave.query(&capsule, &input(2, seed)).unwrap();
        let (from_file, _) = enclave.query(&file, &input(2, seed)).unwrap();
        assert_eq!(bits(&from_file), bits(&from_memory), "seed {seed}");
    }
    assert_eq!(enclave.status().unwrap().used, 12);

    // A byte in chunk 1 of the first layer with more than one chunk.
    let header = capsule.header();
    let layer = (0..header.layers.len())
        .find(|&l| header.chunk_count(l) > 1)
        .unwrap();
    let start = capsule.sealed_layer(layer).as_ptr() as usize - sealed.bytes.as_ptr() as usize;
    let mut tampered = sealed.bytes.clone();
    tampered[start + header.chunk_size as usize + 16 + 7] ^= 0x01;
    std::fs::write(&path, &tampered).unwrap();
    let refused = enclave.query(&file, &input(1, 0)).unwrap_err();
    assert!(
        matches!(refused, Error::CapsuleRejected { .. }),
        "{refused:?}"
    );
    let named = format!("layer '{}', chunk 1)", header.layers[layer].name);
    assert!(refused.to_string().contains(&named), "{refused}");
    assert_eq!(enclave.status().unwrap().used, 12);

    std::fs::write(&path, &sealed.bytes).unwrap();
    let file = CapsuleFile::open(&path).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(capsule.prefix().len() as u64 + 100)
        .unwrap();
    let cut = enclave.query(&file, &input(1, 0)).unwrap_err();
    assert!(matches!(cut, Error::CapsuleFile { .. }), "{cut:?}");
    assert!(
        cut.to_string().contains("changed while being read"),
        "{cut}"
    );
    assert!(enclave.status().is_err(), "the handle went on out of step");
}

#[test]
fn an_input_of_the_wrong_shape_is_refused_before_anything_is_streamed() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let (mut enclave, _, _) = ready_enclave(&platform, &sealed, &server_key(), Terms::default());
    let wrong = capsule_engine::Tensor::new(vec![1, 1, 28, 27], vec![0.0; 28 * 27]).unwrap();
    assert!(matches!(
        enclave.query(&capsule, &wrong),
        Err(Error::InvalidInput { .. })
    ));
    let empty = capsule_engine::Tensor::new(vec![0, 1, 28, 28], vec![]).unwrap();
    assert!(matches!(
        enclave.query(&capsule, &empty),
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(enclave.status().unwrap().used, 0);
    enclave.query(&capsule, &input(1, 0)).unwrap();
}

#[test]
fn an_expired_licence_or_policy_refuses_queries() {
    let (_dir, platform) = platform_dir();
    let sealed = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let terms = Terms {
        expires: Some("2001-01-01"),
        ..Terms::default()
    };
    let (mut enclave, _, status) = ready_enclave(&platform, &sealed, &server_key(), terms);
    assert_eq!(status.expires.as_deref(), Some("2001-01-01"));
    let refused = enclave.query(&capsule, &input(1, 0)).unwrap_err();
    assert!(
        matches!(&refused, Error::LicenceExpired { expires, .. } if expires == "2001-01-01"),
        "{refused:?}"
    );

    // The capsule's own policy caps a licence that says more.
    let (_dir, platform) = platform_dir();
    let capped = mnist_capsule(Policy {
        max_queries: Some(1),
        expires: None,
        defense: None,
    });
    let capped_capsule = Capsule::parse(&capped.bytes).unwrap();
    let (mut enclave, _, status) =
        ready_enclave(&platform, &capped, &server_key(), Terms::default());
    assert_eq!(status.total, 1);
    enclave.query(&capped_capsule, &input(1, 0)).unwrap();
    assert!(matches!(
        enclave.query(&capped_capsule, &input(1, 1)),
        Err(Error::BudgetExhausted { used: 1, total: 1 })
    ));
}

#[test]
fn requests_out_of_order_are_refused_without_ending_the_session() {
    let (_dir, platform) = platform_dir();
    let sealed: SealedCapsule = mnist_capsule(Policy::default());
    let capsule = Capsule::parse(&sealed.bytes).unwrap();
    let mut enclave = EnclaveProcess::spawn(&enclave_bin(), &platform, None).unwrap();
    assert!(matches!(
        enclave.query(&capsule, &input(1, 0)),
        Err(Error::NotProvisioned)
    ));
    assert!(matches!(enclave.attest(b"nonce"), Err(Error::NoEnclaveKey)));
    assert!(matches!(
        enclave.topup("mlcapsule-topup/v1.x.y"),
        Err(Error::NotProvisioned)
    ));
    provision(&mut enclave, &sealed, &server_key(), Terms::default()).unwrap();
    assert!(matches!(
        enclave.query(&capsule, &input(1, 0)),
        Err(Error::CapsuleNotLoaded)
    ));
    assert_eq!(enclave.status().unwrap().used, 0);
}
