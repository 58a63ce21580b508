//! Background work: the worker that claims queued analyses, runs them and stores their results.

pub mod completions;
pub mod intake;
pub mod reads;
pub mod retry;
pub mod sealer;
pub mod webhooks;
pub mod worker;
