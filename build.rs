//! Records the code version (`git describe`) that every result's provenance names.

use std::process::Command;

fn main() {
    let described = Command::new("git")
        .args(["describe", "--always", "--dirty", "--tags"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    // Outside a git checkout (a source tarball) the package version is all there is.
    // A build without its git folder (a container build) may name its version from outside.
    let given = std::env::var("BUILD_CODE_VERSION")
        .ok()
        .filter(|v| !v.is_empty());
    let code_version = match (given, described) {
        (Some(given), _) => given,
        (None, Some(d)) => format!("onkos-{version}-g{d}"),
        (None, None) => format!("onkos-{version}"),
    };
    println!("cargo:rustc-env=BUILD_CODE_VERSION={code_version}");
    // A new commit or a change to what is staged re-describes the build.
    for path in [".git/HEAD", ".git/index", ".git/refs"] {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rerun-if-env-changed=BUILD_CODE_VERSION");
    // sqlx::migrate! embeds the migrations folder: a new migration must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");
}
