//! The wire contract of capture (gRPC services and typed ids); filled in by the
//! distributed-capture issue.
