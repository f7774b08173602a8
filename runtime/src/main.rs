//! The `openlora` command line: one file per subcommand under `cli/`.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "openlora", version, about = "Multi-LoRA inference runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download and verify the default model (SmolLM2-135M-Instruct Q4_1) into the cache.
    Fetch {
        /// Download again even if a verified copy exists.
        #[arg(long)]
        force: bool,
    },
    /// Generate a completion for one prompt and print it (in process, on the same service and
    /// engine as `serve`; with --deployment, exactly the path an HTTP request takes).
    Generate(Box<cli::generate::GenerateArgs>),
    /// Measure single-stream prefill and decode speed, or batched decode; prints one JSON line.
    Bench(cli::bench::BenchArgs),
    /// Serve a deployment over HTTP (OpenAI-compatible API, adapter admin, metrics).
    Serve(cli::serve::ServeArgs),
    /// Check or export a receipt ledger.
    #[command(subcommand)]
    Ledger(cli::ledger::LedgerCommand),
    /// Synthetic adapters and the adapter pager benchmark.
    #[command(subcommand)]
    Adapters(cli::adapters::AdaptersCommand),
    /// The CUDA backend: probe for a GPU, precompile the kernels.
    #[command(subcommand)]
    Cuda(cli::cuda::CudaCommand),
    /// Write, build and check wasm plugins: `plugin new NAME --kind KIND`, `plugin build`,
    /// `plugin check FILE.wasm --kind KIND`.
    #[command(subcommand)]
    Plugin(cli::plugin::PluginCommand),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Fetch { force } => {
            let p = openlora::model::default_model::fetch(force)?;
            println!("{}", p.display());
            Ok(())
        }
        Command::Generate(a) => cli::generate::run(*a),
        Command::Bench(a) => cli::bench::run(a),
        Command::Serve(a) => cli::serve::run(a),
        Command::Ledger(c) => cli::ledger::run(c),
        Command::Adapters(c) => cli::adapters::run(c),
        Command::Cuda(c) => cli::cuda::run(c),
        Command::Plugin(c) => cli::plugin::run(c),
    }
}
