#![no_main]
// See src/fuzzing.rs: arbitrary bytes into onkos's DICOM WSI inspection and frame-table tile
// reader; only a panic, a hang or unbounded memory is a finding.
libfuzzer_sys::fuzz_target!(|data: &[u8]| onkos::fuzzing::dicom(data));
