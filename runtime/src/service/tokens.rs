//! Tokens without generation: vLLM's `POST /tokenize` and `POST /detokenize`, which routers
//! and benchmark tools call to count a prompt the way the server will, and the text of a
//! prompt sent as token ids (a completions request's `echo`).
//!
//! Adapters never change the tokenizer, so a request naming one only checks that the caller
//! may see it (an invisible adapter answers as an absent one, as everywhere else).

use openlora_kernels::Backend;

use super::Service;
use super::api::{ErrorKind, PromptInput, ServiceError};
use super::tenancy::Tenant;

/// Most token ids one `/detokenize` request may send.
pub const MAX_DETOKENIZE_IDS: usize = 1 << 16;

impl<B: Backend + Clone + 'static> Service<B> {
    /// Checks that `model` (when named) is the base model or an adapter `tenant` may see.
    fn check_model_visible(&self, tenant: &Tenant, model: Option<&str>) -> Result<(), ServiceError> {
        let Some(m) = model else { return Ok(()) };
        if m == self.model_id() || self.pager().catalog().get(m).is_some_and(|e| tenant.may_use(&e)) {
            return Ok(());
        }
        Err(ServiceError {
            kind: ErrorKind::NotFound,
            message: format!("the model `{m}` does not exist"),
            param: Some("model".into()),
        })
    }

    /// The token ids of `prompt` as a generation would see them. Text is tokenized with the
    /// tokenizer's special tokens (BOS) when `add_special_tokens`; a conversation is rendered
    /// with the chat template (which writes its own special tokens, so `add_special_tokens`
    /// adds none there unless asked), ending with the assistant's turn when
    /// `add_generation_prompt`.
    pub fn tokenize_for(
        &self,
        tenant: &Tenant,
        model: Option<&str>,
        prompt: &PromptInput,
        tools: Option<&serde_json::Value>,
        add_special_tokens: bool,
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>, ServiceError> {
        self.check_model_visible(tenant, model)?;
        let tok = &self.model().tokenizer;
        let ids = match prompt {
            PromptInput::Text(t) => {
                tok.encode(t, add_special_tokens).map_err(|e| ServiceError::bad("prompt", e.to_string()))?
            }
            PromptInput::Tokens(ids) => ids.clone(),
            PromptInput::Chat(messages) => {
                if messages.is_empty() {
                    return Err(ServiceError::bad("messages", "`messages` must not be empty"));
                }
                let text = self
                    .model()
                    .chat_template
                    .render_with_tools(messages, tools, add_generation_prompt)
                    .map_err(|e| ServiceError::bad("messages", e.to_string()))?;
                tok.encode(&text, add_special_tokens).map_err(|e| ServiceError::bad("messages", e.to_string()))?
            }
        };
        if ids.len() > self.limits().max_prompt_tokens.max(self.context_limit()) {
            return Err(ServiceError::bad(
                "prompt",
                format!("the prompt has {} tokens; the limit is {}", ids.len(), self.limits().max_prompt_tokens),
            ));
        }
        Ok(ids)
    }

    /// The text of `ids` (special tokens included, as vLLM's `/detokenize` writes them).
    pub fn detokenize_for(&self, tenant: &Tenant, model: Option<&str>, ids: &[u32]) -> Result<String, ServiceError> {
        self.check_model_visible(tenant, model)?;
        if ids.len() > MAX_DETOKENIZE_IDS {
            return Err(ServiceError::bad(
                "tokens",
                format!("`tokens` has {} ids; the limit is {MAX_DETOKENIZE_IDS}", ids.len()),
            ));
        }
        let vocab = self.model().model.config.vocab_size;
        if let Some(t) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ServiceError::bad(
                "tokens",
                format!("`tokens`: token id {t} is outside the vocabulary (size {vocab})"),
            ));
        }
        self.model().tokenizer.decode(ids, false).map_err(|e| ServiceError::bad("tokens", e.to_string()))
    }

    /// Each token's string in the vocabulary (`Ġthe`, `<|im_start|>`), as vLLM's
    /// `return_token_strs` gives them.
    pub fn token_strs(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&t| self.model().tokenizer.id_to_token(t).unwrap_or_default()).collect()
    }

    /// The text of a prompt as a completions `echo` returns it: text as sent, token ids
    /// decoded.
    pub fn prompt_text(&self, prompt: &PromptInput) -> String {
        match prompt {
            PromptInput::Text(t) => t.clone(),
            PromptInput::Tokens(ids) => self.model().tokenizer.decode(ids, false).unwrap_or_default(),
            PromptInput::Chat(_) => String::new(),
        }
    }

    /// A stable id of what produces this server's outputs (OpenAI's `system_fingerprint`): the
    /// version, the base model's content hash and the backend's kind. The same seed and
    /// request give the same output while it is unchanged.
    pub fn system_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(env!("CARGO_PKG_VERSION"));
        h.update(b"\0");
        h.update(self.base_use.sha256.as_bytes());
        h.update(b"\0");
        h.update(self.backend_name().split_whitespace().next().unwrap_or_default());
        format!("fp_{}", &hex::encode(h.finalize())[..12])
    }
}
