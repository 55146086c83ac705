//! `cargo xtask setup`: checks, and where possible installs, everything the
//! build and the tests need. Idempotent: it prints `ok: ...` for each thing
//! already present and `installing: ...` only when it changes the machine, so
//! a second run prints only `ok:` lines. Every failure is one line naming
//! what is missing and the command that fixes it.

use std::{
    fmt::Display,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, Result};

use crate::{
    process::{self, Privilege, SBIN_DIRS},
    workspace::{Toolchain, Workspace},
};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const LIBLLVM: &str = "/usr/lib/llvm-22/lib/libLLVM.so";
/// Debian packages needed to build bpf-linker against LLVM 22.
const LLVM_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// bpf-linker release verified with rustc's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "^0.13";
/// cargo-fuzz release verified with the nightly toolchain here.
const CARGO_FUZZ_VERSION: &str = "^0.13";

const TRACEFS: &str = "/sys/kernel/tracing";

/// Programs the integration tests run, with the Debian package providing each.
const TEST_TOOLS: &[(&str, &str)] = &[
    ("tcpdump", "tcpdump"),
    ("bpftrace", "bpftrace"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    // Cross-checks BTF offsets and reads the kernel's skip counters.
    ("bpftool", "bpftool"),
    // Shows an unprivileged run makes no bpf() call.
    ("strace", "strace"),
    // tests/live/deploy.rs checks deploy/prometheus; tests/live/prometheus.rs scrapes the daemon.
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    // deploy.rs checks the systemd unit and runs the daemon with its capabilities.
    ("systemd-analyze", "systemd"),
    ("setpriv", "util-linux"),
    // tests/live/top.rs drives `tcpwatch top` in a terminal of a known size.
    ("tmux", "tmux"),
    // tests/live/real_servers.rs starts real servers and clients in namespaces of
    // its own and checks tcpwatch against them.
    ("nginx", "nginx"),
    ("ab", "apache2-utils"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("redis-cli", "redis-tools"),
    // tests/live/truth.rs also runs a real curl, 150 times, against a local server.
    ("curl", "curl"),
    // deploy.rs type-checks the Grafana dashboard (npm's typescript and @grafana/schema).
    ("node", "nodejs"),
    ("npm", "npm"),
];

/// PyPI's Kubernetes manifest validator (it bundles the schemas, so it works
/// offline), in a virtualenv of its own; tcpwatch/tests/live/deploy.rs runs it.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The virtualenv holding it, relative to the workspace root.
const KUBERNETES_VALIDATE_VENV: &str = "target/test-tools/kubernetes-validate";

/// Grafana's own published dashboard types and the TypeScript compiler
/// that checks deploy/grafana against them (tcpwatch/tests/live/deploy.rs).
const GRAFANA_SCHEMA: &[&str] = &["typescript@5.9.3", "@grafana/schema@13.2.3"];
/// The npm prefix holding them, relative to the workspace root.
const GRAFANA_SCHEMA_DIR: &str = "target/test-tools/grafana-schema";

/// What to check besides the build toolchain.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// Also check the tools the integration tests use.
    pub test_tools: bool,
}

/// Runs every check in order, stopping at the first one that cannot be met.
pub fn run(ws: &Workspace, options: Options) -> Result<()> {
    let mut setup = Setup {
        ws,
        privilege: Privilege::detect(),
        apt_updated: false,
    };
    setup.nightly()?;
    setup.rust_src()?;
    setup.llvm()?;
    setup.bpf_linker()?;
    setup.tracefs()?;
    if options.test_tools {
        setup.test_tools()?;
        // `cargo xtask test` runs the fuzz targets briefly.
        setup.cargo_fuzz()?;
    }
    Ok(())
}

struct Setup<'a> {
    ws: &'a Workspace,
    privilege: Privilege,
    /// `apt-get update` runs at most once per xtask run.
    apt_updated: bool,
}

fn ok(what: impl Display) {
    eprintln!("ok: {what}");
}

