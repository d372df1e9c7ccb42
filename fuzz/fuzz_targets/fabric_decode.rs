//! The fabric frame decoder against arbitrary bytes from another host: it
//! must return a frame, "need more", or an error, and whatever frame it
//! accepts must encode back to the bytes it took.
#![no_main]

use vsocket_abi::fabric::Frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some((frame, used))) = Frame::decode(data) {
        let mut again = Vec::new();
        frame.encode(&mut again);
        assert_eq!(again, data[..used]);
    }
});
