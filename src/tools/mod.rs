//! The programs that are not the daemon: the fake Truecaller upstream ([`fake_upstream`]), the
//! load generator ([`bench`]) and the auditors' command line ([`inspect`]).

pub mod bench;
pub mod fake_upstream;
pub mod inspect;
