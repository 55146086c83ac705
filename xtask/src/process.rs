//! Helpers for finding and running external programs: PATH lookup, privilege
//! (root, `sudo`, or neither), and running a command with a one-line error
//! that names the command when it fails.

use std::{
    env,
    ffi::OsStr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
};

use anyhow::{bail, Context, Result};

/// Directories searched after `PATH`: a non-root `PATH` often lacks the sbin
/// directories where `ip`, `ss` and `tcpdump` live.
pub const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Finds an executable called `name` in `PATH`, then in `extra_dirs`.
pub fn find_program(name: &str, extra_dirs: &[&Path]) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(extra_dirs.iter().map(|dir| dir.to_path_buf()))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// True when running with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// How to run something that needs root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// Already root: run the program directly.
    Root,
    /// Not root, but `sudo` exists.
    Sudo,
    /// Not root and no `sudo`: the user has to do it.
    Unavailable,
}

impl Privilege {
    pub fn detect() -> Self {
        if is_root() {
            Privilege::Root
        } else if find_program("sudo", &[]).is_some() {
            Privilege::Sudo
        } else {
            Privilege::Unavailable
        }
    }

    /// A command running `program args` as root with the extra environment
    /// `envs`, or `None` when that is impossible.
    pub fn command(self, program: &str, args: &[&str], envs: &[(&str, &str)]) -> Option<Command> {
        match self {
            Privilege::Root => {
                let mut cmd = Command::new(program);
                cmd.args(args).envs(envs.iter().copied());
                Some(cmd)
            }
            Privilege::Sudo => {
                // `sudo env VAR=value prog` works whatever sudoers says about
                // passing variables through.
                let mut cmd = Command::new("sudo");
                if !envs.is_empty() {
                    cmd.arg("env")
                        .args(envs.iter().map(|(k, v)| format!("{k}={v}")));
                }
                cmd.arg(program).args(args);
                Some(cmd)
            }
            Privilege::Unavailable => None,
        }
    }
}

/// Renders a command line for messages, quoting words that need it.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes one word for a POSIX shell if it contains anything unusual.
pub fn quote(word: impl AsRef<OsStr>) -> String {
    let word = word.as_ref().to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))
}

/// Runs `cmd` with inherited stdio; fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, or `None` if it cannot be started or
/// exits unsuccessfully. Its stderr is discarded: this is for probing.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("build-std=core"), "build-std=core");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn sudo_passes_environment_through_env() {
        let cmd = Privilege::Sudo
            .command(
                "apt-get",
                &["install", "-y", "x"],
                &[("DEBIAN_FRONTEND", "noninteractive")],
            )
            .unwrap();
        assert_eq!(
            display(&cmd),
            "sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y x"
        );
        let cmd = Privilege::Sudo
            .command("mount", &["-t", "tracefs"], &[])
            .unwrap();
        assert_eq!(display(&cmd), "sudo mount -t tracefs");
        assert!(Privilege::Unavailable.command("mount", &[], &[]).is_none());
    }

    #[test]
    fn display_joins_program_and_args() {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "build", "--target dir"]);
        assert_eq!(display(&cmd), "cargo +nightly build '--target dir'");
    }
}
