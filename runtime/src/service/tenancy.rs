//! Who is asking and what they may do: API keys, roles, per-tenant concurrency, which adapters
//! a tenant may see, and the admin operations on adapters (load, unload, rescan; plugins have
//! theirs in `plugin_admin`).
//!
//! Visibility is not held here: it is a property of each [catalog entry](crate::adapters::catalog::CatalogEntry),
//! set from the deployment's `[adapters.visibility]` whenever the entry is registered. So every
//! path that registers an adapter (start, rescan, `load_lora_adapter`) gets the same rule, and
//! a reloaded private adapter stays private.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use openlora_kernels::Backend;
use sha2::{Digest, Sha256};

use super::Service;
use super::api::{AdapterStatus, ErrorKind, ModelCard, ServiceError};
use crate::adapters::catalog::{CatalogEntry, ScanReport};
use crate::config::Role;

/// An API key's holder.
#[derive(Debug)]
pub struct Tenant {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
    pub(super) digest: [u8; 32],
    pub(super) max_concurrent: usize,
    pub(super) active: AtomicUsize,
}

impl Tenant {
    /// An admin identity that sees everything, with no concurrency limit: internal listings,
    /// and the CLI acting on a deployment as its operator.
    pub fn local_admin(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            role: Role::Admin,
            digest: [0; 32],
            max_concurrent: usize::MAX,
            active: AtomicUsize::new(0),
        }
    }

    /// The caller of an open deployment (no `[[tenants]]`): a user with no concurrency limit.
    pub fn anonymous() -> Self {
        Self { role: Role::User, ..Self::local_admin("anonymous") }
    }

    /// Whether it may use admin endpoints.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether it may see and use the adapter `entry`.
    pub fn may_use(&self, entry: &CatalogEntry) -> bool {
        self.is_admin() || entry.visible_to(&self.name)
    }
}

/// Holds one of a tenant's concurrent-request permits until dropped.
pub struct ConcurrencyPermit(Arc<Tenant>);

