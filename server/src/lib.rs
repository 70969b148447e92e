//! bd-server library: NBD front end, admin, HTTP status.
pub mod nbd;
