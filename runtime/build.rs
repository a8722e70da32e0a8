//! `sqlx::migrate!` embeds `../migrations` at compile time; cargo only
//! watches files inside the package, so the script names that directory.
//!
//! Builds the shipped handlers (the seed guests and the bench guest) for
//! wasm32-wasip2 and embeds them in the `outrun` binary, so `outrun demo`,
//! `outrun bench` and `outrun handlers export` work without a checkout (see
//! `src/shipped.rs`). Also embeds the guest SDK and the WIT package, which
//! `outrun new` vendors into the projects it writes.
//!
//! The guests are built by a nested `cargo build --profile guest --target
//! wasm32-wasip2`, the command `scripts/build-guests.sh` runs, in the same
//! target directory as the outer build. Cargo locks each profile directory
//! separately (the outer build holds `debug/` or `release/`, the nested one
//! `wasm32-wasip2/guest/` and `guest/`), so the two never wait on each other,
//! and whichever of this script and build-guests.sh runs second finds the
//! guests fresh and compiles nothing: CI builds them once. After a change to
//! `handlers/` or `wit/` the nested build recompiles only what changed.
//!
//! Without the wasm32-wasip2 target, or with `OUTRUN_EMBED_GUESTS=0`, the
//! binary carries no guests (a cargo warning says so) and the commands that
//! need them say how to get them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The guests the binary carries: crate (package) names under handlers/.
const GUESTS: &[&str] = &[
    "ai-check-requeue",
    "family-sharing",
    "package-deletion",
    "bonus-accrual",
    "stoplist-publisher",
    "bench",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=OUTRUN_EMBED_GUESTS");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../migrations");

    embed_sources(&root, &out);

    let guests = match build_guests(&root, &out) {
        Ok(guests) => Ok(guests),
        Err(reason) => {
            println!("cargo:warning=outrun is built without its shipped handlers: {reason}");
            Err(reason)
        }
    };
    let mut code = String::from(
        "/// The shipped guests: (file stem, component bytes).\npub static GUESTS: &[(&str, &[u8])] = &[\n",
    );
    if let Ok(guests) = &guests {
        for (stem, path) in guests {
            code.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", path));
        }
    }
    code.push_str("];\n");
    code.push_str(&format!(
        "/// Why [`GUESTS`] is empty, if it is.\npub static MISSING: Option<&str> = {};\n",
        match &guests {
            Ok(_) => "None".to_string(),
            Err(reason) => format!("Some({reason:?})"),
        }
    ));
    std::fs::write(out.join("shipped_guests.rs"), code).unwrap();
}

/// Build the guests and copy them to OUT_DIR; (stem, path) each.
fn build_guests(root: &Path, out: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    if std::env::var("OUTRUN_EMBED_GUESTS").as_deref() == Ok("0") {
        return Err("OUTRUN_EMBED_GUESTS=0".into());
    }
    let handlers = root.join("handlers");
    if !handlers.is_dir() {
        return Err(format!(
            "{} is missing (not a checkout)",
            handlers.display()
        ));
    }
    // Cargo scans directories recursively for changes.
    for dir in ["handlers", "wit"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.lock").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("Cargo.toml").display()
    );

    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .map_err(|e| format!("cannot run {rustc}: {e}"))?;
    let libdir = String::from_utf8_lossy(&libdir.stdout).trim().to_string();
    if libdir.is_empty() || !Path::new(&libdir).is_dir() {
        return Err(
            "the wasm32-wasip2 target is not installed; run `rustup target add wasm32-wasip2` and build again".into(),
        );
    }

    let target_dir = target_root(out).unwrap_or_else(|| out.join("guest-target"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--quiet",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    for g in GUESTS {
        cmd.args(["-p", g]);
    }
    // The outer build's settings are for the host, not for the guests; a
    // clippy run's wrapper would lint them.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "building the guests failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let built = target_dir.join("wasm32-wasip2").join("guest");
    let dest = out.join("guests");
    std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
    let mut guests = Vec::new();
    for g in GUESTS {
        let stem = g.replace('-', "_");
        let from = built.join(format!("{stem}.wasm"));
        let to = dest.join(format!("{stem}.wasm"));
        std::fs::copy(&from, &to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        guests.push((stem, to));
    }
    Ok(guests)
}

/// The outer build's target directory: the nearest ancestor of OUT_DIR
/// that cargo marked with CACHEDIR.TAG.
fn target_root(out: &Path) -> Option<PathBuf> {
    out.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
}

/// The guest SDK's sources and the WIT package, for `outrun new` (vendored
/// into each new project, so it builds outside this checkout): a list of
/// (relative path, contents).
fn embed_sources(root: &Path, out: &Path) {
    let mut files = Vec::new();
    for (dir, prefix) in [("handlers/sdk/src", "sdk/src"), ("wit", "wit")] {
        let base = root.join(dir);
        println!("cargo:rerun-if-changed={}", base.display());
        collect(&base, &base, prefix, &mut files);
    }
    let sdk_manifest = root.join("handlers/sdk/Cargo.toml");
    println!("cargo:rerun-if-changed={}", sdk_manifest.display());
    if sdk_manifest.is_file() {
        files.push(("sdk/Cargo.toml.workspace".to_string(), sdk_manifest));
    }
    let workspace = root.join("Cargo.toml");
    if workspace.is_file() {
        files.push(("workspace/Cargo.toml".to_string(), workspace));
    }
    let lock = root.join("Cargo.lock");
    if lock.is_file() {
        files.push(("Cargo.lock".to_string(), lock));
    }
    files.sort();
    let mut code = String::from(
        "/// The guest SDK and WIT package: (path in the project, contents).\npub static SOURCES: &[(&str, &str)] = &[\n",
    );
    for (rel, path) in files {
        code.push_str(&format!("    ({rel:?}, include_str!({path:?})),\n"));
    }
    code.push_str("];\n");
    std::fs::write(out.join("sdk_sources.rs"), code).unwrap();
}

fn collect(base: &Path, dir: &Path, prefix: &str, files: &mut Vec<(String, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect(base, &path, prefix, files);
        } else {
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            files.push((format!("{prefix}/{rel}"), path));
        }
    }
}
