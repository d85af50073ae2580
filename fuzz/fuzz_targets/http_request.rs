//! Fuzzes the HTTP ingress's request parsers (`gateway/src/http/request.rs`, `auth.rs`): the
//! topic from a publish path, the SSE filters and encoding from a query, QoS and retain from
//! a query and headers, and the bearer token from an `Authorization` value never panic; what
//! they accept is valid (topic names, 1..=max distinct valid filters, `b64token` tokens); a
//! refusal renders an error response.
//!
//! Input: path, query and header value separated by the first two 0xFF bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::http::request::fuzz_request;

fuzz_target!(|data: &[u8]| {
    fuzz_request(data, 4);
});
