//! The vocabulary of onkos — analyses, models and their input contracts, results — with no I/O.

pub mod analysis;
pub mod contract;
pub mod ids;
pub mod provenance;
pub mod result;