fn installing(what: impl Display) {
    eprintln!("installing: {what}");
}

/// The one-line error for something missing that xtask could not provide.
fn missing(what: impl Display, fix: impl Display) -> anyhow::Error {
    anyhow!("missing {what}; to fix, run: {fix}")
}

/// Like [`missing`], for a fix that needs root when xtask has no way to it.
fn missing_root(what: impl Display, fix: impl Display) -> anyhow::Error {
    anyhow!("missing {what} (xtask is not root and there is no sudo); to fix, run as root: {fix}")
}

impl Setup<'_> {
    fn rustup(&self) -> Result<Command> {
        let mut cmd = Command::new("rustup");
        cmd.env("PATH", self.ws.path_env()?);
        Ok(cmd)
    }

    /// 1. The nightly toolchain (for `-Z build-std`); it cannot be installed
    ///    on these machines, so its absence is an error.
    fn nightly(&self) -> Result<()> {
        let list = process::probe(self.rustup()?.args(["toolchain", "list"])).ok_or_else(|| {
            missing(
                "rustup (needed to select the nightly toolchain)",
                "curl --proto '=https' -sSf https://sh.rustup.rs | sh",
            )
        })?;
        let nightly = list
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .find(|name| name.starts_with("nightly"));
        match nightly {
            Some(name) => {
                ok(format_args!("nightly toolchain ({name})"));
                Ok(())
            }
            None => Err(missing(
                "the Rust nightly toolchain (the eBPF build needs -Z build-std); xtask cannot \
                 install it on this machine",
                "rustup toolchain install nightly --component rust-src",
            )),
        }
    }

    fn rust_src_installed(&self) -> Result<bool> {
        let list = process::probe(self.rustup()?.args([
            "component",
            "list",
            "--toolchain",
            "nightly",
            "--installed",
        ]))
        .unwrap_or_default();
        Ok(list.lines().any(|line| line.trim() == "rust-src"))
    }

    /// 2. rust-src for nightly, which `-Z build-std=core` compiles.
    fn rust_src(&self) -> Result<()> {
        const WHAT: &str = "rust-src for nightly";
        const FIX: &str = "rustup component add rust-src --toolchain nightly";
        if !self.rust_src_installed()? {
            installing(format_args!("{WHAT} ({FIX})"));
            process::run(self.rustup()?.args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
            .map_err(|e| missing(WHAT, format_args!("{FIX} ({e:#})")))?;
            if !self.rust_src_installed()? {
                return Err(missing(WHAT, FIX));
            }
        }
        ok(WHAT);
        Ok(())
    }

    /// 3. LLVM 22 development files, which bpf-linker links against.
    fn llvm(&mut self) -> Result<()> {
        let what = "LLVM 22 development files";
        let absent = match missing_debian_packages(LLVM_PACKAGES) {
            Some(absent) => absent,
            // No dpkg: all we can check is the library itself.
            None if Path::new(LIBLLVM).is_file() => Vec::new(),
            None => LLVM_PACKAGES.to_vec(),
        };
        if !absent.is_empty() {
            self.apt_install(what, &absent)?;
        }
        if !Path::new(LIBLLVM).is_file() {
            return Err(missing(LIBLLVM, apt_fix(LLVM_PACKAGES)));
        }
        ok(format_args!("{what} ({})", LLVM_PACKAGES.join(" ")));
        Ok(())
    }

    /// A program `cargo install` puts in cargo's bin directory, with what
    /// its `--version` says.
    fn find_installed(&self, program: &str) -> Option<(PathBuf, String)> {
        let path = process::find_program(program, &[&self.ws.cargo_bin_dir()])?;
        let version = process::probe(Command::new(&path).arg("--version"))?;
        Some((path, version.trim().to_string()))
    }

    /// 4. bpf-linker built against LLVM 22, the LLVM of the nightly rustc.
    fn bpf_linker(&self) -> Result<()> {
        let fix = format!(
            "LLVM_SYS_221_PREFIX={LLVM_PREFIX} PATH={LLVM_PREFIX}/bin:$PATH cargo install \
             bpf-linker --version '{BPF_LINKER_VERSION}' --locked --no-default-features \
             --features llvm-22"
        );
        if self.find_installed("bpf-linker").is_none() {
            installing("bpf-linker (cargo install, takes about a minute)");
            let path = format!(
                "{LLVM_PREFIX}/bin:{}",
                self.ws.path_env()?.to_string_lossy()
            );
            let mut cmd = self.ws.cargo(Toolchain::Default)?;
            cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX)
                .env("PATH", path);
            process::run(&mut cmd)
                .map_err(|e| missing(format_args!("bpf-linker ({e:#})"), &fix))?;
        }
        let (path, version) = self
            .find_installed("bpf-linker")
            .ok_or_else(|| missing("a working bpf-linker", &fix))?;
        ok(format_args!("{version} ({})", path.display()));
        Ok(())
    }

    /// cargo-fuzz, which builds and runs the targets in fuzz/ (with nightly).
    fn cargo_fuzz(&self) -> Result<()> {
        let fix = format!("cargo install cargo-fuzz --version '{CARGO_FUZZ_VERSION}' --locked");
        let find = || self.find_installed("cargo-fuzz");
        if find().is_none() {
            installing("cargo-fuzz (cargo install, takes about a minute)");
            let mut cmd = self.ws.cargo(Toolchain::Default)?;
            cmd.args([
                "install",
                "cargo-fuzz",
                "--version",
                CARGO_FUZZ_VERSION,
                "--locked",
            ]);
            process::run(&mut cmd)
                .map_err(|e| missing(format_args!("cargo-fuzz ({e:#})"), &fix))?;
        }
        let (path, version) = find().ok_or_else(|| missing("a working cargo-fuzz", &fix))?;
        ok(format_args!("{version} ({})", path.display()));
        Ok(())
    }

    /// 5. tracefs, through which aya attaches classic tracepoints.
    fn tracefs(&self) -> Result<()> {
        let fix = format!("mount -t tracefs nodev {TRACEFS}");
        if !tracefs_mounted() {
            let args = ["-t", "tracefs", "nodev", TRACEFS];
            let mut cmd = self
                .privilege
                .command("mount", &args, &[])
                .ok_or_else(|| missing_root(format_args!("tracefs at {TRACEFS}"), &fix))?;
            eprintln!("mounting: tracefs ({})", process::display(&cmd));
            process::run(&mut cmd)
                .map_err(|e| missing(format_args!("tracefs at {TRACEFS} ({e:#})"), &fix))?;
            if !tracefs_mounted() {
                return Err(missing(
                    format_args!("tracefs events in {TRACEFS}/events"),
                    fix,
                ));
            }
        }
        ok(format_args!("tracefs mounted at {TRACEFS}"));
        Ok(())
    }

    /// 6. Programs the integration tests use.
    fn test_tools(&mut self) -> Result<()> {
        let find = find_tool;
        let mut packages: Vec<&str> = TEST_TOOLS
            .iter()
            .filter(|(tool, _)| find(tool).is_none())
            .map(|&(_, package)| package)
            .collect();
        packages.dedup();
        if !packages.is_empty() {
            self.apt_install("test tools", &packages)?;
        }
        for (tool, package) in TEST_TOOLS {
            let path = find(tool).ok_or_else(|| {
                missing(
                    format_args!("{tool} (used by the tests)"),
                    apt_fix(&[package]),
                )
            })?;
            ok(format_args!("{tool} ({})", path.display()));
        }
        self.kubernetes_validate()?;
        self.grafana_schema()
    }

    /// 8. typescript and @grafana/schema from npm, under target/.
    fn grafana_schema(&self) -> Result<()> {
        let dir = self.ws.root().join(GRAFANA_SCHEMA_DIR);
        let tsc = dir.join("node_modules/.bin/tsc");
        let schema = dir.join("node_modules/@grafana/schema/package.json");
        let want = GRAFANA_SCHEMA[1].rsplit('@').next().unwrap_or_default();
        let installed = || {
            let version = process::probe(Command::new(&tsc).arg("--version"))?;
            let package = std::fs::read_to_string(&schema).ok()?;
            package
                .contains(&format!("\"version\": \"{want}\""))
                .then_some(version)
        };
        let fix = format!(
            "npm install --prefix {} {}",
            dir.display(),
            GRAFANA_SCHEMA.join(" ")
        );
        if installed().is_none() {
            installing(format_args!(
                "{} (npm, in {})",
                GRAFANA_SCHEMA.join(" "),
                dir.display()
            ));
            let npm = process::find_program("npm", &[])
                .ok_or_else(|| missing("npm (for the Grafana dashboard check)", &fix))?;
            std::fs::create_dir_all(&dir)?;
            process::run(
                Command::new(npm)
                    .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                    .arg(&dir)
                    .args(GRAFANA_SCHEMA),
            )
            .map_err(|e| missing(format_args!("@grafana/schema ({e:#})"), &fix))?;
        }
        let version =
            installed().ok_or_else(|| missing("a working tsc and @grafana/schema", &fix))?;
        ok(format_args!(
            "{} and @grafana/schema {want} ({})",
            version.trim(),
            dir.display()
        ));
        Ok(())
    }

    /// 7. kubernetes-validate from PyPI, in a virtualenv under target/.
    fn kubernetes_validate(&self) -> Result<()> {
        let venv = self.ws.root().join(KUBERNETES_VALIDATE_VENV);
        let validator = venv.join("bin").join("kubernetes-validate");
        let version = || process::probe(Command::new(&validator).arg("--version"));
        let fix = format!(
            "python3 -m venv {v} && {v}/bin/pip install {KUBERNETES_VALIDATE} (python3 -m venv \
             needs Debian's python3-venv)",
            v = venv.display()
        );
        if version().is_none() {
            installing(format_args!(
                "{KUBERNETES_VALIDATE} (pip, in {})",
                venv.display()
            ));
            let python = process::find_program("python3", &[])
                .ok_or_else(|| missing("python3 (for kubernetes-validate)", &fix))?;
            process::run(Command::new(python).args(["-m", "venv"]).arg(&venv))
                .and_then(|()| {
                    process::run(
                        Command::new(venv.join("bin").join("pip"))
                            .args(["install", "--quiet", "--disable-pip-version-check"])
                            .arg(KUBERNETES_VALIDATE),
                    )
                })
                .map_err(|e| missing(format_args!("kubernetes-validate ({e:#})"), &fix))?;
        }
        let version = version().ok_or_else(|| missing("a working kubernetes-validate", &fix))?;
        ok(format_args!(
            "kubernetes-validate {} ({})",
            version.trim(),
            validator.display()
        ));
        Ok(())
    }

    /// Installs Debian packages, running `apt-get update` first if this run
    /// has not already done so.
    fn apt_install(&mut self, what: &str, packages: &[&str]) -> Result<()> {
        let fix = apt_fix(packages);
        installing(format_args!(
            "{what} (apt-get install -y {})",
            packages.join(" ")
        ));
        if process::find_program("apt-get", &[]).is_none() {
            return Err(missing(
                format_args!("{what} (no apt-get here)"),
                format_args!(
                    "the distribution's equivalent of: apt-get install -y {}",
                    packages.join(" ")
                ),
            ));
        }
        let no_root = || missing_root(what, &fix);
        if !self.apt_updated {
            let mut update = self
                .privilege
                .command("apt-get", &["update"], &[])
                .ok_or_else(no_root)?;
            process::run(&mut update).map_err(|e| missing(format_args!("{what} ({e:#})"), &fix))?;
            self.apt_updated = true;
        }
        let mut args = vec!["install", "-y"];
        args.extend_from_slice(packages);
        let mut install = self
            .privilege
            .command("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])
            .ok_or_else(no_root)?;
        process::run(&mut install).map_err(|e| missing(format_args!("{what} ({e:#})"), &fix))
    }
}

