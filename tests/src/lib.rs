//! Support code for the cross-process tests.
