//! Plugins at run time (admin operations): list the chain, load a plugin into it, unload one,
//! reload one. The HTTP routes are `GET /v1/admin/plugins`, `POST /v1/admin/plugins/load`,
//! `POST /v1/admin/plugins/unload` and `POST /v1/admin/plugins/reload`.
//!
//! The chain is an ordered list of names and kinds (preprocessors run in that order; at most
//! one router, merger and attributor), read by every request and changed only here, one admin
//! operation at a time. A load body is a `[[plugins]]` entry of the deployment file, as JSON,
//! with the same keys, defaults and checks. Order of operations, so a request never meets a
//! half-made change:
//! - **load**: the component is compiled, linked and self-tested in the host first; only a
//!   plugin that passed joins the chain (at its end);
//! - **unload**: the plugin leaves the chain first, then the host drops it; a request that
//!   read the chain just before finds it gone and carries on as if it had never been
//!   configured (see `plugin_chain`), calls in flight finish on the version they hold;
//! - **reload**: the new version is swapped in atomically; a failing one leaves the old.
//!
//! What is not done: a loaded plugin is not written into the deployment file (like vLLM's
//! `load_lora_adapter`); a restart serves what the file says.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openlora_kernels::Backend;

use super::Service;
use super::api::{ErrorKind, ServiceError};
use super::tenancy::Tenant;
use crate::plugins::{self as pl, PluginHost, PluginKind, PluginMetrics, PluginSpec};

/// The longest plugin name the admin API accepts (it names metrics series and log lines).
pub const MAX_PLUGIN_NAME: usize = 64;

/// Where a plugin in the chain came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginOrigin {
    /// The deployment's `[[plugins]]`, at start.
    Deployment,
    /// `POST /v1/admin/plugins/load`, at run time.
    AdminApi,
}

impl PluginOrigin {
    /// Its name in the admin listing.
    pub fn name(self) -> &'static str {
        match self {
            Self::Deployment => "deployment",
            Self::AdminApi => "admin_api",
        }
    }
}

/// One plugin of the chain.
#[derive(Clone, Debug)]
pub(super) struct ChainLink {
    pub name: String,
    pub kind: PluginKind,
    pub origin: PluginOrigin,
}

/// A plugin as the admin listing shows it.
#[derive(Clone, Debug)]
pub struct PluginInfo {
    /// Its entry (path resolved, config included: admins only).
    pub spec: PluginSpec,
    /// Where it came from.
    pub origin: PluginOrigin,
    /// Its counters and version.
    pub metrics: Option<PluginMetrics>,
}

/// What a reload changes besides reading the plugin's entry again.
#[derive(Clone, Debug, Default)]
pub struct ReloadChanges {
    /// A component file in place of the entry's.
    pub path: Option<PathBuf>,
    /// A `config` table in place of the entry's.
    pub config: Option<BTreeMap<String, serde_json::Value>>,
}

/// A plugin host with the service's options: compiled components cached under
/// `$OPENLORA_CACHE/plugins` (default `~/.cache/openlora/plugins`).
pub(super) fn new_host() -> Result<PluginHost, ServiceError> {
    let cache = std::env::var_os("OPENLORA_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/openlora")));
    PluginHost::new(pl::HostOptions { cache_dir: cache.map(|c| c.join("plugins")), ..pl::HostOptions::default() })
        .map_err(|e| ServiceError::internal(format!("plugins: {e}")))
}

/// Whether `f` is the failure of a plugin unloaded after the chain was read: the request
/// goes on as if the plugin had not been configured.
pub(super) fn was_unloaded(f: &pl::PluginFailure) -> bool {
    matches!(f.error, pl::PluginError::NotLoaded)
}

