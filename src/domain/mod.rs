//! The domain: what a job is, what a checked exchange request is, and how secrets are held.
//! Everything else builds on these types; this folder depends on nothing else in the crate.

pub mod budget;
pub mod job;
pub mod request;
pub mod secret;
