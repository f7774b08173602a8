//! The plugin admin routes (admin key): `GET /v1/admin/plugins` lists the chain,
//! `POST /v1/admin/plugins/load` loads a `[[plugins]]` entry sent as JSON,
//! `POST /v1/admin/plugins/unload` unloads one by `name`, `POST /v1/admin/plugins/reload`
//! reloads one (`name`; `path` and `config` optional). See [`crate::service::plugin_admin`].

use std::collections::BTreeMap;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Value, json};

use super::{Svc, error_response, json_response, parse, prologue, tenant};
use crate::plugins::PluginSpec;
use crate::service::plugin_admin::{PluginInfo, ReloadChanges};
use crate::service::{ErrorKind, ServiceError};

/// The keys of a `[[plugins]]` entry (`PluginSpec`), in the order the docs give them.
const ENTRY_KEYS: &[&str] =
    &["name", "kind", "path", "failure", "timeout_ms", "memory_mib", "fuel", "quarantine_after", "config"];

/// Runs a blocking admin operation (plugin loads compile and self-test) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ServiceError::new(ErrorKind::Internal, e.to_string()))?
}

fn info_json(p: &PluginInfo) -> Value {
    let mut v = serde_json::to_value(&p.spec).unwrap_or_else(|_| json!({}));
    if let Value::Object(o) = &mut v {
        o.insert("origin".into(), json!(p.origin.name()));
        if let Some(m) = &p.metrics {
            o.insert("abi_version".into(), json!(m.abi_version));
            o.insert("component_sha256".into(), json!(m.component_sha256));
            o.insert("calls".into(), json!(m.calls));
            o.insert("failures".into(), json!(m.failures));
            o.insert("fallbacks".into(), json!(m.fallbacks));
            o.insert("quarantined".into(), json!(m.quarantined));
            o.insert("reloads".into(), json!(m.reloads));
        }
    }
    v
}

pub(super) async fn list(State(svc): State<Svc>, headers: HeaderMap) -> Response {
    match tenant(&svc, &headers).and_then(|t| svc.list_plugins(&t)) {
        Ok(list) => json_response(&json!({"object": "list", "data": list.iter().map(info_json).collect::<Vec<_>>()})),
        Err(e) => error_response(&e),
    }
}

/// Reads a `[[plugins]]` entry from JSON: unknown keys and missing ones are named.
fn entry(obj: serde_json::Map<String, Value>) -> Result<PluginSpec, ServiceError> {
    let f = parse::Fields(&obj);
    f.only(ENTRY_KEYS, "a plugin entry")?;
    for k in ["name", "kind", "path"] {
        if f.str(k)?.is_none() {
            return Err(ServiceError::bad(
                k,
                format!("`{k}` is required (a plugin entry has {})", ENTRY_KEYS.join(", ")),
            ));
        }
    }
    serde_json::from_value(Value::Object(obj))
        .map_err(|e| ServiceError::new(ErrorKind::BadRequest, format!("the plugin entry is not valid: {e}")))
}

pub(super) async fn load(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        svc.require_admin(&t)?;
        let spec = entry(parse::Fields::parse(&body)?)?;
        let svc2 = svc.clone();
        let name = spec.name.clone();
        let report = blocking(move || svc2.load_plugin(&t, spec)).await?;
        Ok::<_, ServiceError>(json!({
            "loaded": name, "abi_version": report.abi_version, "component_sha256": report.component_sha256,
        }))
    }
    .await;
    match r {
        Ok(v) => json_response(&v),
        Err(e) => error_response(&e),
    }
}

pub(super) async fn unload(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        svc.require_admin(&t)?;
        let obj = parse::Fields::parse(&body)?;
        let f = parse::Fields(&obj);
        f.only(&["name"], "/v1/admin/plugins/unload")?;
        let name = f.str("name")?.ok_or_else(|| ServiceError::bad("name", "`name` is required"))?.to_owned();
        let svc2 = svc.clone();
        let spec = blocking(move || svc2.unload_plugin(&t, &name)).await?;
        Ok::<_, ServiceError>(json!({"unloaded": spec.name, "kind": spec.kind.name()}))
    }
    .await;
    match r {
        Ok(v) => json_response(&v),
        Err(e) => error_response(&e),
    }
}

pub(super) async fn reload(State(svc): State<Svc>, headers: HeaderMap, body: Body) -> Response {
    let r = async {
        let (t, body) = prologue(&svc, &headers, body).await?;
        svc.require_admin(&t)?;
        let obj = parse::Fields::parse(&body)?;
        let f = parse::Fields(&obj);
        f.only(&["name", "path", "config"], "/v1/admin/plugins/reload")?;
        let name = f.str("name")?.ok_or_else(|| ServiceError::bad("name", "`name` is required"))?.to_owned();
        let config = match obj.get("config") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>()),
            Some(v) => return Err(ServiceError::bad("config", format!("`config` must be an object, not {v}"))),
        };
        let changes = ReloadChanges { path: f.str("path")?.map(std::path::PathBuf::from), config };
        let svc2 = svc.clone();
        blocking(move || svc2.reload_plugin(&t, &name, changes)).await
    }
    .await;
    match r {
        Ok(sha) => json_response(&json!({"reloaded": true, "component_sha256": sha})),
        Err(e) => error_response(&e),
    }
}
