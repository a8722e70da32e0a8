//! `outrun new NAME --lang rust`: a ready-to-build handler project. The
//! guest SDK and the WIT package are vendored into it (from the copies this
//! binary carries, see [`crate::shipped`]) so it builds anywhere, with the
//! dependency versions of this outrun's own lockfile.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The handler's name: the crate name, and its `[[handler]] name`.
    pub name: String,
    /// The language of the project.
    #[arg(long, value_enum, default_value_t = Lang::Rust)]
    pub lang: Lang,
    /// Where to write the project [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Write into a directory that is not empty (files of the template are
    /// replaced, others are left alone).
    #[arg(long)]
    pub force: bool,
}

/// The Rust template: (path in the project, contents with `{{name}}` and
/// `{{crate}}` placeholders).
const RUST: &[(&str, &str)] = &[
    (
        "Cargo.toml",
        include_str!("../../templates/rust/Cargo.toml.tmpl"),
    ),
    (
        "src/lib.rs",
        include_str!("../../templates/rust/src/lib.rs"),
    ),
    (
        "outrun.toml",
        include_str!("../../templates/rust/outrun.toml.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../templates/rust/README.md.tmpl"),
    ),
    (
        "schema.sql",
        include_str!("../../templates/rust/schema.sql"),
    ),
    (
        "events/order.created.json",
        include_str!("../../templates/rust/events/order.created.json"),
    ),
    (
        "fixtures/http.json",
        include_str!("../../templates/rust/fixtures/http.json"),
    ),
    (".gitignore", include_str!("../../templates/rust/gitignore")),
];

pub async fn run(args: Args) -> anyhow::Result<()> {
    validate_name(&args.name)?;
    if args.lang != Lang::Rust {
        bail!(
            "--lang {}: not yet; this outrun writes Rust projects only (--lang rust). Python and JavaScript guests are planned (issue 13)",
            match args.lang {
                Lang::Python => "python",
                _ => "js",
            }
        );
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    check_target_dir(&dir, args.force)?;
    let written = write_rust(&dir, &args.name)?;
    let krate = args.name.replace('-', "_");
    outln!(
        "created {} ({} files): an outrun handler in Rust",
        dir.display(),
        written
    );
    outln!();
    outln!("Next:");
    outln!("  cd {}", dir.display());
    outln!("  cargo build --target wasm32-wasip2 --release");
    outln!("  outrun handlers check target/wasm32-wasip2/release/{krate}.wasm");
    outln!("  cargo test");
    outln!("  sqlite3 app.db < schema.sql");
    outln!(
        "  outrun handlers run target/wasm32-wasip2/release/{krate}.wasm --event order.created \\"
    );
    outln!(
        "      --payload @events/order.created.json --http-fixtures fixtures/http.json --database sqlite://app.db"
    );
    outln!();
    outln!("The [[handler]] to paste into your config (also in outrun.toml):");
    outln!();
    outln!("{}", handler_snippet(&args.name));
    Ok(())
}

/// A crate name cargo accepts, which also reads well as a handler name.
fn validate_name(name: &str) -> anyhow::Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.len() <= 64;
    if !ok {
        bail!(
            "{name:?} is not a usable handler name: use letters, digits, '-' and '_', starting with a letter (at most 64), e.g. order-welcome"
        );
    }
    Ok(())
}

fn check_target_dir(dir: &Path, force: bool) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!(
            "{} exists and is not a directory; choose another --dir",
            dir.display()
        );
    }
    let non_empty = dir.is_dir()
        && std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some();
    if non_empty && !force {
        bail!(
            "{} is not empty; nothing was written. Choose another --dir, or pass --force to write the template into it (files of the same names are replaced)",
            dir.display()
        );
    }
    Ok(())
}

fn fill(template: &str, name: &str) -> String {
    template
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
}

/// The `[[handler]]` section of the template's outrun.toml.
fn handler_snippet(name: &str) -> String {
    let config = fill(RUST[2].1, name);
    // The section, not the comment that mentions it.
    let start = config.find("\n[[handler]]").map_or(0, |i| i + 1);
    config[start..].trim_end().to_string()
}

/// Write the project; returns the number of files written.
fn write_rust(dir: &Path, name: &str) -> anyhow::Result<usize> {
    let mut files: Vec<(PathBuf, String)> = RUST
        .iter()
        .map(|(path, text)| (PathBuf::from(path), fill(text, name)))
        .collect();
    let sources = crate::shipped::sdk_sources();
    let source = |want: &str| {
        sources
            .iter()
            .find(|(p, _)| *p == want)
            .map(|(_, t)| *t)
            .with_context(|| format!("this outrun binary does not carry {want}"))
    };
    for (path, text) in sources {
        if let Some(rel) = path.strip_prefix("sdk/src/") {
            files.push((
                Path::new("vendor/outrun-sdk/src").join(rel),
                text.to_string(),
            ));
        } else if path.starts_with("wit/") {
            files.push((PathBuf::from(path), text.to_string()));
        }
    }
    files.push((
        PathBuf::from("vendor/outrun-sdk/Cargo.toml"),
        standalone_sdk_manifest(
            source("sdk/Cargo.toml.workspace")?,
            source("workspace/Cargo.toml")?,
        )?,
    ));
    // The versions outrun's own guests are built and tested with; cargo
    // drops what the project does not use, and no registry is asked.
    files.push((
        PathBuf::from("Cargo.lock"),
        source("Cargo.lock")?.to_string(),
    ));
    for (rel, text) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(files.len())
}

