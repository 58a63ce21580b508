#![no_main]
// See src/fuzzing.rs: arbitrary bytes into onkos's manifest parser; only a panic, a hang or
// unbounded memory is a finding.
libfuzzer_sys::fuzz_target!(|data: &[u8]| onkos::fuzzing::manifest(data));
