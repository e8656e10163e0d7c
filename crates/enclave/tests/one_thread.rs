//! Streaming at one engine thread, where the query's thread leaves the opening of
//! the next layers and the wiping of large spent ones to the pool's other worker.
//! In a test binary of its own, because `set_threads` is process-wide.

mod common;

#[test]
fn streaming_gives_the_plain_bits_and_names_a_tampered_chunk_at_one_and_two_threads() {
    common::streaming::streaming_matches_plain_query_after_query(&[1, 2]);
    common::streaming::a_tampered_chunk_is_named_query_after_query(&[1, 2]);
}
