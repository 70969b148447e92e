//! bd-server library: NBD front end, admin, HTTP status.
pub mod error;
pub mod nbd;

pub use error::Error;
