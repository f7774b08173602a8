//! Text ⇄ token ids: building the tokenizer a model was trained with, and streaming detokenization.
//!
//! A model is useless with the wrong tokenizer: one different split of a digit or a space and the
//! prompt the model sees is not the prompt the user wrote. The two places a tokenizer comes from
//! are an HF `tokenizer.json` (loaded as is by the `tokenizers` crate) and the metadata of a GGUF
//! file, which stores only the raw ingredients (vocabulary, merges, token types, a pre-tokenizer
//! *name*). [`tokenizer_from_gguf`] rebuilds from those ingredients the same tokenizer that
//! llama.cpp runs and that HF transformers' GGUF converter builds, so that ids match both.
//!
//! Generation produces one id at a time, and one character can span several byte-level tokens
//! (an emoji is often four). [`IncrementalDecoder`] turns the id stream into text pieces that
//! never split a UTF-8 character, decoding only a small window per token.

use std::borrow::Borrow;
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::error::{ModelError, Result};

/// GGUF `tokenizer.ggml.token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token (an added token that is not special).
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer ingredients stored in a GGUF file's metadata (`tokenizer.ggml.*` keys).
///
/// Borrowed, so that the caller can hand over the arrays it read from the file without copying.
#[derive(Clone, Copy, Debug)]
pub struct GgufVocab<'a> {
    /// `tokenizer.ggml.model`: `"gpt2"` for byte-level BPE, `"llama"` for SentencePiece.
    pub model: &'a str,
    /// `tokenizer.ggml.pre`: the name of the pre-tokenizer (`"smollm"`, `"llama-bpe"`, ...).
    pub pre: Option<&'a str>,
    /// `tokenizer.ggml.tokens`: every token's text; the index is the id.
    pub tokens: &'a [String],
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub token_types: Option<&'a [i32]>,
    /// `tokenizer.ggml.merges`: BPE merges as `"left right"`, best first.
    pub merges: &'a [String],
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`: whether encoding with special tokens prepends the BOS.
    pub add_bos: bool,
}

/// A tokenizer with the model's special ids: BOS, and the ids that end a generation.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos_id: Option<u32>,
    eos_ids: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    /// A summary: the full vocabulary would be tens of thousands of lines.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Wraps an already-built `tokenizers` tokenizer.
    ///
    /// `bos_id` is informational (the tokenizer's post-processor decides whether it is added);
    /// `eos_ids` are the ids that end a generation.
    pub fn new(inner: Tokenizer, bos_id: Option<u32>, eos_ids: Vec<u32>) -> Self {
        let mut t = Self { inner, bos_id, eos_ids: Vec::new() };
        for id in eos_ids {
            t.add_eos_id(id);
        }
        t
    }

    /// Turns text into ids. With `add_special_tokens`, the tokenizer's post-processor adds what
    /// the model expects around a sequence (a BOS for most SentencePiece models; nothing for
    /// SmolLM2). Special tokens written in the text (`<|im_start|>`) always map to their single id.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("cannot encode text: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Turns ids back into text. Ids outside the vocabulary are skipped (as HF does); with
    /// `skip_special_tokens`, so are special tokens such as `<|im_end|>`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| ModelError::Tokenizer(format!("cannot decode ids: {e}")))
    }

    /// The number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given in the vocabulary's spelling (`"Ġworld"`, `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary's spelling of an id (`"Ġworld"` for byte-level BPE), or `None` if out of range.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence id, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The ids that end a generation (the model's EOS, plus any added with [`Self::add_eos_id`]).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends a generation.
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Adds an id that ends a generation (such as `<|im_end|>` for a ChatML chat); no-op if present.
    pub fn add_eos_id(&mut self, id: u32) {
        if !self.eos_ids.contains(&id) {
            self.eos_ids.push(id);
        }
    }

    /// Replaces the ids that end a generation (for example with `generation_config.json`'s list).
    pub fn set_eos_ids(&mut self, ids: Vec<u32>) {
        self.eos_ids.clear();
        for id in ids {
            self.add_eos_id(id);
        }
    }

    /// The underlying `tokenizers` tokenizer, for anything not wrapped here.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// A streaming decoder borrowing this tokenizer; see [`IncrementalDecoder`].
    pub fn incremental_decoder(&self, skip_special_tokens: bool) -> IncrementalDecoder<&Self> {
        IncrementalDecoder::new(self).skip_special_tokens(skip_special_tokens)
    }
}

