//! Streaming at one engine thread when rayon's pool has no other worker (a machine,
//! CPU quota or affinity of one core): the query's thread opens every layer and wipes
//! every buffer itself, with no job on the pool to wait for. In a test binary of its
//! own, because the pool is process-wide.

mod common;

#[test]
fn streaming_on_one_core_gives_the_plain_bits_and_names_a_tampered_chunk() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("nothing in this test binary has used rayon yet");
    common::streaming::streaming_matches_plain_query_after_query(&[1]);
    common::streaming::a_tampered_chunk_is_named_query_after_query(&[1]);
    assert_eq!(rayon::current_num_threads(), 1);
}