impl<B: Backend + Clone + 'static> Service<B> {
    /// The names of the chain's plugins of `kind`, in chain order (a snapshot).
    pub(super) fn plugins_of(&self, kind: PluginKind) -> Vec<String> {
        self.chain().iter().filter(|l| l.kind == kind).map(|l| l.name.clone()).collect()
    }

    fn chain(&self) -> std::sync::RwLockReadGuard<'_, Vec<ChainLink>> {
        // Changed only by whole-element pushes and removals: a poisoned lock is consistent.
        self.chain.read().unwrap_or_else(|e| e.into_inner())
    }

    fn chain_mut(&self) -> std::sync::RwLockWriteGuard<'_, Vec<ChainLink>> {
        self.chain.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A path from an admin request: relative ones are taken from the deployment file's
    /// folder, as the file's own paths are.
    fn admin_path(&self, path: &Path) -> PathBuf {
        match self.deployment_file.get().and_then(|f| f.parent()) {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_path_buf(),
        }
    }

    /// The chain's plugins in order, with their entries and counters (admin).
    pub fn list_plugins(&self, tenant: &Tenant) -> Result<Vec<PluginInfo>, ServiceError> {
        self.require_admin(tenant)?;
        let Some(host) = self.plugins.get() else { return Ok(Vec::new()) };
        let metrics = host.metrics();
        Ok(self
            .chain()
            .iter()
            .filter_map(|l| {
                Some(PluginInfo {
                    spec: host.spec(&l.name)?,
                    origin: l.origin,
                    metrics: metrics.iter().find(|m| m.name == l.name).cloned(),
                })
            })
            .collect())
    }

    /// Loads a plugin into the chain at run time (admin): `spec` is a `[[plugins]]` entry.
    /// It is compiled and self-tested before it joins; the checks of the deployment file
    /// apply (a unique name, at most one router, merger and attributor).
    pub fn load_plugin(&self, tenant: &Tenant, mut spec: PluginSpec) -> Result<pl::LoadReport, ServiceError> {
        self.require_admin(tenant)?;
        let name = spec.name.clone();
        if name.is_empty()
            || name.len() > MAX_PLUGIN_NAME
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            let shown: String = name.chars().take(MAX_PLUGIN_NAME).collect();
            return Err(ServiceError::bad(
                "name",
                format!(
                    "the plugin name {shown:?} must be 1 to {MAX_PLUGIN_NAME} characters of letters, digits, `-`, `_` and `.`"
                ),
            ));
        }
        let _admin = self.plugin_admin.lock().unwrap_or_else(|e| e.into_inner());
        {
            let chain = self.chain();
            if chain.iter().any(|l| l.name == name) {
                return Err(ServiceError::bad(
                    "name",
                    format!(
                        "a plugin named {name:?} is already loaded; reload it (POST /v1/admin/plugins/reload) or unload it first"
                    ),
                ));
            }
            if spec.kind != PluginKind::Preprocessor
                && let Some(other) = chain.iter().find(|l| l.kind == spec.kind)
            {
                return Err(ServiceError::bad(
                    "kind",
                    format!(
                        "only one {} plugin may be loaded, and {:?} is; unload it first to replace it",
                        spec.kind, other.name
                    ),
                ));
            }
        }
        spec.path = self.admin_path(&spec.path);
        let host = match self.plugins.get() {
            Some(h) => h,
            None => {
                // The first plugin of a deployment that started without any.
                let _ = self.plugins.set(Arc::new(new_host()?));
                self.refresh_plugin_catalog();
                self.plugins.get().ok_or_else(|| ServiceError::internal("the plugin host did not start"))?
            }
        };
        let kind = spec.kind;
        let report = host.load(spec).map_err(|e| ServiceError::bad("path", e.to_string()))?;
        self.chain_mut().push(ChainLink { name: name.clone(), kind, origin: PluginOrigin::AdminApi });
        eprintln!("openlora: plugin {name} ({kind}) loaded at run time, component sha256 {}", report.component_sha256);
        Ok(report)
    }

    /// Unloads plugin `name` (admin): it leaves the chain at once; calls in flight finish.
    /// Returns its entry.
    pub fn unload_plugin(&self, tenant: &Tenant, name: &str) -> Result<PluginSpec, ServiceError> {
        self.require_admin(tenant)?;
        let _admin = self.plugin_admin.lock().unwrap_or_else(|e| e.into_inner());
        let not_loaded = || ServiceError::new(ErrorKind::NotFound, format!("no plugin named {name:?} is loaded"));
        let host = self.plugins.get().ok_or_else(not_loaded)?;
        let spec = host.spec(name).ok_or_else(not_loaded)?;
        {
            let mut chain = self.chain_mut();
            let at = chain.iter().position(|l| l.name == name).ok_or_else(not_loaded)?;
            chain.remove(at);
        }
        host.unload(name);
        eprintln!("openlora: plugin {name} ({}) unloaded at run time", spec.kind);
        Ok(spec)
    }

    /// Names the deployment file this service was started from (once; later calls are
    /// ignored), so [`Self::reload_plugin`] can re-read a plugin's entry from it.
    pub fn set_deployment_file(&self, path: &Path) {
        let _ = self.deployment_file.set(path.to_owned());
    }

    /// Reloads plugin `name` (admin); the old version keeps serving calls in flight, and a
    /// version that fails to load or self-test is not swapped in. Returns the new
    /// component's SHA-256.
    ///
    /// What is loaded: for a plugin of the deployment file (when the service was started from
    /// one), its `[[plugins]]` entry as the file says *now* (path, config, limits, failure
    /// policy); for a plugin loaded through the admin API, or with no file, the entry it runs
    /// with. Then `changes.path` and `changes.config`, when given, replace the entry's. The
    /// kind must not change; a plugin gone from the file is unloaded with
    /// [`Self::unload_plugin`], not reloaded.
    pub fn reload_plugin(&self, tenant: &Tenant, name: &str, changes: ReloadChanges) -> Result<String, ServiceError> {
        self.require_admin(tenant)?;
        let _admin = self.plugin_admin.lock().unwrap_or_else(|e| e.into_inner());
        let not_loaded = || ServiceError::new(ErrorKind::NotFound, format!("no plugin named {name:?} is loaded"));
        let host = self.plugins.get().ok_or_else(not_loaded)?;
        let current = host.spec(name).ok_or_else(not_loaded)?;
        let origin = self.chain().iter().find(|l| l.name == name).map(|l| l.origin).ok_or_else(not_loaded)?;
        let mut spec = match (origin, self.deployment_file.get()) {
            (PluginOrigin::AdminApi, _) | (_, None) => current.clone(),
            (PluginOrigin::Deployment, Some(file)) => {
                let d = crate::config::Deployment::load(file).map_err(|e| {
                    ServiceError::bad("name", format!("re-reading the deployment {}: {e}", file.display()))
                })?;
                let entry = d.plugins.into_iter().find(|p| p.name == name).ok_or_else(|| {
                    ServiceError::bad(
                        "name",
                        format!(
                            "the plugin {name:?} is no longer in {}; to stop it, unload it (POST /v1/admin/plugins/unload)",
                            file.display()
                        ),
                    )
                })?;
                if entry.kind != current.kind {
                    return Err(ServiceError::bad(
                        "name",
                        format!(
                            "{} now says the plugin {name:?} is a {}, but it runs as a {}; unload it and load the new entry to change its kind",
                            file.display(),
                            entry.kind,
                            current.kind
                        ),
                    ));
                }
                entry
            }
        };
        if let Some(path) = changes.path {
            spec.path = self.admin_path(&path);
        }
        if let Some(config) = changes.config {
            spec.config = config;
        }
        let report = host.load(spec).map_err(|e| ServiceError::bad("path", e.to_string()))?;
        Ok(report.component_sha256)
    }
}