/// Loads an HF `tokenizer.json`.
///
/// The BOS id is the special token the file's post-processor puts first (none for byte-level
/// models that add nothing). EOS ids are not part of `tokenizer.json`: the caller sets them from
/// `generation_config.json` / `tokenizer_config.json` with [`TextTokenizer::set_eos_ids`].
pub fn tokenizer_from_file(path: &Path) -> Result<TextTokenizer> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
    let inner: Tokenizer =
        text.parse().map_err(|e| ModelError::Tokenizer(format!("{}: cannot load tokenizer: {e}", path.display())))?;
    // Whatever the post-processor adds before an empty text is the BOS (Llama's `<s>`).
    let bos_id = inner.encode_fast("", true).ok().and_then(|enc| {
        match (enc.get_ids().first(), enc.get_special_tokens_mask().first()) {
            (Some(&id), Some(1)) => Some(id),
            _ => None,
        }
    });
    Ok(TextTokenizer::new(inner, bos_id, Vec::new()))
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
///
/// Supported: model `"gpt2"` (byte-level BPE) with the pre-tokenizers llama.cpp names
/// `default`/`gpt2`, `smollm` (and the other "digits one by one, then the GPT-2 regex" names:
/// `starcoder`, `refact`, `command-r`, `codeshell`, `exaone`, `minerva-7b`), the Llama 3 family
/// (`llama-bpe`, `llama3`, `llama-v3`, `falcon3`, `dbrx`, `smaug-bpe`, ...), the Qwen 2 family
/// (`qwen2`, `deepseek-r1-qwen`, ...), `qwen35`, `tekken`, and the GPT-4o family (`gpt-4o`,
/// `llama4`, ...). Control tokens (type 3) become special added tokens and user-defined tokens
/// (type 4) plain added tokens, so both map to their single id when written in text, as in
/// llama.cpp and HF.
pub fn tokenizer_from_gguf(v: &GgufVocab<'_>) -> Result<TextTokenizer> {
    match v.model {
        "gpt2" => byte_level_bpe(v),
        "llama" => Err(ModelError::Tokenizer("tokenizer model `llama` not supported yet".into())),
        other => Err(ModelError::Tokenizer(format!(
            "tokenizer model `{other}` (tokenizer.ggml.model) not supported; supported: `gpt2`"
        ))),
    }
}

/// Byte-level BPE (GPT-2 style) from GGUF metadata.
fn byte_level_bpe(v: &GgufVocab<'_>) -> Result<TextTokenizer> {
    let n_tokens = u32::try_from(v.tokens.len())
        .map_err(|_| ModelError::Tokenizer(format!("vocabulary too large: {} tokens", v.tokens.len())))?;
    if n_tokens == 0 {
        return Err(ModelError::Tokenizer("tokenizer.ggml.tokens is empty".into()));
    }
    if let Some(types) = v.token_types
        && types.len() != v.tokens.len()
    {
        return Err(ModelError::Tokenizer(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            v.tokens.len()
        )));
    }
    for (what, id) in [("bos", v.bos_id), ("eos", v.eos_id)] {
        if let Some(id) = id
            && id >= n_tokens
        {
            return Err(ModelError::Tokenizer(format!("{what} id {id} is outside the {n_tokens}-token vocabulary")));
        }
    }
    let token_type = |i: usize| v.token_types.and_then(|t| t.get(i).copied()).unwrap_or(1);
    let byte_chars = bytes_to_unicode();
    // The alphabet: printable Latin-1 as itself, the other 68 bytes as U+0100..=U+0143.
    let in_alphabet = |s: &str| s.chars().all(|c| matches!(u32::from(c), 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0x143));

    // Byte-level vocabularies spell every token in GPT-2's byte-to-unicode alphabet. A normal token
    // that uses another character is respelled from its UTF-8 bytes (as HF's converter does);
    // control and user-defined tokens keep their text, because they are matched in raw text.
    let mut vocab = Vocab::default();
    let mut special = Vec::new();
    let mut user_defined = Vec::new();
    for (i, token) in v.tokens.iter().enumerate() {
        let id = i as u32; // i < n_tokens, which fits in u32
        let kind = token_type(i);
        let spelled = if kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED || in_alphabet(token) {
            token.clone()
        } else {
            token.bytes().map(|b| byte_chars[usize::from(b)]).collect()
        };
        if !token.is_empty() {
            match kind {
                TOKEN_TYPE_CONTROL => special.push(AddedToken::from(spelled.clone(), true).normalized(false)),
                TOKEN_TYPE_USER_DEFINED => {
                    user_defined.push(AddedToken::from(spelled.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        // On duplicate spellings the last id wins, as in llama.cpp's and HF's token-to-id maps.
        vocab.insert(spelled, id);
    }

    let merges = v
        .merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| ModelError::Tokenizer(format!("tokenizer.ggml.merges[{i}] = {m:?} is not `left right`")))
        })
        .collect::<Result<Vec<_>>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(format!("cannot build BPE from the GGUF vocabulary: {e}")))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(v.pre)?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    if v.add_bos
        && let Some(bos) = v.bos_id
    {
        let bos_text = v.tokens.get(bos as usize).map_or("", String::as_str); // checked above: in range
        inner.with_post_processor(Some(bos_post_processor(bos, bos_text)?));
    }
    inner.add_special_tokens(&special);
    inner.add_tokens(&user_defined);
    Ok(TextTokenizer::new(inner, v.bos_id, v.eos_id.into_iter().collect()))
}