/// What `cargo xtask fuzz` needs: the nightly toolchain and cargo-fuzz.
pub fn fuzz_tools(ws: &Workspace) -> Result<()> {
    let setup = Setup {
        ws,
        privilege: Privilege::detect(),
        apt_updated: false,
    };
    setup.nightly()?;
    setup.cargo_fuzz()
}

/// Finds `tool` (in `PATH`, then the sbin directories), installing Debian's
/// `package` with apt-get first if it is missing. The error says what to run.
pub fn ensure_tool(ws: &Workspace, tool: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = find_tool(tool) {
        ok(format_args!("{tool} ({})", path.display()));
        return Ok(path);
    }
    let mut setup = Setup {
        ws,
        privilege: Privilege::detect(),
        apt_updated: false,
    };
    setup.apt_install(tool, &[package])?;
    let path = find_tool(tool).ok_or_else(|| missing(tool, apt_fix(&[package])))?;
    ok(format_args!("{tool} ({})", path.display()));
    Ok(path)
}

fn find_tool(tool: &str) -> Option<PathBuf> {
    let sbin: Vec<&Path> = SBIN_DIRS.iter().map(Path::new).collect();
    process::find_program(tool, &sbin)
}

/// The shell command installing `packages` on Debian.
fn apt_fix(packages: &[&str]) -> String {
    format!(
        "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
        packages.join(" ")
    )
}

