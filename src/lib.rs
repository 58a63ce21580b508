//! onkos: an authenticated REST service that queues diagnostic analyses (lung and breast cancer),
//! runs ONNX models on them and stores every prediction with what is needed to trace it.
//!
//! Layout follows the house plan: `http` and `jobs` use `domain`, `repo`, `registry` and
//! `inference`; `domain` does no I/O.

pub mod app;
pub mod audit;
pub mod auth;
pub mod config;
pub mod db;
pub mod domain;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod inference;
pub mod jobs;
pub mod registry;
pub mod render;
pub mod repo;
pub mod shutdown;
pub mod slides;
pub mod storage;
pub mod telemetry;