/// A post-processor that puts the BOS before every sequence (when adding special tokens).
fn bos_post_processor(bos_id: u32, bos_text: &str) -> Result<TemplateProcessing> {
    let err = |e: String| ModelError::Tokenizer(format!("cannot build the BOS post-processor: {e}"));
    // Template pieces name the special token by a key; the key is not its text (which could hold spaces).
    TemplateProcessing::builder()
        .try_single("bos $A:0")
        .map_err(err)?
        .try_pair("bos $A:0 bos $B:1")
        .map_err(err)?
        .special_tokens(vec![
            SpecialToken::new("bos".into(), vec![bos_id], vec![bos_text.to_owned()]).map_err(|e| err(e.to_string()))?,
        ])
        .build()
        .map_err(|e| err(e.to_string()))
}

/// The Llama 3 split (llama.cpp `LLAMA_VOCAB_PRE_TYPE_LLAMA3`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen 2 split: like Llama 3, but digits one by one.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The Qwen 3.5 split: Qwen 2's with combining marks kept in words.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split.
const TEKKEN_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*",
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
/// The GPT-4o (o200k) split.
const GPT4O_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// Pre-tokenizer names that llama.cpp maps to "each digit alone, then the GPT-2 regex".
const DIGITS_THEN_GPT2: &[&str] = &["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"];

/// The split regex for a pre-tokenizer name, for the names that are "one regex, then bytes".
fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2"
        | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The pre-tokenizer for a GGUF `tokenizer.ggml.pre` name.
fn pre_tokenizer(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    // ByteLevel(add_prefix_space = false, trim_offsets = true, use_regex): the GPT-2 regex, then bytes.
    let gpt2 = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let pre = match pre {
        None | Some("default" | "gpt2" | "gpt-2") => return Ok(gpt2()),
        Some(p) => p,
    };
    if DIGITS_THEN_GPT2.contains(&pre) {
        return Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            gpt2(),
        ])));
    }
    let Some(regex) = split_regex(pre) else {
        return Err(ModelError::Tokenizer(format!(
            "pre-tokenizer `{pre}` (tokenizer.ggml.pre) not supported; supported: default, gpt2, {}, llama-bpe, \
             llama3, qwen2, qwen35, tekken, gpt-4o and their aliases",
            DIGITS_THEN_GPT2.join(", ")
        )));
    };
    let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
        .map_err(|e| ModelError::Tokenizer(format!("pre-tokenizer `{pre}`: bad split regex: {e}")))?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])))
}

/// GPT-2's byte-to-unicode table: byte `b` is spelled `table[b]` in byte-level vocabularies.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0'); // 256..=323, always valid scalar values
            next += 1;
            c
        };
    }
    table
}

