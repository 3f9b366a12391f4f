//! Crash points for fault-injection tests.
//!
//! `SYMB_FAULT=<point>` makes the process abort (as `kill -9` would: no
//! destructors, no cleanup) when it reaches that point, so that a test can
//! check that every commit point leaves a state the next build recovers from.
//! The points are named where they are reached:
//!
//! | point                 | reached                                                   |
//! |-----------------------|-----------------------------------------------------------|
//! | `after-blobs:STAGE`   | the stage's artifacts are blobs, its record not yet written |
//! | `after-record:STAGE`  | its action record is committed, its ref not yet saved      |
//! | `checkpoint-partial:N`| training's step-N checkpoint has new parameters, the rest not yet |
//! | `output-staged`       | the new output folder is complete beside the old one       |
//! | `output-moved-aside`  | (without an atomic exchange) the old folder is aside, the new not in |
//! | `output-swapped`      | the new folder replaced the old, which is not yet removed  |
//!
//! Unset (always, outside tests), a point costs one comparison.

use std::sync::OnceLock;

/// The environment variable that names the crash point.
const FAULT_VAR: &str = "SYMB_FAULT";

/// Aborts the process if `SYMB_FAULT` names `point`.
pub fn point(point: &str) {
    static FAULT: OnceLock<Option<String>> = OnceLock::new();
    if FAULT
        .get_or_init(|| std::env::var(FAULT_VAR).ok().filter(|v| !v.is_empty()))
        .as_deref()
        == Some(point)
    {
        eprintln!("symb: {FAULT_VAR}: aborting at `{point}`");
        std::process::abort();
    }
}
