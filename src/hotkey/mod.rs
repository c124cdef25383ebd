//! Hot-key detection: sampled keys go into per-thread heavy-hitter
//! structures (`sketch`); the `detector` merges them every window, applies
//! the hot rule and publishes the result (DESIGN.md decision 6).

pub mod detector;
pub mod fleet;
pub mod sampler;
pub mod sketch;

pub use detector::{Detector, HotEntry};