/// At most this many ids wait for a character to complete before their text is emitted anyway
/// (with U+FFFD for the broken bytes). A UTF-8 character has at most 4 bytes, and every byte-level
/// token at least one, so only a model emitting invalid UTF-8 reaches this.
const MAX_PENDING: usize = 8;

/// How many ids before the generation [`IncrementalDecoder::with_context`] decodes as context.
const CONTEXT_IDS: usize = 4;

/// Streaming detokenizer: push generated ids one at a time, get back the text they complete.
///
/// Never emits half a UTF-8 character: while the decoded window ends in U+FFFD (an incomplete
/// byte sequence), the text is held back until the next ids complete it. The concatenation of
/// everything returned by [`push`](Self::push) and [`finish`](Self::finish) equals the decode of
/// all pushed ids (for tokenizers whose decode is prefix-stable, which byte-level BPE is).
///
/// Each push decodes a window of a few ids (the ids of the last emitted piece as context, plus
/// the ids not yet emitted), so the cost per id does not grow with the length of the generation.
///
/// `T` is how the decoder holds the tokenizer: `&TextTokenizer` for a decoder that lives inside
/// one function, `Arc<TextTokenizer>` for one stored with a request.
#[derive(Clone, Debug)]
pub struct IncrementalDecoder<T: Borrow<TextTokenizer>> {
    tokenizer: T,
    skip_special_tokens: bool,
    /// The window: `ids[..context_len]` were already emitted and give context; the rest are pending.
    ids: Vec<u32>,
    context_len: usize,
    /// `decode(ids[..context_len])`.
    context_text: String,
}

impl<T: Borrow<TextTokenizer>> IncrementalDecoder<T> {
    /// A decoder with no context that keeps special tokens in the text (`<|im_end|>`), as
    /// `decode(ids, false)` does; see [`Self::skip_special_tokens`].
    pub fn new(tokenizer: T) -> Self {
        Self { tokenizer, skip_special_tokens: false, ids: Vec::new(), context_len: 0, context_text: String::new() }
    }

    /// Whether special tokens produce no text (like `decode(ids, true)`).
    #[must_use]
    pub fn skip_special_tokens(mut self, skip: bool) -> Self {
        self.skip_special_tokens = skip;
        self
    }

    /// Continues after `context` (typically the prompt): its last few ids are decoded with the
    /// first generated ones, so a decoder that depends on the previous token (SentencePiece's
    /// leading space) or a character split between prompt and generation come out right.
    /// Nothing of the context itself is emitted. Replaces any state the decoder had.
    pub fn with_context(mut self, context: &[u32]) -> Result<Self> {
        let start = context.len().saturating_sub(CONTEXT_IDS);
        self.ids = context[start..].to_vec();
        // Ids that end in the middle of a character stay pending, so that the generated ids that
        // complete it emit the whole character.
        let mut len = self.ids.len();
        loop {
            let text = self.decode(&self.ids[..len])?;
            if len == 0 || !text.ends_with(char::REPLACEMENT_CHARACTER) {
                self.context_len = len;
                self.context_text = text;
                return Ok(self);
            }
            len -= 1;
        }
    }

    /// Adds one generated id; returns the text it completes (empty while a character is incomplete,
    /// or for a skipped special token).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.decode(&self.ids)?;
        let complete = !text.ends_with(char::REPLACEMENT_CHARACTER);
        match text.strip_prefix(self.context_text.as_str()) {
            Some(new) if complete && !new.is_empty() => {
                let new = new.to_owned();
                self.advance()?;
                Ok(new)
            }
            _ if self.pending() > MAX_PENDING => {
                // Invalid UTF-8 that no further id will fix: hand it out as it decodes.
                let out = new_suffix(&self.context_text, &text).to_owned();
                self.advance()?;
                Ok(out)
            }
            _ => Ok(String::new()),
        }
    }

    /// Ends the stream: returns any text still held back (with U+FFFD for incomplete bytes) and
    /// resets the decoder (no context) for reuse.
    pub fn finish(&mut self) -> Result<String> {
        let out = if self.pending() == 0 {
            String::new()
        } else {
            let text = self.decode(&self.ids)?;
            new_suffix(&self.context_text, &text).to_owned()
        };
        self.ids.clear();
        self.context_len = 0;
        self.context_text.clear();
        Ok(out)
    }

    /// How many pushed ids have not produced text yet.
    pub fn pending(&self) -> usize {
        self.ids.len() - self.context_len
    }

    /// The tokenizer this decoder decodes with.
    pub fn tokenizer(&self) -> &TextTokenizer {
        self.tokenizer.borrow()
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.borrow().decode(ids, self.skip_special_tokens)
    }

    /// Makes the pending ids the new context, dropping the old context.
    fn advance(&mut self) -> Result<()> {
        self.ids.drain(..self.context_len);
        self.context_len = self.ids.len();
        self.context_text = self.decode(&self.ids)?;
        Ok(())
    }
}

