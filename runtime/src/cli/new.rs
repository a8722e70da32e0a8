//! `outrun new NAME --lang rust|python|js`: a ready-to-build handler
//! project. The guest SDK of the language and the WIT package are vendored
//! into it (from the copies this binary carries, see [`crate::shipped`]) so
//! it builds anywhere; a Rust project also gets the dependency versions of
//! this outrun's own lockfile.

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

/// Files shared by every language's template: the example's table, event
/// and HTTP fixture.
const SHARED: &[(&str, &str)] = &[
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
];

/// The Python template: the example handler of handlers/example-python and
/// the SDK of handlers/sdk-python, so the template is the example CI builds.
const PYTHON: &[(&str, &str)] = &[
    (
        "app.py",
        include_str!("../../../handlers/example-python/app.py"),
    ),
    (
        "test_app.py",
        include_str!("../../templates/python/test_app.py"),
    ),
    (
        "outrun.toml",
        include_str!("../../templates/python/outrun.toml.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../templates/python/README.md.tmpl"),
    ),
    (
        ".gitignore",
        include_str!("../../templates/python/gitignore"),
    ),
    (
        "outrun_sdk/__init__.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/__init__.py"),
    ),
    (
        "outrun_sdk/_wit.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/_wit.py"),
    ),
    (
        "outrun_sdk/config.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/config.py"),
    ),
    (
        "outrun_sdk/http.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/http.py"),
    ),
    (
        "outrun_sdk/kv.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/kv.py"),
    ),
    (
        "outrun_sdk/log.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/log.py"),
    ),
    (
        "outrun_sdk/sql.py",
        include_str!("../../../handlers/sdk-python/outrun_sdk/sql.py"),
    ),
];

/// The JavaScript template: handlers/example-js with handlers/sdk-js
/// vendored beside it (componentize-js resolves relative imports only).
const JS: &[(&str, &str)] = &[
    (
        "app.js",
        include_str!("../../../handlers/example-js/app.js"),
    ),
    (
        "logic.js",
        include_str!("../../../handlers/example-js/logic.js"),
    ),
    ("test.mjs", include_str!("../../templates/js/test.mjs")),
    (
        "package.json",
        include_str!("../../templates/js/package.json.tmpl"),
    ),
    (
        "outrun.toml",
        include_str!("../../templates/js/outrun.toml.tmpl"),
    ),
    (
        "README.md",
        include_str!("../../templates/js/README.md.tmpl"),
    ),
    (".gitignore", include_str!("../../templates/js/gitignore")),
    (
        "outrun-sdk/index.js",
        include_str!("../../../handlers/sdk-js/index.js"),
    ),
    (
        "outrun-sdk/index.d.ts",
        include_str!("../../../handlers/sdk-js/index.d.ts"),
    ),
    (
        "outrun-sdk/package.json",
        include_str!("../../../handlers/sdk-js/package.json"),
    ),
];

/// What differs between the languages after the files: how to build, where
/// the component lands, how to test.
struct LangSpec {
    label: &'static str,
    files: &'static [(&'static str, &'static str)],
    build: &'static str,
    module: &'static str,
    test: &'static str,
}

fn lang(lang: Lang) -> LangSpec {
    match lang {
        Lang::Rust => LangSpec {
            label: "Rust",
            files: RUST,
            build: "cargo build --target wasm32-wasip2 --release",
            module: "target/wasm32-wasip2/release/{{crate}}.wasm",
            test: "cargo test",
        },
        Lang::Python => LangSpec {
            label: "Python",
            files: PYTHON,
            build: "mkdir -p target && componentize-py -d wit -w handler componentize app -o target/{{crate}}.wasm",
            module: "target/{{crate}}.wasm",
            test: "python3 -m unittest",
        },
        Lang::Js => LangSpec {
            label: "JavaScript",
            files: JS,
            build: "mkdir -p target && componentize-js app.js --wit wit --world-name handler -o target/{{crate}}.wasm",
            module: "target/{{crate}}.wasm",
            test: "node --test",
        },
    }
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    validate_name(&args.name)?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&args.name));
    check_target_dir(&dir, args.force)?;
    let l = lang(args.lang);
    let written = write_project(&dir, &args.name, args.lang)?;
    let module = fill(l.module, &args.name, "");
    let build = fill(l.build, &args.name, "");
    outln!(
        "created {} ({} files): an outrun handler in {}",
        dir.display(),
        written,
        l.label
    );
    outln!();
    outln!("Next:");
    outln!("  cd {}", dir.display());
    if args.lang != Lang::Rust {
        outln!(
            "  (the pinned toolchain: see README.md; in an outrun checkout, scripts/install-guest-toolchains.sh)"
        );
    }
    outln!("  {build}");
    outln!("  outrun handlers check {module}");
    outln!("  {}", l.test);
    outln!("  sqlite3 app.db < schema.sql");
    outln!("  outrun handlers run {module} --event order.created \\");
    outln!(
        "      --payload @events/order.created.json --http-fixtures fixtures/http.json --database sqlite://app.db"
    );
    outln!();
    outln!("The [[handler]] to paste into your config (also in outrun.toml):");
    outln!();
    outln!("{}", handler_snippet(&args.name, args.lang));
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

