//! The ring's producer and consumer against arbitrary shared state.
//! `cargo fuzz run ring_hostile` (see docs/ARCHITECTURE.md, "Testing").
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vsocket_ring::hostile::exercise(data);
});
