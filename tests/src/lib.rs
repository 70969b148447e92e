//! bd end-to-end and simulation tests.

pub mod lincheck;
pub mod sim;