/// The SDK's manifest with every `workspace = true` replaced by the
/// workspace's value, so the vendored copy builds on its own.
fn standalone_sdk_manifest(sdk: &str, workspace: &str) -> anyhow::Result<String> {
    use toml::{Table, Value};
    let mut sdk: Table = sdk.parse().context("the SDK's Cargo.toml")?;
    let ws: Table = workspace.parse().context("the workspace Cargo.toml")?;
    let ws = ws
        .get("workspace")
        .and_then(Value::as_table)
        .context("the workspace Cargo.toml has no [workspace]")?;
    let inherits = |v: &Value| {
        v.as_table()
            .and_then(|t| t.get("workspace"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    if let Some(Value::Table(package)) = sdk.get_mut("package") {
        let from = ws.get("package").and_then(Value::as_table);
        for (key, value) in package.iter_mut() {
            if inherits(value) {
                *value = from
                    .and_then(|f| f.get(key))
                    .cloned()
                    .with_context(|| format!("workspace.package.{key} is missing"))?;
            }
        }
        package.insert("publish".into(), Value::Boolean(false));
    }
    if let Some(Value::Table(deps)) = sdk.get_mut("dependencies") {
        let from = ws.get("dependencies").and_then(Value::as_table);
        for (key, value) in deps.iter_mut() {
            if !inherits(value) {
                continue;
            }
            let base = from
                .and_then(|f| f.get(key))
                .cloned()
                .with_context(|| format!("workspace.dependencies.{key} is missing"))?;
            let mut merged = match base {
                Value::String(version) => {
                    let mut t = Table::new();
                    t.insert("version".into(), Value::String(version));
                    t
                }
                Value::Table(t) => t,
                other => bail!("workspace.dependencies.{key} = {other} is not a version or table"),
            };
            if let Some(own) = value.as_table() {
                for (k, v) in own {
                    if k == "features" {
                        let mut features = merged
                            .get("features")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        features.extend(v.as_array().cloned().unwrap_or_default());
                        merged.insert("features".into(), Value::Array(features));
                    } else if k != "workspace" {
                        merged.insert(k.clone(), v.clone());
                    }
                }
            }
            *value = Value::Table(merged);
        }
    }
    Ok(format!(
        "# Vendored by `outrun new` from outrun's handlers/sdk.\n{}",
        toml::to_string(&sdk)?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["order-welcome", "a", "x_1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "1abc", "a b", "a/b", "ö"] {
            let e = validate_name(bad).unwrap_err().to_string();
            assert!(e.contains("not a usable handler name"), "{e}");
        }
    }

    #[test]
    fn sdk_manifest_stands_alone() {
        let sdk = r#"
[package]
name = "outrun-sdk"
edition.workspace = true
version.workspace = true

[dependencies]
serde.workspace = true
serde_json = { workspace = true, features = ["raw_value"] }
wit-bindgen = "0.63"
"#;
        let ws = r#"
[workspace]
members = []
[workspace.package]
edition = "2024"
version = "0.1.0"
[workspace.dependencies]
serde = { version = "1", features = ["derive"] }
serde_json = "1"
"#;
        let out: toml::Table = standalone_sdk_manifest(sdk, ws).unwrap().parse().unwrap();
        assert_eq!(out["package"]["edition"].as_str(), Some("2024"));
        assert_eq!(out["package"]["version"].as_str(), Some("0.1.0"));
        assert_eq!(out["dependencies"]["serde"]["version"].as_str(), Some("1"));
        assert_eq!(
            out["dependencies"]["serde_json"]["features"][0].as_str(),
            Some("raw_value")
        );
        assert_eq!(out["dependencies"]["wit-bindgen"].as_str(), Some("0.63"));
        assert!(!out.to_string().contains("workspace"));
    }

    #[test]
    fn the_real_sdk_manifest_converts() {
        let sources = crate::shipped::sdk_sources();
        let get = |p: &str| sources.iter().find(|(n, _)| *n == p).unwrap().1;
        let out =
            standalone_sdk_manifest(get("sdk/Cargo.toml.workspace"), get("workspace/Cargo.toml"))
                .unwrap();
        assert!(!out.contains("workspace = true"), "{out}");
        assert!(out.contains("wit-bindgen"), "{out}");
    }

    #[test]
    fn snippet_is_the_handler_section() {
        let s = handler_snippet("order-welcome");
        assert!(
            s.starts_with("[[handler]]\nname = \"order-welcome\""),
            "{s}"
        );
        assert!(
            s.contains("target/wasm32-wasip2/release/order_welcome.wasm"),
            "{s}"
        );
        let parsed: toml::Table = s.parse().unwrap();
        assert!(parsed.contains_key("handler"));
    }
}
