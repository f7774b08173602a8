//! `cargo xtask plugins`: builds the example plugins (and the test fixture plugins) into
//! components under `target/plugins/`.

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("plugins") => {
            for (label, workspace) in
                [("examples", xtask::examples_workspace()), ("fixtures", xtask::fixtures_workspace())]
            {
                let out = xtask::output_dir(label);
                let built = xtask::build_workspace(&workspace, &out)
                    .with_context(|| format!("building {}", workspace.display()))?;
                let how = if built.cached { "unchanged, cached" } else { "built" };
                println!("{label} ({how}):");
                for (name, path) in &built.components {
                    println!("  {name:<24} {}", path.display());
                }
            }
            Ok(())
        }
        _ => bail!("usage: cargo xtask plugins   (builds plugins/ and tests/fixtures/plugins/ into target/plugins/)"),
    }
}
