//! Integration tests: the real router on a real port, a real Postgres (a fresh database per test in
//! a private cluster) and a real ONNX Runtime. The worker is stepped explicitly, never awaited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod analyses;
mod auth;
mod batches;
mod dicom;
mod embeddings;
mod fhir;
mod helpers;
mod inference;
mod input_contract;
mod limits;
mod metrics;
mod models;
mod moto;
mod openapi;
mod openslide;
mod outage;
mod provenance;
mod queue;
mod registry;
mod slides;
mod startup;
mod storage;
mod tenancy;
mod tracing;
mod webhooks;
