//! bd end-to-end and simulation tests.
