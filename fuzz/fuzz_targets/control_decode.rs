//! The control-message decoder against arbitrary datagrams: it must return
//! a message or an error, and whatever it accepts must encode back to the
//! same bytes.
#![no_main]

use vsocket_abi::control::{Message, MAX_MESSAGE};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(message) = Message::decode(data) {
        let mut buf = [0u8; MAX_MESSAGE];
        assert_eq!(message.encode(&mut buf), data);
    }
});