/// Replace `{{name}}`, `{{crate}}` (the name with `_` for `-`: file and
/// crate names) and `{{build}}` (the build command).
fn fill(template: &str, name: &str, build: &str) -> String {
    template
        .replace("{{build}}", build)
        .replace("{{name}}", name)
        .replace("{{crate}}", &name.replace('-', "_"))
}

/// The `[[handler]]` section of the template's outrun.toml.
fn handler_snippet(name: &str, which: Lang) -> String {
    let l = lang(which);
    let build = fill(l.build, name, "");
    let (_, template) = l
        .files
        .iter()
        .find(|(path, _)| *path == "outrun.toml")
        .expect("every template has an outrun.toml");
    let config = fill(template, name, &build);
    // The section, not the comment that mentions it.
    let start = config.find("\n[[handler]]").map_or(0, |i| i + 1);
    config[start..].trim_end().to_string()
}

/// Write the project; returns the number of files written.
fn write_project(dir: &Path, name: &str, which: Lang) -> anyhow::Result<usize> {
    let l = lang(which);
    let build = fill(l.build, name, "");
    let mut files: Vec<(PathBuf, String)> = l
        .files
        .iter()
        .map(|(path, text)| (PathBuf::from(path), fill(text, name, &build)))
        .collect();
    if which != Lang::Rust {
        files.extend(
            SHARED
                .iter()
                .map(|(path, text)| (PathBuf::from(path), text.to_string())),
        );
    }
    let sources = crate::shipped::sdk_sources();
    let source = |want: &str| {
        sources
            .iter()
            .find(|(p, _)| *p == want)
            .map(|(_, t)| *t)
            .with_context(|| format!("this outrun binary does not carry {want}"))
    };
    for (path, text) in sources {
        if path.starts_with("wit/") {
            files.push((PathBuf::from(path), text.to_string()));
        } else if let Some(rel) = path.strip_prefix("sdk/src/")
            && which == Lang::Rust
        {
            files.push((
                Path::new("vendor/outrun-sdk/src").join(rel),
                text.to_string(),
            ));
        }
    }
    if which == Lang::Rust {
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
    }
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
        let s = handler_snippet("order-welcome", Lang::Rust);
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

    #[test]
    fn python_and_js_snippets_build_into_target() {
        for (which, tool) in [
            (Lang::Python, "componentize-py"),
            (Lang::Js, "componentize-js"),
        ] {
            let s = handler_snippet("order-welcome", which);
            let parsed: toml::Table = s.parse().unwrap();
            let h = &parsed["handler"][0];
            assert_eq!(
                h["module"].as_str(),
                Some("target/order_welcome.wasm"),
                "{s}"
            );
            let build = h["build"].as_str().unwrap();
            assert!(build.contains(tool), "{s}");
            assert!(build.ends_with("-o target/order_welcome.wasm"), "{s}");
        }
    }

    #[test]
    fn templates_leave_no_placeholder() {
        for which in [Lang::Rust, Lang::Python, Lang::Js] {
            let l = lang(which);
            for (path, text) in l.files {
                let out = fill(text, "order-welcome", "the build");
                assert!(!out.contains("{{"), "{path} keeps a placeholder");
            }
        }
    }
}
