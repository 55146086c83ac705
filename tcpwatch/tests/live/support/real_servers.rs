//! Real servers and clients from Debian for the `real_servers` tests: nginx (master
//! and workers), redis-server, and their clients (ab, redis-benchmark,
//! curl), each started inside a network namespace the test made, with its
//! own configuration, pid and log files in a temporary directory, and
//! killed when dropped. Plus what the tests compare tcpwatch with: `ss`
//! inside the namespace, and routes that make the kernel ACK at once. The
//! namespaces are `support::netns`'s.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::netns::Netns;
use super::{have, run_ok, set_mode, Scratch, START_TIMEOUT};

/// The programs these tests run; `cargo xtask test` installs them.
pub const TOOLS: &[&str] = &[
    "nginx",
    "ab",
    "redis-server",
    "redis-benchmark",
    "redis-cli",
    "curl",
    "tcpdump",
    "ss",
];

/// Whether every program the tests run is installed (says why not, or
/// fails under CI, otherwise).
pub fn have_servers() -> bool {
    have(TOOLS)
}

/// Runs PROGRAM ARGS in namespace `ns`; its stdout, or a panic.
pub fn ns_ok(ns: &Netns, program: &str, args: &[&str]) -> String {
    run_ok(ns.command(program).args(args))
}

/// Sends `sig` to `pid` (a process this test started).
fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The children of `pid`, from /proc.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out.sort();
    out
}

