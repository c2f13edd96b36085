//! An expert worker's decoding of an `Expert.Forward` request's tokens and (expert, weight) pairs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moemesh_common::fuzz::forward_request(data);
});
