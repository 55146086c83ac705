//! Where things are (workspace root, the eBPF object, cargo's bin directory)
//! and how to start a nested `cargo` with a clean environment.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

/// Rust target the kernel-side crate is built for.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Package holding the eBPF programs.
pub const BPF_PACKAGE: &str = "tcpwatch-ebpf";
/// Name of that package's bin target, hence of the object file.
pub const BPF_BIN: &str = "tcpwatch";
/// Userspace package and its binary.
pub const USER_PACKAGE: &str = "tcpwatch";
/// Environment variable through which tcpwatch's build.rs finds the object.
pub const BPF_OBJECT_ENV: &str = "TCPWATCH_BPF_OBJECT";

/// Variables that `cargo run` and rustup set for xtask itself. Passed on to
/// a nested cargo they pin it to xtask's toolchain (defeating `+nightly`),
/// name xtask's package, or carry flags meant for another build.
const CARGO_SET_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTDOC",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
];
const CARGO_SET_PREFIXES: &[&str] = &["CARGO_PKG_", "CARGO_CFG_", "__CARGO"];

/// Which toolchain a nested cargo should use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toolchain {
    /// The one xtask was started with (`cargo +x xtask` keeps using x).
    Current,
    /// rustup's default toolchain (stable here).
    Default,
    /// `cargo +nightly`.
    Nightly,
}

/// The tcpwatch workspace that this xtask belongs to.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    cargo_home: PathBuf,
}

impl Workspace {
    /// Finds the workspace root as the parent of xtask's own manifest
    /// directory, and cargo's home (`$CARGO_HOME`, else `~/.cargo`).
    pub fn locate() -> Result<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let cargo_home = match env::var_os("CARGO_HOME") {
            Some(home) => PathBuf::from(home),
            None => PathBuf::from(env::var_os("HOME").context("HOME is not set")?).join(".cargo"),
        };
        Ok(Workspace { root, cargo_home })
    }

    /// The workspace's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `cargo install` puts binaries (bpf-linker, the rustup proxies).
    pub fn cargo_bin_dir(&self) -> PathBuf {
        self.cargo_home.join("bin")
    }

    /// Separate target directory for the nightly BPF build, so that it and
    /// the stable builds do not fight over locks and fingerprints.
    pub fn bpf_target_dir(&self) -> PathBuf {
        self.root.join("target").join("bpf")
    }

    /// The eBPF object that `build-ebpf` produces.
    pub fn bpf_object(&self) -> PathBuf {
        self.bpf_target_dir()
            .join(BPF_TARGET)
            .join("release")
            .join(BPF_BIN)
    }

    /// `PATH` with cargo's bin directory in front, so that the rustup proxy
    /// `cargo` (which understands `+nightly`) and bpf-linker are found.
    pub fn path_env(&self) -> Result<OsString> {
        let current = env::var_os("PATH").unwrap_or_default();
        let dirs = std::iter::once(self.cargo_bin_dir()).chain(env::split_paths(&current));
        env::join_paths(dirs).context("cannot build PATH")
    }

    /// A `cargo` command run in the workspace root with the given toolchain.
    ///
    /// The variables cargo and rustup set for xtask are removed, except that
    /// [`Toolchain::Current`] keeps `RUSTUP_TOOLCHAIN` and the user's
    /// `RUSTFLAGS`/`RUSTC*` settings, which are meant for host builds.
    pub fn cargo(&self, toolchain: Toolchain) -> Result<Command> {
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&self.root).env("PATH", self.path_env()?);
        let keep_current: &[&str] = match toolchain {
            Toolchain::Current => &[
                "RUSTUP_TOOLCHAIN",
                "RUSTUP_TOOLCHAIN_SOURCE",
                "RUSTC",
                "RUSTDOC",
                "RUSTC_WRAPPER",
                "RUSTC_WORKSPACE_WRAPPER",
                "RUSTFLAGS",
                "CARGO_ENCODED_RUSTFLAGS",
            ],
            Toolchain::Default | Toolchain::Nightly => &[],
        };
        for (name, _) in env::vars_os() {
            let Some(name) = name.to_str() else { continue };
            if is_cargo_set(name) && !keep_current.contains(&name) {
                cmd.env_remove(name);
            }
        }
        if toolchain == Toolchain::Nightly {
            cmd.arg("+nightly");
        }
        Ok(cmd)
    }
}

fn is_cargo_set(name: &str) -> bool {
    CARGO_SET_VARS.contains(&name) || CARGO_SET_PREFIXES.iter().any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_holds_the_workspace_manifest() {
        let ws = Workspace::locate().unwrap();
        assert!(ws.root.join("Cargo.toml").is_file());
        assert!(ws.root.join("xtask").is_dir());
    }

    #[test]
    fn object_path() {
        let ws = Workspace::locate().unwrap();
        assert!(ws
            .bpf_object()
            .ends_with("target/bpf/bpfel-unknown-none/release/tcpwatch"));
    }

    #[test]
    fn cargo_set_variables() {
        assert!(is_cargo_set("RUSTUP_TOOLCHAIN"));
        assert!(is_cargo_set("CARGO_PKG_NAME"));
        assert!(is_cargo_set("CARGO"));
        assert!(!is_cargo_set("CARGO_HOME"));
        assert!(!is_cargo_set("CARGO_TARGET_DIR"));
        assert!(!is_cargo_set("PATH"));
    }
}