/// Stops a server this test started: SIGTERM, then SIGKILL to it and to
/// `also` (its workers) if it has not exited within 5 s.
fn stop(child: &mut Child, also: &[u32]) {
    kill(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    for pid in also {
        if alive(*pid) {
            kill(*pid, libc::SIGKILL);
        }
    }
}

/// A 20,000-byte page: more than one segment on a veth (MSS 1448), so the
/// client's ACK of the server's FIN is not delayed waiting for more.
pub const PAGE: &str = "/page.html";
pub const PAGE_BYTES: usize = 20_000;

/// nginx in a namespace: a master and its workers, serving [`PAGE`].
pub struct Nginx {
    child: Child,
    pub dir: Scratch,
    pub master: u32,
    workers: Vec<u32>,
}

impl Nginx {
    /// Starts nginx in `ns` listening on `listen`, with `workers` worker
    /// processes, keep-alive on or off, and an access log naming, for each
    /// request, the client's address and port and the worker that served
    /// it. Returns once every worker runs and it answers.
    pub fn start(ns: &Netns, listen: &[SocketAddr], workers: usize, keepalive: bool) -> Nginx {
        let dir = Scratch::new("nginx");
        let www = dir.join("www");
        fs::create_dir(&www).unwrap();
        set_mode(&www, 0o755);
        fs::write(
            www.join(PAGE.trim_start_matches('/')),
            "x".repeat(PAGE_BYTES),
        )
        .unwrap();
        let d = dir.path.display();
        let listens: String = listen
            .iter()
            .map(|a| format!("    listen {a};\n"))
            .collect();
        let conf = format!(
            "daemon off;\n\
             master_process on;\n\
             worker_processes {workers};\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               log_format who '$remote_addr:$remote_port $pid';\n\
               access_log {d}/access.log who;\n\
               client_body_temp_path {d}/body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               keepalive_timeout {};\n\
               server {{\n{listens}    root {d}/www;\n  }}\n\
             }}\n",
            if keepalive { 65 } else { 0 }
        );
        fs::write(dir.join("nginx.conf"), conf).unwrap();
        let conf_path = dir.join("nginx.conf");
        let error_log = dir.join("error.log");
        let child = ns
            .command("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(&error_log)
            .arg("-p")
            .arg(&dir.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx");
        let master = child.id();
        let mut nginx = Nginx {
            child,
            dir,
            master,
            workers: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            nginx.workers = children(master);
            if nginx.workers.len() == workers && nginx.answers(ns, listen[0]) {
                return nginx;
            }
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!(
                    "nginx exited ({status}): {}",
                    fs::read_to_string(&error_log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn answers(&self, ns: &Netns, addr: SocketAddr) -> bool {
        ns.command("curl")
            .args(["-sf", "-o", "/dev/null", &format!("http://{addr}{PAGE}")])
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn workers(&self) -> &[u32] {
        &self.workers
    }

    /// (client address:port, worker pid) of each request served so far.
    pub fn served(&self) -> Vec<(String, u32)> {
        fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (client, pid) = l.split_once(' ')?;
                Some((client.to_string(), pid.trim().parse().ok()?))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let workers = self.workers.clone();
        stop(&mut self.child, &workers);
    }
}

/// redis-server in a namespace, with no persistence, its files in a
/// temporary directory.
pub struct Redis {
    child: Option<Child>,
    pub dir: Scratch,
    pub pid: u32,
}

impl Redis {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Redis {
        let dir = Scratch::new("redis");
        let port = addr.port().to_string();
        let ip = addr.ip().to_string();
        let child = ns
            .command("redis-server")
            .args([
                "--bind",
                &ip,
                "--port",
                &port,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir.path)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let pid = child.id();
        let mut redis = Redis {
            child: Some(child),
            dir,
            pid,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let pong = ns
                .command("redis-cli")
                .args(["-h", &ip, "-p", &port, "ping"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG");
            if pong {
                return redis;
            }
            if let Some(Ok(Some(status))) = redis.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "redis-server exited ({status}): {}",
                    fs::read_to_string(redis.dir.join("redis.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it now (its listener closes).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, &[]);
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the kernel of `ns` ACK at once on `route` (`quickack 1`), never
/// delaying an ACK to ride on data or a FIN: a client's ACK of the
/// server's FIN then always goes out alone, and a server that closes first
/// is handed to a FIN_WAIT2 timewait socket on it (the path real clients
/// take whenever their close comes after that ACK).
pub fn quickack(ns: &Netns, route: &[&str]) {
    let mut args = vec!["route", "replace"];
    args.extend_from_slice(route);
    args.extend_from_slice(&["quickack", "1"]);
    ns.ip(&args);
}

/// `ss -Htan state STATE FILTER` in `ns`: one line per socket.
pub fn ss_lines(ns: &Netns, state: &str, filter: &str) -> Vec<String> {
    ns_ok(ns, "ss", &["-Htan", "state", state, filter])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(String::from)
        .collect()
}

/// The peer ports of the sockets `ss -Htan state STATE` lists with local
/// port `port` in `ns`.
pub fn ss_peer_ports(ns: &Netns, state: &str, port: u16) -> Vec<u16> {
    let mut ports: Vec<u16> = ss_lines(ns, state, &format!("( sport = :{port} )"))
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .last()?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        })
        .collect();
    ports.sort();
    ports
}

/// The owning pid of each established socket with local port `port` in
/// `ns`, as `ss -tnp` names it: peer port → pid.
pub fn ss_owners(ns: &Netns, port: u16) -> HashMap<u16, u32> {
    let text = ns_ok(
        ns,
        "ss",
        &[
            "-Htnp",
            "state",
            "established",
            &format!("( sport = :{port} )"),
        ],
    );
    let mut out = HashMap::new();
    for l in text.lines() {
        let fields: Vec<&str> = l.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer users:(("nginx",pid=N,fd=M))
        let peer = fields
            .get(3)
            .and_then(|p| p.rsplit_once(':'))
            .and_then(|(_, p)| p.parse::<u16>().ok());
        let pid = l
            .split_once("pid=")
            .and_then(|(_, rest)| rest.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|p| p.parse::<u32>().ok());
        if let (Some(peer), Some(pid)) = (peer, pid) {
            out.insert(peer, pid);
        }
    }
    out
}