/// Which of `packages` dpkg does not list as installed, or `None` when this
/// is not a dpkg-based system.
fn missing_debian_packages<'p>(packages: &[&'p str]) -> Option<Vec<&'p str>> {
    process::find_program("dpkg-query", &[])?;
    // dpkg-query exits 1 when a package is unknown but still prints the
    // others, so read its stdout whatever the exit status.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f", "${Package} ${Status}\\n"])
        .args(packages)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let installed: Vec<&str> = listing
        .lines()
        .filter(|line| line.ends_with(" installed"))
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    Some(
        packages
            .iter()
            .copied()
            .filter(|p| !installed.contains(p))
            .collect(),
    )
}

/// tracefs counts as mounted when its `events` directory lists something,
/// or, since only root may read it, when the mount table lists it there.
fn tracefs_mounted() -> bool {
    let events_listed = Path::new(TRACEFS)
        .join("events")
        .read_dir()
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    events_listed
        || std::fs::read_to_string("/proc/self/mounts")
            .map(|mounts| lists_tracefs_at(&mounts, TRACEFS))
            .unwrap_or(false)
}

/// Whether a mount table in `/proc/self/mounts` format has tracefs at `dir`.
fn lists_tracefs_at(mounts: &str, dir: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some(dir) && fields.next() == Some("tracefs")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_fix_is_noninteractive() {
        assert_eq!(
            apt_fix(&["tcpdump", "iproute2"]),
            "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y tcpdump iproute2"
        );
    }

    #[test]
    fn unknown_debian_package_is_missing() {
        if let Some(absent) = missing_debian_packages(&["xtask-no-such-package"]) {
            assert_eq!(absent, ["xtask-no-such-package"]);
        }
    }

    #[test]
    fn tracefs_in_mount_table() {
        let mounts = "sysfs /sys sysfs rw 0 0\nnodev /sys/kernel/tracing tracefs rw,relatime 0 0\n";
        assert!(lists_tracefs_at(mounts, "/sys/kernel/tracing"));
        assert!(!lists_tracefs_at(mounts, "/sys/kernel/debug/tracing"));
        assert!(!lists_tracefs_at(
            "sysfs /sys sysfs rw 0 0\n",
            "/sys/kernel/tracing"
        ));
    }

    #[test]
    fn missing_is_one_line() {
        let e = missing("thing", "fix it");
        assert_eq!(e.to_string(), "missing thing; to fix, run: fix it");
    }
}
