//! openlora's end-to-end tests, one binary.

mod default_model;
mod malformed;
mod reference_logits;
