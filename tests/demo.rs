//! `outrun demo` through the real binary: the full story runs and checks
//! itself (exit 0 and the key report lines), a missing or incomplete
//! handlers directory fails with one line naming the path and the fix, and
//! a wrong component in place of a shipped one makes the demo's own checks
//! fail with a non-zero exit.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn guests_dir() -> PathBuf {
    // Panics with "run scripts/build-guests.sh" when they are missing.
    common::guest("ai_check_requeue")
        .parent()
        .expect("guests dir")
        .to_path_buf()
}

fn demo(handlers: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_outrun"))
        .args(["demo", "--handlers"])
        .arg(handlers)
        .args(extra)
        .env_remove("OUTRUN_CONFIG")
        .env_remove("OUTRUN_LOG")
        .env_remove("RUST_LOG")
        // Share the compiled-artifact cache of the other tests
        // (content-addressed, written by rename): compiling in a debug
        // build takes seconds per component.
        .env(
            "OUTRUN_CACHE_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/test-artifact-cache"),
        )
        .output()
        .expect("run outrun demo")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A copy of the guests in a fresh directory, with `swap` replaced by the
/// probe component (a valid handler with other behaviour).
fn guests_copy(swap: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for m in [
        "ai_check_requeue",
        "family_sharing",
        "package_deletion",
        "bonus_accrual",
    ] {
        let from = if swap == Some(m) {
            common::guest("probe")
        } else {
            common::guest(m)
        };
        std::fs::copy(from, dir.path().join(format!("{m}.wasm"))).unwrap();
    }
    dir
}

#[test]
fn demo_runs_the_story_and_checks_itself() {
    let out = demo(&guests_dir(), &[]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed ({:?})\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        text(&out.stderr)
    );
    for needle in [
        "demo stand-in",
        // ai-check-requeue: requeued, then the check was sent and recorded.
        "requeueing application app-3",
        "finished the check of app-1",
        "POST /v1/checks -> 202",
        "app-3  trg-3  NEW",
        // family-sharing: start then stop of rsk-1; rsk-3 stays on.
        "GET /v1/family?user_id=u-1 -> 200",
        "rsk-1  393627008  Василий  false",
        "rsk-3  393627008  Василий  true",
        // package-deletion: d1, d2 deleted (d2 after a 503), t1 already gone.
        "DELETE /packages/pkg-d1 -> 204",
        "DELETE /packages/pkg-d2 -> 503",
        "DELETE /packages/pkg-t1 -> 404",
        "package-deletion:draft:u-8:packages = {pkg-o1}",
        // bonus-accrual: the schema refused a bad TaskSolved at enqueue;
        // task-1 waited for its manager, then was accrued once (delivered
        // twice); task-2 came as v1 with its rating.
        "enqueue refused by its schema: event TaskSolved.v0",
        "manager m-anna is not known; trying again",
        "retried automatically",
        "GET /v1/tasks/task-1/rating -> 200",
        "TaskSolved.v0  task-1  m-anna  acc-anna  8  80",
        "TaskSolved.v1  task-2  m-boris  acc-boris  5  50",
        // The dead letter and its reason.
        "dead letters: 1",
        "missing field `applicationId`",
        "checks passed",
    ] {
        assert!(
            stdout.contains(needle),
            "report lacks {needle:?}:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("pkg-d3 ->") && !stdout.contains("MISMATCH"),
        "the uploaded package must not be deleted and nothing may mismatch:\n{stdout}"
    );
}

#[test]
fn missing_handlers_dir_is_a_clear_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let out = demo(&missing, &[]);
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("run scripts/build-guests.sh"), "{err}");
    assert!(out.stdout.is_empty(), "nothing ran: {}", text(&out.stdout));
}

#[test]
fn incomplete_handlers_dir_names_the_missing_file() {
    let dir = guests_copy(None);
    std::fs::remove_file(dir.path().join("family_sharing.wasm")).unwrap();
    let out = demo(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("family_sharing.wasm"), "{err}");
    assert!(!err.contains("ai_check_requeue.wasm"), "{err}");
    assert!(err.contains("run scripts/build-guests.sh"), "{err}");
}

#[test]
fn wrong_component_makes_the_checks_fail() {
    // The probe loads fine as a handler, but does not share rides: the demo
    // must notice and say what differs.
    let dir = guests_copy(Some("family_sharing"));
    // Rejected events leave nothing live, but bound the wait anyway.
    let out = demo(dir.path(), &["--timeout", "10s"]);
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("MISMATCH  family_rides"), "{stdout}");
    assert!(stdout.contains("checks FAILED"), "{stdout}");
    let err = text(&out.stderr);
    assert!(
        err.contains("check(s) failed") && err.contains("family_rides"),
        "{err}"
    );
    // The other handlers' checks still pass.
    assert!(stdout.contains("ok        issuing_check rows"), "{stdout}");
    // Nothing is written beside the modules (they may be read-only): the
    // compiled artifacts go to the cache directory.
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "ai_check_requeue.wasm",
            "bonus_accrual.wasm",
            "family_sharing.wasm",
            "package_deletion.wasm"
        ]
    );
}
