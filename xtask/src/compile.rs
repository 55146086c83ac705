//! `cargo xtask build-ebpf` and `cargo xtask build`: the nightly build of the
//! kernel-side object, then the stable build of the userspace binary that
//! embeds it.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{bail, Context, Result};

use crate::{
    process,
    workspace::{Toolchain, Workspace, BPF_OBJECT_ENV, BPF_PACKAGE, BPF_TARGET, USER_PACKAGE},
};

/// rustc flags for the BPF build: debug info, and `--btf` so that bpf-linker
/// emits BTF, which the maps' definitions need. Joined by 0x1f as
/// `CARGO_ENCODED_RUSTFLAGS` requires.
const BPF_RUSTFLAGS: &[&str] = &["-C", "debuginfo=2", "-C", "link-arg=--btf"];

/// Builds the eBPF object with nightly and returns its absolute path.
pub fn build_ebpf(ws: &Workspace) -> Result<PathBuf> {
    let mut cmd = ws.cargo(Toolchain::Nightly)?;
    cmd.args([
        "build",
        "-Z",
        "build-std=core",
        "--target",
        BPF_TARGET,
        "--release",
    ])
    .args(["-p", BPF_PACKAGE, "--target-dir"])
    .arg(ws.bpf_target_dir())
    .env("CARGO_ENCODED_RUSTFLAGS", BPF_RUSTFLAGS.join("\x1f"));
    eprintln!("building eBPF object: {}", process::display(&cmd));
    process::run(&mut cmd)?;

    let object = ws.bpf_object();
    if !object.is_file() {
        bail!(
            "the eBPF build succeeded but {} does not exist",
            object.display()
        );
    }
    eprintln!("eBPF object: {}", object.display());
    Ok(object)
}

/// Builds the tcpwatch binary embedding `object` and returns its path.
pub fn build_tcpwatch(ws: &Workspace, release: bool, object: &Path) -> Result<PathBuf> {
    let mut cmd = ws.cargo(Toolchain::Current)?;
    cmd.args(["build", "-p", USER_PACKAGE])
        .arg("--message-format=json-render-diagnostics")
        .args(release.then_some("--release"))
        .env(BPF_OBJECT_ENV, object)
        .stdout(Stdio::piped());
    eprintln!(
        "building {USER_PACKAGE}: {BPF_OBJECT_ENV}={} {}",
        process::quote(object),
        process::display(&cmd)
    );
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot run `{}`", process::display(&cmd)))?;

    // Diagnostics go to stderr as usual; stdout carries one JSON message per
    // line, among them the artifact naming the binary's path.
    let stdout = child
        .stdout
        .take()
        .context("cargo's stdout was not captured")?;
    let mut binary = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read cargo's output")?;
        if let Some(path) = executable_of(&line, USER_PACKAGE) {
            binary = Some(path);
        }
    }
    let status = child.wait().context("cannot wait for cargo")?;
    if !status.success() {
        bail!("`{}` failed ({status})", process::display(&cmd));
    }
    binary.context("cargo did not report the tcpwatch binary it built")
}

/// The executable path in a cargo `compiler-artifact` message for the bin
/// target `name`, if `line` is one.
fn executable_of(line: &str, name: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" || message["target"]["name"] != name {
        return None;
    }
    let kinds = message["target"]["kind"].as_array()?;
    if !kinds.iter().any(|kind| kind == "bin") {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_in_cargo_messages() {
        let bin = r#"{"reason":"compiler-artifact","target":{"name":"tcpwatch","kind":["bin"]},"executable":"/w/target/debug/tcpwatch"}"#;
        let lib = r#"{"reason":"compiler-artifact","target":{"name":"tcpwatch","kind":["lib"]},"executable":null}"#;
        let other = r#"{"reason":"build-finished","success":true}"#;
        assert_eq!(
            executable_of(bin, "tcpwatch"),
            Some(PathBuf::from("/w/target/debug/tcpwatch"))
        );
        assert_eq!(executable_of(lib, "tcpwatch"), None);
        assert_eq!(executable_of(other, "tcpwatch"), None);
        assert_eq!(executable_of("not json", "tcpwatch"), None);
    }

    #[test]
    fn rustflags_are_encoded() {
        assert_eq!(
            BPF_RUSTFLAGS.join("\x1f"),
            "-C\x1fdebuginfo=2\x1f-C\x1flink-arg=--btf"
        );
    }
}
