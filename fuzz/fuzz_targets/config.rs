//! Fuzzes the config parser (`gateway/src/config/`): any text is either a config or a list of
//! diagnostics, each at a line and column inside the text, never a panic.
//!
//! Input: the config text (lossy UTF-8).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sensorgate::config::{Config, LoadError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(Path::new("/fuzz/sensorgate.toml"), &text) {
        Ok(config) => {
            let _ = config.summary();
        }
        Err(LoadError::Invalid(diagnostics)) => {
            assert!(!diagnostics.is_empty());
            let lines = text.lines().count().max(1);
            for d in &diagnostics {
                assert!(d.line >= 1 && d.line <= lines + 1, "{d:?} in {lines} lines");
                assert!(d.column >= 1, "{d:?}");
            }
        }
        Err(LoadError::Read { .. }) => unreachable!("parse reads no file"),
    }
});