impl Drop for ConcurrencyPermit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// SHA-256 of an API key.
pub fn key_digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// Whether requests must carry an API key (true when any tenant is configured).
    pub fn auth_required(&self) -> bool {
        !self.tenants.is_empty()
    }

    /// The tenant an `Authorization` header value (`Bearer KEY`) belongs to. Keys are compared
    /// as SHA-256 digests in constant time; every tenant is checked, so timing does not reveal
    /// which one matched.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ServiceError> {
        if !self.auth_required() {
            return Ok(self.anonymous.clone());
        }
        let Some(value) = authorization else {
            return Err(ServiceError::new(
                ErrorKind::Unauthorized,
                "missing API key: send the header `Authorization: Bearer YOUR_KEY`",
            ));
        };
        let key = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).unwrap_or("").trim();
        let digest = key_digest(key);
        let mut found = None;
        for t in &self.tenants {
            #[allow(deprecated)]
            let same = ring::constant_time::verify_slices_are_equal(&t.digest, &digest).is_ok();
            if same && found.is_none() {
                found = Some(t.clone());
            }
        }
        found.ok_or_else(|| ServiceError::new(ErrorKind::Unauthorized, "invalid API key"))
    }

    /// Refuses non-admins.
    pub fn require_admin(&self, tenant: &Tenant) -> Result<(), ServiceError> {
        if tenant.is_admin() {
            Ok(())
        } else if !self.auth_required() {
            Err(ServiceError::new(
                ErrorKind::Forbidden,
                "admin endpoints need an admin API key, and this deployment has none: add a [[tenants]] entry \
                 with role = \"admin\"",
            ))
        } else {
            Err(ServiceError::new(ErrorKind::Forbidden, format!("tenant {:?} is not an admin", tenant.name)))
        }
    }

    /// Takes one of `tenant`'s concurrency permits (429 when it has none left). Taken first
    /// in a request's journey, before plugins, merges or tokenization run for it.
    pub(super) fn permit(&self, tenant: &Arc<Tenant>) -> Result<Option<ConcurrencyPermit>, ServiceError> {
        if !self.auth_required() {
            return Ok(None);
        }
        let prev = tenant.active.fetch_add(1, Ordering::SeqCst);
        let permit = ConcurrencyPermit(tenant.clone());
        if prev >= tenant.max_concurrent {
            return Err(ServiceError::new(
                ErrorKind::RateLimited,
                format!(
                    "tenant {:?} already has {} requests in flight (limit {})",
                    tenant.name, prev, tenant.max_concurrent
                ),
            ));
        }
        Ok(Some(permit))
    }

    /// The models `tenant` may see: the base and every visible adapter. `root` is where each
    /// came from on the server's disk for admins; other tenants see the model's id there (the
    /// server's paths are not theirs to know).
    pub fn list_models(&self, tenant: &Tenant) -> Vec<ModelCard> {
        let root = |path: String, id: &str| if tenant.is_admin() { path } else { id.to_owned() };
        let mut out = vec![ModelCard {
            id: self.model_id.clone(),
            root: root(self.model_root.clone(), &self.model_id),
            parent: None,
        }];
        let catalog = self.pager.catalog();
        for name in catalog.names() {
            if let Some(e) = catalog.get(&name).filter(|e| tenant.may_use(e)) {
                let root = root(e.dir.display().to_string(), &name);
                out.push(ModelCard { id: name, root, parent: Some(self.model_id.clone()) });
            }
        }
        out
    }

    /// The adapters `tenant` may see (the same rule as [`Service::list_models`]) and where the
    /// pager holds each now: bound generation, host and device tiers, pinned, loading. Folders
    /// are shown to admins only.
    pub fn list_adapters(&self, tenant: &Tenant) -> Vec<AdapterStatus> {
        let catalog = self.pager.catalog();
        let (names, entries): (Vec<String>, Vec<_>) = catalog
            .names()
            .into_iter()
            .filter_map(|n| catalog.get(&n).filter(|e| tenant.may_use(e)).map(|e| (n, e)))
            .unzip();
        names
            .iter()
            .zip(&entries)
            .zip(self.pager.name_status(&names))
            .map(|((name, e), s)| AdapterStatus {
                id: name.clone(),
                generation: s.generation.map(|g| g.to_string()),
                host_resident: s.host_resident,
                device_resident: s.device_resident,
                pinned: s.pinned,
                loading: s.loading,
                path: tenant.is_admin().then(|| e.dir.display().to_string()),
            })
            .collect()
    }

    /// Loads (or replaces) adapter `name` from `dir` (admin). The name points at the new
    /// generation at once; requests already running keep the old one. The adapter is read and
    /// prepared now, so a broken one is refused here (and the old one, if any, stays) and the
    /// first request finds it resident. Its visibility comes from the deployment, as at start.
    pub fn load_adapter(&self, tenant: &Tenant, name: &str, dir: &Path) -> Result<(), ServiceError> {
        self.require_admin(tenant)?;
        if name.is_empty() || name == self.model_id || name.contains('/') {
            return Err(ServiceError::bad("lora_name", format!("{name:?} cannot name an adapter")));
        }
        let catalog = self.pager.catalog();
        let previous = catalog.get(name);
        catalog.add(name, dir).map_err(|e| ServiceError::bad("lora_path", e.to_string()))?;
        let start = Instant::now();
        if let Err(e) = self.pager.acquire_blocking(name) {
            match previous {
                Some(p) => {
                    let _ = catalog.add(name, &p.dir);
                }
                None => {
                    let _ = self.pager.remove(name);
                }
            }
            return Err(ServiceError::bad("lora_path", e.to_string()));
        }
        self.metrics.adapter_load_seconds.observe(start.elapsed().as_secs_f64());
        self.metrics.adapter_loads.fetch_add(1, Ordering::Relaxed);
        self.refresh_plugin_catalog();
        self.index_datasets();
        Ok(())
    }

    /// Unloads adapter `name` (admin); requests already running finish with it.
    pub fn unload_adapter(&self, tenant: &Tenant, name: &str) -> Result<(), ServiceError> {
        self.require_admin(tenant)?;
        self.pager
            .remove(name)
            .map_err(|_| ServiceError::new(ErrorKind::NotFound, format!("the adapter {name:?} is not loaded")))?;
        self.metrics.adapter_unloads.fetch_add(1, Ordering::Relaxed);
        self.refresh_plugin_catalog();
        Ok(())
    }

    /// Rescans the adapter folders (admin): new folders become servable, removed ones 404,
    /// changed ones serve their new content from the next request on.
    pub fn rescan_adapters(&self, tenant: &Tenant) -> Result<ScanReport, ServiceError> {
        self.require_admin(tenant)?;
        let report = self.pager.rescan();
        self.refresh_plugin_catalog();
        self.index_datasets();
        Ok(report)
    }
}
