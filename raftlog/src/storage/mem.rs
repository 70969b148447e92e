//! Simulated in-memory log store (to be written).
