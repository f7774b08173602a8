//! Names -> generations. A name is an alias; loading a name again with new content creates a
//! new generation and repoints the name, while requests already holding the old generation keep
//! it (they hold an `Arc`). Identical content loaded under two names is prepared once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use openlora_kernels::Backend;

use super::peft::{AdapterError, LoraHost};
use super::{Generation, LoraAdapter};
use crate::model::config::LlamaConfig;

/// Adapters known to one base model.
pub struct AdapterRegistry<B: Backend> {
    base: LlamaConfig,
    backend: B,
    inner: Mutex<Inner<B>>,
}

struct Inner<B: Backend> {
    names: HashMap<String, Arc<LoraAdapter<B>>>,
    /// Every prepared generation still alive somewhere, for de-duplication.
    generations: HashMap<Generation, Weak<LoraAdapter<B>>>,
}

impl<B: Backend + Clone> AdapterRegistry<B> {
    /// An empty registry for adapters of `base` on `backend`.
    pub fn new(base: LlamaConfig, backend: B) -> Self {
        Self { base, backend, inner: Mutex::new(Inner { names: HashMap::new(), generations: HashMap::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<B>> {
        // A panic while holding the lock cannot leave the maps inconsistent (each update is a
        // single insert/remove), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the PEFT adapter in `dir` under `name` (replacing what the name pointed at) and
    /// returns it. On error nothing changes.
    pub fn load_dir(&self, name: &str, dir: &Path) -> Result<Arc<LoraAdapter<B>>, AdapterError> {
        let host = LoraHost::load(name, dir, &self.base)?;
        self.insert(name, &host)
    }

    /// Registers host weights under `name` (used for loaded and merged adapters alike).
    pub fn insert(&self, name: &str, host: &LoraHost) -> Result<Arc<LoraAdapter<B>>, AdapterError> {
        {
            let mut inner = self.lock();
            if let Some(existing) = inner.generations.get(&host.generation).and_then(Weak::upgrade) {
                inner.names.insert(name.to_owned(), existing.clone());
                return Ok(existing);
            }
        }
        let prepared = Arc::new(LoraAdapter::prepare(host, &self.backend)?);
        let mut inner = self.lock();
        inner.generations.retain(|_, w| w.strong_count() > 0);
        inner.generations.insert(host.generation, Arc::downgrade(&prepared));
        inner.names.insert(name.to_owned(), prepared.clone());
        Ok(prepared)
    }

    /// The adapter a name points at now.
    pub fn get(&self, name: &str) -> Result<Arc<LoraAdapter<B>>, AdapterError> {
        self.lock().names.get(name).cloned().ok_or_else(|| AdapterError::NotFound(name.to_owned()))
    }

    /// A generation, if it is still alive (held by a name or a running request).
    pub fn by_generation(&self, g: &Generation) -> Option<Arc<LoraAdapter<B>>> {
        self.lock().generations.get(g).and_then(Weak::upgrade)
    }

    /// Removes a name. Requests holding its generation keep it until they finish.
    pub fn unload(&self, name: &str) -> Result<(), AdapterError> {
        self.lock().names.remove(name).map(|_| ()).ok_or_else(|| AdapterError::NotFound(name.to_owned()))
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().names.keys().cloned().collect();
        v.sort();
        v
    }
}
