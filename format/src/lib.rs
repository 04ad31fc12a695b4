//! The artifact contract of capture, free of model and service dependencies:
//! the PyTorch `.pt` writer and reader ([`pt`]), prompt sets ([`prompts`]),
//! a capture's `manifest.json` ([`manifest`]), and the invariants the fuzz
//! targets check on all three ([`fuzzing`]). The worker re-exports these
//! modules; the coordinator's query service reads artifacts with [`pt`].

pub mod fuzzing;
pub mod manifest;
pub mod prompts;
pub mod pt;
