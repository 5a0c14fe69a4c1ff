//! Fuzzes the conversions endpoint's request path: body bytes → `ConversionInput` →
//! validation → Kafka event → decode. Invariants: nothing panics; whatever validation
//! accepts becomes an event that decodes back to itself (the consumer never dead-letters a
//! conversion the endpoint accepted), keeps within the contract's bounds, and never holds
//! the raw customer id; an error never quotes the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::conversion::{validate, ConversionEvent, ConversionInput, ConversionType, MAX_AMOUNT};

const NOW: u64 = 1_780_000_000_000;

fuzz_target!(|data: &[u8]| {
    match ConversionInput::from_json(data) {
        Err(e) => {
            assert_eq!(e.field, "body");
            assert!(e.reason.len() < 80);
        }
        Ok(input) => match validate(&input, NOW) {
            Ok(conversion) => {
                assert!(conversion.amount <= MAX_AMOUNT);
                if conversion.kind == ConversionType::Lead {
                    assert_eq!((conversion.amount, conversion.currency.as_str()), (0, ""));
                }
                let event = ConversionEvent::new(
                    &conversion,
                    &[7; 32],
                    "k1",
                    NOW,
                    "acct_1",
                    "key_0123456789abcdef",
                );
                let bytes = event.encode();
                let decoded = ConversionEvent::decode(&bytes).map(|(e, _)| e);
                assert_eq!(decoded.as_ref(), Ok(&event), "accepted conversion does not round-trip");
                let text = String::from_utf8_lossy(&bytes);
                assert!(
                    !text.contains(&format!("\"{}\"", conversion.customer_id)),
                    "the raw customer id is in the event"
                );
            }
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in errors {
                    assert!(e.reason.len() < 100, "{}", e.reason);
                }
            }
        },
    }
});
