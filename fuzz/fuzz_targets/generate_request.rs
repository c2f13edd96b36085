//! The frontend's request validator (tokenizer, chat template and stop strings included) on a
//! `GenerateRequest` built from, or decoded from, the input bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    moemesh_frontend::fuzz::generate_request(data);
});
