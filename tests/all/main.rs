//! openlora's end-to-end tests, one binary.

mod adapters;
mod architecture;
mod attribution;
mod default_model;
mod engine;
mod evidence;
mod fuzz;
mod int8_numerics;
mod lora_reference;
mod malformed;
mod pager;
mod plugin_failures;
mod plugins;
mod reference_logits;
mod structured;
mod trust;
