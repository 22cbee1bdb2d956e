//! Names the commit the binary is built from, for `--version` and the start-up log line:
//! `OUTBOX_CDC_BUILD_COMMIT` when set (a Docker build without `.git` passes it as a build
//! argument), else `git rev-parse --short HEAD`, else `unknown` (a crate tarball, a Docker
//! context without `.git`, no git installed).

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=OUTBOX_CDC_BUILD_COMMIT");
    let commit = std::env::var("OUTBOX_CDC_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=OUTBOX_CDC_COMMIT={}", commit.trim());
}

/// The short hash of HEAD; watches HEAD and the branch it points to, so a new commit or a
/// checkout rebuilds (in a worktree `git rev-parse --git-path` finds both).
fn git_commit() -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let output = Command::new("git").args(args).output().ok()?;
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
        watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    // Only files that exist: cargo reruns a build script on every build for a missing one.
    for path in watched.into_iter().flatten() {
        if Path::new(&path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Some(commit)
}
