//! Fuzzes the JWT pre-parser of the HTTP ingress (`gateway/src/http/jwt.rs`): the compact-JWS
//! shape test, the bounded JOSE header decoding and, on what it accepts, the claims decoding
//! and checks that follow a good signature, never panic; what is accepted has the JWS shape
//! within the bounds, and a granted identity is a usable device id.
//!
//! Input: the token's bytes (as they follow `Bearer ` in an `Authorization` header).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::http::jwt::fuzz_pre_parse;

fuzz_target!(|data: &[u8]| {
    fuzz_pre_parse(data);
});
