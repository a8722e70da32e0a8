//! The handler author's path through the real binary: the handlers the
//! binary carries (demo, bench and `handlers export` from an empty
//! directory) and `outrun new`'s refusals.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{TestDb, fails, ok};
use serde_json::Value;

const CACHE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache");

/// `outrun ARGS` in `dir`, with no config or database from the environment.
fn outrun_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(dir)
        .args(args)
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_DATABASE_URL")
        .env_remove("OUTRUN_BENCH_MODULE")
        .env_remove("OUTRUN_LOG")
        .env_remove("RUST_LOG")
        .env("OUTRUN_CACHE_DIR", CACHE)
        .output()
        .expect("run outrun")
}

#[test]
fn demo_runs_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = outrun_in(dir.path(), &["demo"]);
    let stdout = ok(&out);
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    assert!(stdout.contains("family-sharing"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo leaves nothing behind: {left:?}");
}

#[test]
fn bench_runs_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::sqlite();
    let out = Command::new(env!("CARGO_BIN_EXE_outrun"))
        .current_dir(dir.path())
        .args(["bench", "--events", "200", "--json", "--database", db.url()])
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_BENCH_MODULE")
        .env("OUTRUN_CACHE_DIR", CACHE)
        .output()
        .unwrap();
    let r: Value = serde_json::from_str(ok(&out).trim()).unwrap();
    assert_eq!(r["events"], 200, "{r}");
}

#[test]
fn handlers_export_writes_checkable_components() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("handlers");
    let stdout = ok(&outrun_in(dir.path(), &["handlers", "export", "handlers"]));
    for stem in [
        "ai_check_requeue",
        "family_sharing",
        "package_deletion",
        "bonus_accrual",
        "stoplist_publisher",
        "bench",
    ] {
        let path = out_dir.join(format!("{stem}.wasm"));
        assert!(
            stdout.contains(&format!("wrote handlers/{stem}.wasm")),
            "{stdout}"
        );
        let check = ok(&outrun_in(
            dir.path(),
            &["handlers", "check", path.to_str().unwrap()],
        ));
        assert!(check.starts_with("ok: "), "{check}");
    }
    // The same bytes as the guests build-guests.sh writes.
    assert_eq!(
        std::fs::read(out_dir.join("family_sharing.wasm")).unwrap(),
        std::fs::read(common::guest("family_sharing")).unwrap()
    );
}

#[test]
fn new_refuses_a_non_empty_dir_and_unknown_languages() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("h");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep.txt"), "mine").unwrap();
    let err = fails(&outrun_in(dir.path(), &["new", "h", "--dir", "h"]));
    assert!(err.contains("is not empty; nothing was written"), "{err}");
    assert!(err.contains("--force"), "{err}");
    assert_eq!(std::fs::read_dir(&target).unwrap().count(), 1);

    ok(&outrun_in(
        dir.path(),
        &["new", "h", "--dir", "h", "--force"],
    ));
    assert_eq!(
        std::fs::read_to_string(target.join("keep.txt")).unwrap(),
        "mine"
    );
    assert!(target.join("src/lib.rs").is_file());

    let err = fails(&outrun_in(dir.path(), &["new", "x", "--lang", "cobol"]));
    assert!(err.contains("invalid value 'cobol'"), "{err}");
    assert!(err.contains("rust"), "{err}");
    let err = fails(&outrun_in(dir.path(), &["new", "x", "--lang", "python"]));
    assert!(err.contains("not yet"), "{err}");
    let err = fails(&outrun_in(dir.path(), &["new", "9lives"]));
    assert!(err.contains("not a usable handler name"), "{err}");
    assert!(!dir.path().join("x").exists() && !dir.path().join("9lives").exists());
}
