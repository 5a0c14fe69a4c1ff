//! Fuzzes the request path of the endpoint: body bytes → `ClickInput` → validation →
//! Kafka event → decode. Invariants: nothing panics; whatever validation accepts encodes
//! (the way ingest encodes it, byte for byte the event's own encoding) into an event that
//! decodes back to itself (the consumer never dead-letters a click the
//! endpoint accepted); an error never quotes the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::click::{validate, ClickInput, DEFAULT_CODE_LEN};
use shared::event::{ClickEvent, ClickEventRef};

fuzz_target!(|data: &[u8]| {
    match ClickInput::from_json(data) {
        Err(e) => {
            assert_eq!(e.field, "body");
            assert!(e.reason.len() < 80);
        }
        Ok(input) => {
            if let Ok(click) = validate(&input, DEFAULT_CODE_LEN) {
                let borrowed = ClickEventRef::new(
                    &click,
                    &[7; 32],
                    &[9; 32],
                    "k1",
                    false,
                    1_700_000_000_000,
                    "acct_1",
                );
                let (bytes, event) = (borrowed.encode(), borrowed.to_event());
                assert_eq!(bytes, event.encode(), "ingest's encoding differs from the event's");
                let decoded = ClickEvent::decode(&bytes);
                assert_eq!(decoded.as_ref(), Ok(&event), "accepted click does not round-trip");
            }
        }
    }
});
