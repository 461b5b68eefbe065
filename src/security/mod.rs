//! Who may call ([`tenants`]), how secrets are sealed at rest ([`crypto`]), and the daemon's
//! private files ([`private_files`]: key files, the database, the lock).

pub mod crypto;
pub mod private_files;
pub mod tenants;
