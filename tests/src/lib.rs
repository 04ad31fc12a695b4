//! Shared helpers of the end-to-end tests: where the built binaries, the
//! Python reference environment, the scripts and the tiny checkpoint are, and
//! how to run them.

pub mod cluster;
pub mod fault_proxy;
pub mod hub_server;
pub mod sandbox;
