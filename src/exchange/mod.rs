//! The path of one exchange, in the order it runs: the [`breaker`] admits, the [`schedule`]
//! picks the next clients, the [`limits`] grant permits, the [`worker`] claims and runs the
//! attempt through the [`upstream`] client, and [`retry`] decides what its outcome means.

pub mod breaker;
pub mod limits;
pub mod retry;
pub mod schedule;
pub mod upstream;
pub mod worker;
