//! Fuzzes `capture_format::fuzzing::check_prompt_file` (its docs say what it checks).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    capture_format::fuzzing::check_prompt_file(data);
});
