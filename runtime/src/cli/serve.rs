//! `openlora serve`: a deployment over HTTP.

use std::path::PathBuf;

use anyhow::{Context, Result};
use openlora::config::Deployment;
use openlora::service::Tenant;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The deployment file (TOML), e.g. examples/quickstart.toml.
    config: PathBuf,
    /// Listen on this address instead of the file's `server.listen` (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let mut d = Deployment::load(&a.config)?;
    if let Some(l) = a.listen {
        l.parse::<std::net::SocketAddr>()
            .with_context(|| format!("--listen {l:?} is not an address like 127.0.0.1:8000"))?;
        d.server.listen = l;
        d.check_exposure(&a.config)?;
    }
    let svc = super::start_service(&d)?;
    // A plugin reload re-reads its entry from the file.
    svc.set_deployment_file(&a.config);
    let adapters = svc.list_models(&Tenant::local_admin("")).len() - 1;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let grace = std::time::Duration::from_secs(d.server.shutdown_grace_seconds);
    let model_id = svc.model_id().to_owned();
    rt.block_on(async move {
        let addr = d.listen_addr();
        let listener =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
        let local = listener.local_addr()?;
        let (blocks, block_size) = svc.kv_blocks();
        eprintln!(
            "openlora: serving {model_id} with {adapters} adapters on {} ({}; KV cache {blocks} blocks of {block_size} tokens, {} context; auth {})",
            openlora::server::describe(local),
            svc.backend_name(),
            svc.context_limit(),
            if svc.auth_required() { "on" } else { "OFF: no [[tenants]], so callers need no key and admin endpoints are closed" },
        );
        openlora::server::serve(svc, listener, shutdown_signal(), grace).await?;
        eprintln!("openlora: stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("openlora: shutting down; letting in-flight requests finish");
}
