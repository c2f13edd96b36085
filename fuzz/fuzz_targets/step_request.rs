//! The gate's decoding of a `Gate.Step` request's activations against its sequences.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moemesh_common::fuzz::step_request(data);
});
