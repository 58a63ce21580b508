//! Pure renderings of stored analyses into other formats.

pub mod fhir;
