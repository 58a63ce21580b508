#![no_main]
// See src/fuzzing.rs: arbitrary bytes into onkos's TIFF inspection and tile reader; only a panic,
// a hang or unbounded memory is a finding.
//
// onkos runs the `tiff` and JPEG decoders under `catch_unwind` (slides::guarded): a panic inside
// them is the file's error, which the service answers 422. libfuzzer-sys's own panic hook aborts
// at the panic, before it could be caught; this one only prints it, so a panic onkos catches is
// not a finding and one it does not catch still reaches libfuzzer-sys, which aborts.
libfuzzer_sys::fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|info| eprintln!("panic (caught or not): {info}")));
    },
    |data: &[u8]| onkos::fuzzing::tiff(data)
);
