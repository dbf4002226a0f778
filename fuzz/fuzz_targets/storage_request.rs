//! /v1/storage request bodies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tokenvault_webhook::protocol::storage::{Collection, StorageRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<StorageRequest>(data) {
        if let Some(c) = r.collection.as_deref() {
            if let Some(c) = Collection::parse(c) {
                assert_eq!(Collection::parse(c.name()), Some(c));
            }
        }
        let _ = (r.operation, r.key, r.data, r.options, r.collections, r.request_id);
    }
});
