#![no_main]
// See src/fuzzing.rs: arbitrary bytes into onkos's csv batch parser; only a panic, a hang or
// unbounded memory is a finding.
libfuzzer_sys::fuzz_target!(|data: &[u8]| onkos::fuzzing::csv_batch(data));
