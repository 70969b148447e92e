//! Per-core WAL (to be written).
