//! `cargo xtask run`: starts the built tcpwatch as root and exits with its
//! exit status.

use std::{
    os::unix::process::ExitStatusExt,
    path::Path,
    process::{Command, ExitStatus},
};

use anyhow::{anyhow, Result};

use crate::process::{self, Privilege};

/// Runs `binary args` as root (through `sudo -E` when not root) and returns
/// the exit code xtask should exit with.
pub fn exec(binary: &Path, args: &[String]) -> Result<u8> {
    let mut cmd = match Privilege::detect() {
        Privilege::Root => Command::new(binary),
        Privilege::Sudo => {
            let mut cmd = Command::new("sudo");
            cmd.arg("-E").arg(binary);
            cmd
        }
        Privilege::Unavailable => {
            let mut cmd = Command::new(binary);
            cmd.args(args);
            return Err(anyhow!(
                "tcpwatch needs root to load eBPF programs, and there is no sudo; to fix, run as \
                 root: {}",
                process::display(&cmd)
            ));
        }
    };
    cmd.args(args);

    // Ctrl-C reaches tcpwatch directly (the whole foreground process group
    // gets it); xtask must outlive it to report its status, so it catches
    // SIGINT and SIGQUIT with a handler that does nothing. Caught signals are
    // reset to their defaults in the child on exec, so tcpwatch is unaffected.
    ignore_terminal_signals();
    let status = process::status(&mut cmd)?;
    Ok(exit_code(status))
}

extern "C" fn do_nothing(_signal: libc::c_int) {}

fn ignore_terminal_signals() {
    let handler = do_nothing as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: the handler is async-signal-safe (it does nothing), and
        // installing it races with no other thread touching these signals.
        unsafe { libc::signal(signal, handler as libc::sighandler_t) };
    }
}

/// The child's exit code, or 128 + the signal number if a signal killed it
/// (as a shell reports it).
fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        assert_eq!(exit_code(ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code(ExitStatus::from_raw(2 << 8)), 2);
        assert_eq!(exit_code(ExitStatus::from_raw(libc::SIGINT)), 130);
    }
}
