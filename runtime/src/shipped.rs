//! What the `outrun` binary carries besides the runtime: the shipped handler
//! components (the seed guests and the bench guest), built and embedded by
//! `build.rs`, so the demo and the bench run without a checkout; and the
//! guest SDK with the WIT package, which `outrun new` vendors into a project.

use std::path::{Path, PathBuf};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/shipped_guests.rs"));
    include!(concat!(env!("OUT_DIR"), "/sdk_sources.rs"));
}

/// A shipped component is missing or could not be written out.
#[derive(Debug, thiserror::Error)]
pub enum ShippedError {
    #[error(
        "this outrun binary carries no handlers ({0}); build it where the wasm32-wasip2 target is installed (`rustup target add wasm32-wasip2`, then `cargo install --path runtime` again), or pass a directory built by scripts/build-guests.sh"
    )]
    NotEmbedded(&'static str),
    #[error("this outrun binary does not carry a handler named {0:?}; it carries: {1}")]
    Unknown(String, String),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every shipped component: (file stem, e.g. `family_sharing`; bytes).
pub fn guests() -> Result<&'static [(&'static str, &'static [u8])], ShippedError> {
    match embedded::MISSING {
        Some(reason) => Err(ShippedError::NotEmbedded(reason)),
        None => Ok(embedded::GUESTS),
    }
}

/// One shipped component by file stem.
pub fn guest(stem: &str) -> Result<&'static [u8], ShippedError> {
    let all = guests()?;
    all.iter()
        .find(|(s, _)| *s == stem)
        .map(|(_, b)| *b)
        .ok_or_else(|| {
            ShippedError::Unknown(
                stem.to_string(),
                all.iter().map(|(s, _)| *s).collect::<Vec<_>>().join(", "),
            )
        })
}

/// Write every shipped component to `dir` as `<stem>.wasm` (creating the
/// directory); returns the paths written. A file is replaced through a
/// rename, so a server watching `dir` never loads half a module.
pub fn export(dir: &Path) -> Result<Vec<PathBuf>, ShippedError> {
    let all = guests()?;
    let write_err = |path: &Path, source| ShippedError::Write {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    let mut written = Vec::with_capacity(all.len());
    for (stem, bytes) in all {
        let path = dir.join(format!("{stem}.wasm"));
        let tmp = dir.join(format!(".{stem}.wasm.tmp"));
        std::fs::write(&tmp, bytes).map_err(|e| write_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| write_err(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// The guest SDK (`sdk/...`, its workspace manifest as
/// `sdk/Cargo.toml.workspace`), the WIT package (`wit/...`) and the
/// workspace's `Cargo.lock`, as (relative path, text).
pub fn sdk_sources() -> &'static [(&'static str, &'static str)] {
    embedded::SOURCES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_the_seed_and_bench_guests() {
        // Built where the wasm32-wasip2 target is installed (CI and dev).
        let all = guests().expect("the test build embeds the guests");
        for stem in [
            "ai_check_requeue",
            "family_sharing",
            "package_deletion",
            "bonus_accrual",
            "stoplist_publisher",
            "bench",
        ] {
            let bytes = guest(stem).unwrap();
            assert_eq!(&bytes[..4], b"\0asm", "{stem}");
        }
        assert_eq!(all.len(), 6);
        let e = guest("probe").unwrap_err().to_string();
        assert!(e.contains("family_sharing"), "{e}");
    }

    #[test]
    fn export_writes_every_guest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("new/sub");
        let written = export(&out).unwrap();
        assert_eq!(written.len(), guests().unwrap().len());
        for p in &written {
            assert!(std::fs::read(p).unwrap().starts_with(b"\0asm"));
        }
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn carries_the_sdk_and_wit() {
        let names: Vec<&str> = sdk_sources().iter().map(|(p, _)| *p).collect();
        for want in [
            "sdk/src/lib.rs",
            "sdk/Cargo.toml.workspace",
            "wit/handler.wit",
            "Cargo.lock",
        ] {
            assert!(names.contains(&want), "{want} in {names:?}");
        }
        assert!(names.iter().any(|n| n.starts_with("wit/deps/")));
    }
}