/// The part of `text` after its longest common prefix with `context` (at a character boundary).
fn new_suffix<'t>(context: &str, text: &'t str) -> &'t str {
    let common = context
        .char_indices()
        .zip(text.chars())
        .find(|((_, a), b)| a != b)
        .map_or(context.len().min(text.len()), |((i, _), _)| i);
    // `common` is a char boundary of both strings: the characters before it are identical.
    text.get(common..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-level spelling of a string.
    fn spell(s: &str) -> String {
        let t = bytes_to_unicode();
        s.bytes().map(|b| t[usize::from(b)]).collect()
    }

    /// A tiny byte-level vocabulary: ids 0..=1 control tokens, then all 256 bytes (id = 2 + byte),
    /// then the merged tokens, in merge order.
    fn tiny_vocab() -> (Vec<String>, Vec<i32>, Vec<String>) {
        let mut tokens = vec!["<|endoftext|>".to_owned(), "<|im_end|>".to_owned()];
        let mut types = vec![3, 3];
        let t = bytes_to_unicode();
        for c in t {
            tokens.push(c.to_string());
            types.push(1);
        }
        let merges: Vec<(String, String)> =
            [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), (" ", "w"), (" w", "o")]
                .iter()
                .map(|(a, b)| (spell(a), spell(b)))
                .chain([(spell("é").chars().take(1).collect(), spell("é").chars().skip(1).collect())])
                .collect();
        for (a, b) in &merges {
            tokens.push(format!("{a}{b}"));
            types.push(1);
        }
        let merges = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        (tokens, types, merges)
    }

    fn tiny_tokenizer(add_bos: bool, pre: Option<&str>) -> TextTokenizer {
        let (tokens, types, merges) = tiny_vocab();
        let v = GgufVocab {
            model: "gpt2",
            pre,
            tokens: &tokens,
            token_types: Some(&types),
            merges: &merges,
            bos_id: Some(0),
            eos_id: Some(1),
            add_bos,
        };
        match tokenizer_from_gguf(&v) {
            Ok(t) => t,
            Err(e) => panic!("tiny tokenizer: {e}"),
        }
    }

    /// Id of a single byte in the tiny vocabulary.
    fn byte_id(b: u8) -> u32 {
        2 + u32::from(b)
    }

    #[test]
    fn gguf_vocab_encodes_and_decodes() -> Result<()> {
        let tok = tiny_tokenizer(false, Some("smollm"));
        let he = tok.token_to_id(&spell("he")).expect("he");
        let hello = tok.token_to_id(&spell("hello")).expect("hello");
        let wo = tok.token_to_id(&spell(" wo")).expect(" wo");
        let ids = tok.encode("hello world", false)?;
        assert_eq!(ids, vec![hello, wo, byte_id(b'r'), byte_id(b'l'), byte_id(b'd')]);
        assert_eq!(tok.decode(&ids, false)?, "hello world");
        assert_eq!(tok.encode("he", true)?, vec![he], "add_bos is false: nothing added");
        assert_eq!(tok.id_to_token(wo).as_deref(), Some("Ġwo"));
        assert_eq!(tok.vocab_size(), 2 + 256 + 7);
        assert_eq!(tok.bos_id(), Some(0));
        assert_eq!(tok.eos_ids(), &[1]);
        assert_eq!(format!("{tok:?}"), "TextTokenizer { vocab_size: 265, bos_id: Some(0), eos_ids: [1], .. }");

        // Digits split one by one (smollm), and "é" is one merged token.
        let ids = tok.encode("42é", false)?;
        let e_acute = tok.token_to_id(&spell("é")).expect("é");
        assert_eq!(ids, vec![byte_id(b'4'), byte_id(b'2'), e_acute]);
        assert_eq!(tok.decode(&ids, false)?, "42é");
        Ok(())
    }

    #[test]
    fn control_tokens_are_special() -> Result<()> {
        let tok = tiny_tokenizer(false, None);
        let ids = tok.encode("he<|im_end|>he", false)?;
        let he = tok.token_to_id(&spell("he")).expect("he");
        assert_eq!(ids, vec![he, 1, he]);
        assert_eq!(tok.decode(&ids, false)?, "he<|im_end|>he");
        assert_eq!(tok.decode(&ids, true)?, "hehe");
        Ok(())
    }

    #[test]
    fn bos_is_added_when_the_model_wants_it() -> Result<()> {
        let tok = tiny_tokenizer(true, Some("gpt2"));
        let he = tok.token_to_id(&spell("he")).expect("he");
        assert_eq!(tok.encode("he", true)?, vec![0, he]);
        assert_eq!(tok.encode("he", false)?, vec![he]);
        Ok(())
    }

    #[test]
    fn eos_ids_can_be_extended() {
        let mut tok = tiny_tokenizer(false, None);
        tok.add_eos_id(7);
        tok.add_eos_id(7);
        assert_eq!(tok.eos_ids(), &[1, 7]);
        assert!(tok.is_eos(7));
        tok.set_eos_ids(vec![3, 3, 4]);
        assert_eq!(tok.eos_ids(), &[3, 4]);
    }

    #[test]
    fn all_supported_pre_tokenizers_build() -> Result<()> {
        for pre in
            ["default", "gpt2", "smollm", "starcoder", "llama-bpe", "llama3", "qwen2", "qwen35", "tekken", "gpt-4o"]
        {
            let tok = tiny_tokenizer(false, Some(pre));
            assert_eq!(tok.decode(&tok.encode("hello world 123", false)?, false)?, "hello world 123", "{pre}");
        }
        Ok(())
    }

    #[test]
    fn unknown_pre_tokenizer_and_model_are_named() {
        let (tokens, types, merges) = tiny_vocab();
        let mut v = GgufVocab {
            model: "gpt2",
            pre: Some("mystery-pre"),
            tokens: &tokens,
            token_types: Some(&types),
            merges: &merges,
            bos_id: None,
            eos_id: None,
            add_bos: false,
        };
        let err = tokenizer_from_gguf(&v).map(|_| ()).expect_err("unknown pre");
        assert!(err.to_string().contains("`mystery-pre`"), "{err}");
        v.pre = None;
        v.model = "llama";
        let err = tokenizer_from_gguf(&v).map(|_| ()).expect_err("llama");
        assert!(err.to_string().contains("tokenizer model `llama` not supported yet"), "{err}");
        v.model = "t5";
        let err = tokenizer_from_gguf(&v).map(|_| ()).expect_err("t5");
        assert!(err.to_string().contains("`t5`"), "{err}");
    }

    #[test]
    fn malformed_gguf_vocab_is_an_error() {
        let (tokens, types, _) = tiny_vocab();
        let bad_merges = vec!["nospace".to_owned()];
        let v = GgufVocab {
            model: "gpt2",
            pre: None,
            tokens: &tokens,
            token_types: Some(&types),
            merges: &bad_merges,
            bos_id: Some(100_000),
            eos_id: None,
            add_bos: true,
        };
        assert!(tokenizer_from_gguf(&v).is_err());
        let v = GgufVocab { bos_id: None, ..v };
        let err = tokenizer_from_gguf(&v).map(|_| ()).expect_err("bad merge");
        assert!(err.to_string().contains("merges[0]"), "{err}");
        let v = GgufVocab { merges: &[], token_types: Some(&types[..3]), ..v };
        assert!(tokenizer_from_gguf(&v).is_err());
    }

    #[test]
    fn incremental_decoding_holds_back_split_characters() -> Result<()> {
        let tok = tiny_tokenizer(false, None);
        // "a😀é!" as single bytes: the emoji is 4 byte tokens, "é" 2.
        let text = "a😀é!";
        let ids: Vec<u32> = text.bytes().map(byte_id).collect();
        let mut d = tok.incremental_decoder(false);
        let pieces = ids.iter().map(|&id| d.push(id)).collect::<Result<Vec<_>>>()?;
        assert_eq!(pieces, vec!["a", "", "", "", "😀", "", "é", "!"]);
        assert_eq!(d.finish()?, "");
        assert!(pieces.iter().all(|p| !p.contains(char::REPLACEMENT_CHARACTER)));

        // The window stays small however long the stream is; an Arc-held tokenizer works too.
        let mut d = IncrementalDecoder::new(std::sync::Arc::new(tok));
        let mut out = String::new();
        for _ in 0..200 {
            for &id in &ids {
                out.push_str(&d.push(id)?);
                assert!(d.ids.len() <= 2 * 4 + 1, "window grew to {}", d.ids.len());
            }
        }
        assert_eq!(out, text.repeat(200));
        Ok(())
    }

    #[test]
    fn incremental_decoding_flushes_and_skips_specials() -> Result<()> {
        let tok = tiny_tokenizer(false, None);
        // A lone lead byte, then the stream ends: finish() hands it out as U+FFFD.
        let mut d = IncrementalDecoder::new(&tok);
        assert_eq!(d.push(byte_id(0xF0))?, "");
        assert_eq!(d.pending(), 1);
        assert_eq!(d.finish()?, "\u{FFFD}");
        assert_eq!(d.pending(), 0);
        // Special tokens: skipped or kept.
        let mut d = IncrementalDecoder::new(&tok).skip_special_tokens(true);
        assert_eq!(d.push(byte_id(b'x'))?, "x");
        assert_eq!(d.push(1)?, "");
        assert_eq!(d.push(byte_id(b'y'))?, "y");
        let mut d = IncrementalDecoder::new(&tok);
        assert_eq!(d.push(1)?, "<|im_end|>");
        // Invalid UTF-8 forever: emitted after MAX_PENDING ids rather than held back forever.
        let mut d = IncrementalDecoder::new(&tok);
        let mut out = String::new();
        for _ in 0..=MAX_PENDING {
            out.push_str(&d.push(byte_id(0x80))?);
        }
        assert_eq!(out, "\u{FFFD}".repeat(MAX_PENDING + 1));
        Ok(())
    }

    #[test]
    fn incremental_decoding_continues_a_character_from_the_context() -> Result<()> {
        let tok = tiny_tokenizer(false, None);
        let bytes = "hi é".as_bytes();
        let (prompt, generated) = bytes.split_at(bytes.len() - 1); // "é" split between prompt and output
        let prompt: Vec<u32> = prompt.iter().copied().map(byte_id).collect();
        let mut d = IncrementalDecoder::new(&tok).with_context(&prompt)?;
        assert_eq!(d.pending(), 1);
        assert_eq!(d.push(byte_id(generated[0]))?, "é");
        let mut d = IncrementalDecoder::new(&tok).with_context(&prompt[..2])?;
        assert_eq!(d.push(byte_id(b'!'))?, "!");
        Ok(())
    }

    #[test]
    fn tokenizer_json_round_trip() -> Result<()> {
        let tok = tiny_tokenizer(true, Some("smollm"));
        let dir = tempfile::tempdir().map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let path = dir.path().join("tokenizer.json");
        tok.inner().save(&path, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let loaded = tokenizer_from_file(&path)?;
        assert_eq!(loaded.encode("hello 42<|im_end|>", true)?, tok.encode("hello 42<|im_end|>", true)?);
        assert_eq!(loaded.bos_id(), Some(0));
        assert!(loaded.eos_ids().is_empty());
        let missing = tokenizer_from_file(&dir.path().join("nope.json")).map(|_| ()).expect_err("missing");
        assert!(matches!(missing, ModelError::Io { .. }));
        Ok(())
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[usize::from(b' ')], 'Ġ');
        assert_eq!(t[usize::from(b'\n')], 'Ċ');
        assert_eq!(t[usize::from(b'A')], 'A');
        assert_eq!(t[0xAD], 'Ń');
        let mut sorted = t.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
        // The alphabet test in byte_level_bpe relies on these ranges.
        assert!(t.iter().all(|&c| matches!(u32::from(c), 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0x143)));
    }
}
