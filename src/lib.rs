//! onkos: an authenticated REST service that queues diagnostic analyses (lung and breast cancer),
//! runs ONNX models on them and stores every prediction with what is needed to trace it.
//!
//! Layout follows the house plan: `http` and `jobs` use `domain`, `repo`, `registry` and
//! `inference`; `domain` does no I/O.
//!
//! Without the default `service` feature only the parsers onkos owns are built (`domain`'s
//! contracts and batches, `slides`' format readers, `fuzzing`): what `tests/fuzz` instruments.

#[cfg(feature = "service")]
pub mod app;
#[cfg(feature = "service")]
pub mod audit;
#[cfg(feature = "service")]
pub mod auth;
#[cfg(feature = "service")]
pub mod config;
#[cfg(feature = "service")]
pub mod db;
pub mod domain;
#[cfg(feature = "service")]
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "service")]
pub mod http;
#[cfg(feature = "service")]
pub mod inference;
#[cfg(feature = "service")]
pub mod jobs;
#[cfg(feature = "service")]
pub mod registry;
#[cfg(feature = "service")]
pub mod render;
#[cfg(feature = "service")]
pub mod repo;
#[cfg(feature = "service")]
pub mod shutdown;
pub mod slides;
#[cfg(feature = "service")]
pub mod storage;
#[cfg(feature = "service")]
pub mod telemetry;
