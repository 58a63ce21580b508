//! The vocabulary of onkos — analyses, models and their input contracts, results — with no I/O.

#[cfg(feature = "service")]
pub mod analysis;
pub mod batch;
pub mod contract;
#[cfg(feature = "service")]
pub mod ids;
#[cfg(feature = "service")]
pub mod provenance;
#[cfg(feature = "service")]
pub mod result;
