//! Errors from loading and running models.
//!
//! Every variant that comes from a file names the file (and the tensor or key where there is
//! one), so a user with a broken download knows what to replace.

use std::path::PathBuf;

/// An error while reading weights, configs, tokenizers or templates, or running the forward pass.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's structure is invalid (bad magic, truncated header, bad offsets).
    #[error("{path}: malformed file: {reason}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor is missing, has the wrong shape, or has an unsupported dtype.
    #[error("{path}: tensor `{tensor}`: {reason}")]
    Tensor {
        /// The file (or folder) holding the weights.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// What is wrong.
        reason: String,
    },
    /// A configuration key is missing or has an unsupported value.
    #[error("{path}: config key `{key}`: {reason}")]
    Config {
        /// The file holding the configuration (config.json or the GGUF).
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer could not be built or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The request cannot be run as given (empty prompt, longer than the context, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A compute kernel rejected its inputs.
    #[error(transparent)]
    Kernel(#[from] openlora_kernels::KernelError),
}

/// Shorthand for results in the model module.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
