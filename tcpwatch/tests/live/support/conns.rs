//! Helpers for the live `conns`, `ladder`, `record` and `replay` tests
//! (conns.rs):
//! - socket actors: the test binary re-executed (optionally inside a
//!   network namespace via `ip netns exec`), doing socket calls on command,
//!   so every socket has a known owner (pid and comm) and the test decides
//!   exactly when each end writes, reads, shuts down or closes;
//! - runners for `tcpwatch conns --format json`, `ladder` and `record`;
//! - the `conns --format json` record, with the checks every record must
//!   pass;
//! - ladder blocks, a two-namespace veth fixture that deletes itself, a
//!   tcpdump capture counting teardown segments, and recordings: an
//!   unprivileged `replay` and an independent parse of the file layout.

use std::fs;
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

pub use crate::support::ExitSummary;
use crate::support::{self as common, Finished, Proc};

/// Longest any single actor command may take (a timed-out connect takes ~3 s).
pub const ACT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest the test waits for tcpwatch to print a connection it caused.
pub const CONN_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Skipping

/// Whether the external programs a test needs are installed; says why not
/// (or fails under `common::strict`) otherwise.
pub fn have_tools(tools: &[&str]) -> bool {
    for tool in tools {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            common::skip(&format!("{tool} is not installed"));
            return false;
        }
    }
    true
}

/// 127.0.0.1, and ::1 when IPv6 loopback works here.
pub fn loopbacks() -> Vec<IpAddr> {
    let mut v = vec![IpAddr::from(Ipv4Addr::LOCALHOST)];
    if common::ipv6_loopback() {
        v.push("::1".parse().unwrap());
    } else {
        println!("IPv6 part skipped: ::1 cannot be bound here");
    }
    v
}

pub fn family(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

// ---------------------------------------------------------------------------
// The actor program (runs in the re-executed test binary)

/// Environment variable naming the actor; its value becomes the comm.
pub const ACTOR_ENV: &str = "TCPWATCH_CONNS_ACTOR";

/// Runs the actor's command loop and exits if this process is an actor;
/// returns otherwise.
///
/// Protocol: each stdin line is `SEQ cmd; cmd; ...`. The commands run back
/// to back (so "eof; close" closes microseconds after EOF); each value is
/// printed as `ACT SEQ = VALUE`, a failure as `ACT SEQ error ...` (the rest
/// of the line is skipped), and `ACT SEQ done` ends the line.
pub fn actor_main() {
    let Ok(comm) = std::env::var(ACTOR_ENV) else {
        return;
    };
    let comm = name_threads(&comm);
    println!("ACT ready {} {comm}", std::process::id());
    let mut state = ActorState::default();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let Some((seq, cmds)) = line.split_once(' ') else {
            continue;
        };
        for cmd in cmds.split(';').map(str::trim).filter(|c| !c.is_empty()) {
            match state.exec(cmd) {
                Ok(Some(v)) => println!("ACT {seq} = {v}"),
                Ok(None) => {}
                Err(e) => {
                    println!("ACT {seq} error {cmd}: {e}");
                    break;
                }
            }
        }
        println!("ACT {seq} done");
    }
    // Leave without the harness's report after our last line.
    std::process::exit(0);
}

/// libtest runs the actor on a thread named after the test; socket calls
/// made there carry that thread's comm. Give the process and this thread
/// the requested name, and return what the kernel now reports.
fn name_threads(name: &str) -> String {
    fs::write("/proc/self/comm", name).expect("rename the main thread");
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 16 bytes).
    let rc = unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr() as libc::c_ulong, 0, 0, 0) };
    assert_eq!(rc, 0, "prctl(PR_SET_NAME)");
    fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim_end()
        .to_string()
}

#[derive(Default)]
pub struct ActorState {
    listener: Option<TcpListener>,
    conn: Option<TcpStream>,
    /// Bound but never listening: connections to it are refused.
    bound: Vec<OwnedFd>,
    syncnt: Option<i32>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl ActorState {
    fn conn(&mut self) -> io::Result<&mut TcpStream> {
        self.conn
            .as_mut()
            .ok_or_else(|| bad("no connection".into()))
    }

    /// Runs one command; `Ok(Some(v))` when it has a value to report.
    pub fn exec(&mut self, cmd: &str) -> io::Result<Option<String>> {
        let (verb, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let arg = arg.trim();
        let addr = || -> io::Result<SocketAddr> {
            arg.parse()
                .map_err(|_| bad(format!("'{arg}' is not an address")))
        };
        let num = || -> io::Result<u64> {
            arg.parse()
                .map_err(|_| bad(format!("'{arg}' is not a number")))
        };
        match verb {
            // bind + listen; value: the port.
            "listen" => {
                let l = TcpListener::bind(addr()?)?;
                let port = l.local_addr()?.port();
                self.listener = Some(l);
                Ok(Some(port.to_string()))
            }
            "close_listener" => {
                self.listener = None;
                Ok(None)
            }
            // bind without listen; value: the port.
            "bind" => {
                let fd = new_socket(addr()?)?;
                let port = bind(&fd, addr()?)?;
                self.bound.push(fd);
                Ok(Some(port.to_string()))
            }
            // value: the peer's port.
            "accept" => {
                let l = self
                    .listener
                    .as_ref()
                    .ok_or_else(|| bad("not listening".into()))?;
                let (s, peer) = l.accept()?;
                self.conn = Some(s);
                Ok(Some(peer.port().to_string()))
            }
            // TCP_SYNCNT for the next connect.
            "syncnt" => {
                self.syncnt = Some(num()? as i32);
                Ok(None)
            }
            // value: the local port.
            "connect" => {
                let s = connect(addr()?, self.syncnt.take()).map_err(|(e, _)| e)?;
                let port = s.local_addr()?.port();
                self.conn = Some(s);
                Ok(Some(port.to_string()))
            }
            // A connect that must fail; value: "ERRNO LOCALPORT".
            "connect_fail" => match connect(addr()?, self.syncnt.take()) {
                Ok(s) => Err(bad(format!("connected from {:?}", s.local_addr()))),
                Err((e, port)) => Ok(Some(format!("{} {port}", e.raw_os_error().unwrap_or(0)))),
            },
            "write" => {
                let data = vec![b'x'; num()? as usize];
                self.conn()?.write_all(&data)?;
                Ok(None)
            }
            "read" => {
                let mut data = vec![0u8; num()? as usize];
                self.conn()?.read_exact(&mut data)?;
                Ok(None)
            }
            // Reads to EOF; value: the bytes read.
            "eof" => {
                let mut sink = Vec::new();
                self.conn()?.read_to_end(&mut sink)?;
                Ok(Some(sink.len().to_string()))
            }
            // A read that must fail (the peer reset); value: the errno.
            "read_reset" => {
                let mut buf = [0u8; 4096];
                loop {
                    match self.conn()?.read(&mut buf) {
                        Ok(0) => return Err(bad("EOF instead of a reset".into())),
                        Ok(_) => {}
                        Err(e) => return Ok(Some(e.raw_os_error().unwrap_or(0).to_string())),
                    }
                }
            }
            "shut_wr" => {
                self.conn()?.shutdown(Shutdown::Write)?;
                Ok(None)
            }
            // SO_LINGER {on, 0}: close() then sends a RST.
            "linger0" => {
                let fd = self.conn()?.as_raw_fd();
                let lg = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                setsockopt(fd, libc::SOL_SOCKET, libc::SO_LINGER, &lg)?;
                Ok(None)
            }
            "close" => {
                self.conn = None;
                Ok(None)
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(num()?));
                Ok(None)
            }
            _ => Err(bad(format!("unknown command '{verb}'"))),
        }
    }
}

fn setsockopt<T>(fd: i32, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: value points to a live T of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn new_socket(for_addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if for_addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn local_port(fd: &OwnedFd) -> io::Result<u16> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len describe a writable sockaddr_storage.
    let rc = unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            &mut storage as *mut _ as *mut libc::sockaddr,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The port sits at the same offset in sockaddr_in and sockaddr_in6.
    // SAFETY: getsockname filled at least the family and port.
    let sin = unsafe { &*(&storage as *const _ as *const libc::sockaddr_in) };
    Ok(u16::from_be(sin.sin_port))
}

fn bind(fd: &OwnedFd, addr: SocketAddr) -> io::Result<u16> {
    let (_, storage, len) = crate::support::sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of len bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), &storage as *const _ as *const _, len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    local_port(fd)
}

/// connect(2), optionally with TCP_SYNCNT. The socket is bound to an
/// ephemeral port first so that a failed connect still has a known local
/// port (returned with the error).
fn connect(to: SocketAddr, syncnt: Option<i32>) -> Result<TcpStream, (io::Error, u16)> {
    let fd = new_socket(to).map_err(|e| (e, 0))?;
    if let Some(n) = syncnt {
        setsockopt(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_SYNCNT, &n).map_err(|e| (e, 0))?;
    }
    let any = SocketAddr::new(
        if to.is_ipv4() {
            IpAddr::from(Ipv4Addr::UNSPECIFIED)
        } else {
            "::".parse().unwrap()
        },
        0,
    );
    let port = bind(&fd, any).map_err(|e| (e, 0))?;
    let (_, storage, len) = crate::support::sockaddr(to);
    // SAFETY: storage holds a valid sockaddr of len bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), &storage as *const _ as *const _, len) };
    if rc != 0 {
        return Err((io::Error::last_os_error(), port));
    }
    Ok(TcpStream::from(fd))
}

// ---------------------------------------------------------------------------
// Actors, seen from the test

/// An actor process. Dropping it kills it.
pub struct Actor {
    proc: Proc,
    next: u64,
    /// Its pid as it reported it (the same as the child's: `ip netns exec`
    /// execs in place).
    pub pid: u32,
    /// Its thread's comm, as tcpwatch must report it.
    pub comm: String,
}

/// A command line sent but not yet waited for.
#[must_use]
pub struct Pending(u64);

fn act_text(line: &str) -> Option<&str> {
    line.find("ACT ").map(|i| &line[i..])
}

impl Actor {
    /// Starts an actor named `comm`, inside network namespace `netns` if given.
    pub fn spawn(comm: &str, netns: Option<&str>) -> Actor {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(["--exact", "actor_entry", "--nocapture", "--test-threads=1"])
            .env(ACTOR_ENV, comm);
        let proc = Proc::spawn(&format!("actor {comm}"), cmd, true);
        let ready = proc.wait_stdout(
            |l| act_text(l).is_some_and(|t| t.starts_with("ACT ready ")),
            1,
            ACT_TIMEOUT,
        );
        let fields: Vec<String> = act_text(&ready[0])
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect();
        let pid: u32 = fields[2].parse().unwrap();
        assert_eq!(pid, proc.pid(), "the actor is not the process we started");
        Actor {
            pid,
            comm: fields[3].clone(),
            proc,
            next: 1,
        }
    }

    /// Sends a command line without waiting for it.
    pub fn send(&mut self, cmds: &str) -> Pending {
        let seq = self.next;
        self.next += 1;
        self.proc.send_line(&format!("{seq} {cmds}"));
        Pending(seq)
    }

    /// Waits for a command line to finish; its values, in order. Panics if
    /// a command failed.
    pub fn wait(&self, p: Pending) -> Vec<String> {
        let done = format!("ACT {} done", p.0);
        self.proc
            .wait_stdout(|l| act_text(l) == Some(done.as_str()), 1, ACT_TIMEOUT);
        let prefix = format!("ACT {} ", p.0);
        let lines = self.proc.wait_stdout(
            |l| act_text(l).is_some_and(|t| t.starts_with(&prefix)),
            0,
            Duration::ZERO,
        );
        let mut values = Vec::new();
        for l in &lines {
            let t = &act_text(l).unwrap()[prefix.len()..];
            if let Some(v) = t.strip_prefix("= ") {
                values.push(v.to_string());
            } else if t.starts_with("error ") {
                panic!("{}: {t}", self.proc.name);
            }
        }
        values
    }

    pub fn run(&mut self, cmds: &str) -> Vec<String> {
        let p = self.send(cmds);
        self.wait(p)
    }

    /// Runs a command line with exactly one value.
    pub fn run1(&mut self, cmds: &str) -> String {
        let v = self.run(cmds);
        assert_eq!(v.len(), 1, "{cmds}: {v:?}");
        v[0].clone()
    }
}

/// One established connection between two actors.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl Link {
    /// (local port, remote port) of the client's record.
    pub fn client_key(&self) -> (u16, u16) {
        (self.client.port(), self.server.port())
    }

    pub fn server_key(&self) -> (u16, u16) {
        (self.server.port(), self.client.port())
    }

    pub fn keys(&self) -> [(u16, u16); 2] {
        [self.client_key(), self.server_key()]
    }
}

/// The server listens on `server_ip` (a fresh port), the client connects
/// from `client_ip` (the address it will have on that route), the server
/// accepts.
pub fn connect_pair(
    server: &mut Actor,
    client: &mut Actor,
    server_ip: IpAddr,
    client_ip: IpAddr,
) -> Link {
    let port: u16 = server
        .run1(&format!("listen {}", SocketAddr::new(server_ip, 0)))
        .parse()
        .unwrap();
    let link = accept_one(server, client, SocketAddr::new(server_ip, port), client_ip);
    server.run("close_listener");
    link
}

/// One more connection to a server that is already listening at `to`.
pub fn accept_one(
    server: &mut Actor,
    client: &mut Actor,
    to: SocketAddr,
    client_ip: IpAddr,
) -> Link {
    let accepted = server.send("accept");
    let cport: u16 = client.run1(&format!("connect {to}")).parse().unwrap();
    let seen: u16 = server.wait(accepted)[0].parse().unwrap();
    assert_eq!(seen, cport, "the server accepted someone else");
    Link {
        client: SocketAddr::new(client_ip, cport),
        server: to,
    }
}

// ---------------------------------------------------------------------------
// tcpwatch runners

fn is_ready(line: &str) -> bool {
    line.starts_with("tcpwatch: tracing ") && line.ends_with("; Ctrl-C to stop")
}

/// Whether `pid` has a handler installed for SIGINT (/proc/PID/status).
fn catches_sigint(pid: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGINT - 1)) != 0)
}

/// A running tcpwatch (killed if dropped). Its stdout and stderr go to
/// files that are read incrementally, so that a busy host printing many
/// other connections costs the waits nothing.
pub struct Tw {
    child: Option<Child>,
    pub name: String,
    dir: TempDir,
    /// Complete stdout lines read so far, and the byte offset after them.
    lines: Vec<String>,
    offset: u64,
}

impl Tw {
    /// Starts `tcpwatch ARGS` without waiting for it to attach.
    pub fn spawn(args: &[&str]) -> Tw {
        let dir = TempDir::new("tw");
        let out = fs::File::create(dir.join("stdout")).unwrap();
        let err = fs::File::create(dir.join("stderr")).unwrap();
        let name = format!("tcpwatch {}", args.join(" "));
        let child = Command::new(common::tcpwatch_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Tw {
            child: Some(child),
            name,
            dir,
            lines: Vec::new(),
            offset: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn stderr(&self) -> Vec<String> {
        fs::read_to_string(self.dir.join("stderr"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }

    /// Reads the complete stdout lines printed since the last call.
    fn read_new(&mut self) {
        let mut f = fs::File::open(self.dir.join("stdout")).unwrap();
        f.seek(SeekFrom::Start(self.offset)).unwrap();
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        let Some(end) = buf.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        self.offset += end as u64 + 1;
        let text = String::from_utf8_lossy(&buf[..end]);
        self.lines.extend(text.split('\n').map(String::from));
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Waits until it says it is tracing. By then it must handle SIGINT:
    /// scripts (and these tests) stop it with SIGINT as soon as it says
    /// so, and an earlier build that announced first died of that signal.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + common::START_TIMEOUT;
        while !self.stderr().iter().any(|l| is_ready(l)) {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) before tracing:\n{}",
                    self.name,
                    self.stderr().join("\n")
                );
            }
            assert!(Instant::now() < deadline, "{} never started", self.name);
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            catches_sigint(self.pid()),
            "{} said it was tracing before it could handle SIGINT",
            self.name
        );
    }

    pub fn start(args: &[&str]) -> Tw {
        let mut tw = Tw::spawn(args);
        tw.wait_ready();
        tw
    }

    /// `tcpwatch conns --format json`, attached.
    pub fn conns() -> Tw {
        Tw::start(&["conns", "--format", "json"])
    }

    /// Waits until `n` stdout lines satisfy `pred`. On timeout, stops
    /// tcpwatch and fails with its stderr and the lines `related` picks.
    pub fn wait_lines(
        &mut self,
        pred: impl Fn(&str) -> bool,
        n: usize,
        related: impl Fn(&str) -> bool,
    ) {
        let deadline = Instant::now() + CONN_TIMEOUT;
        let mut scanned = 0;
        let mut hits = 0;
        loop {
            self.read_new();
            hits += self.lines[scanned..].iter().filter(|l| pred(l)).count();
            scanned = self.lines.len();
            if hits >= n {
                return;
            }
            let status = self.exited();
            if status.is_some() || Instant::now() > deadline {
                let why = match status {
                    Some(s) => format!("exited ({s})"),
                    None => format!("timed out after {CONN_TIMEOUT:?}"),
                };
                if let Some(c) = self.child.as_ref() {
                    // SAFETY: kill(2) on our own unreaped child.
                    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
                }
                let _ = self.child.as_mut().unwrap().wait();
                self.read_new();
                let related: Vec<&String> = self.lines.iter().filter(|l| related(l)).collect();
                panic!(
                    "{}: waiting for {n} lines, saw {hits}: {why}\nstderr:\n{}\nrelated stdout ({} lines in all):\n{}",
                    self.name,
                    self.stderr().join("\n"),
                    self.lines.len(),
                    related
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the records with these (local port, remote port) have
    /// all been printed.
    pub fn wait_conns(&mut self, keys: &[(u16, u16)]) {
        let needles: Vec<(String, String)> = keys
            .iter()
            .map(|(l, r)| (format!("\"sport\":{l},"), format!("\"dport\":{r},")))
            .collect();
        let ports: Vec<String> = keys
            .iter()
            .flat_map(|(l, r)| [l, r])
            .flat_map(|p| [format!("\"sport\":{p},"), format!("\"dport\":{p},")])
            .collect();
        self.wait_lines(
            |l| needles.iter().any(|(a, b)| l.contains(a) && l.contains(b)),
            keys.len(),
            |l| ports.iter().any(|p| l.contains(p)),
        );
    }

    /// SIGINT; checks it exited cleanly and returns what it printed.
    pub fn stop(mut self) -> Finished {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + common::STOP_TIMEOUT;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {:?}:\n{}",
                    self.name,
                    common::STOP_TIMEOUT,
                    self.stderr().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.read_new();
        let stderr = self.stderr();
        assert!(
            status.success(),
            "{} exited with {status}\nstderr:\n{}",
            self.name,
            stderr.join("\n")
        );
        assert!(
            !stderr.iter().any(|l| l.contains("panicked")),
            "{} panicked:\n{}",
            self.name,
            stderr.join("\n")
        );
        Finished {
            status,
            stdout: std::mem::take(&mut self.lines),
            stderr,
        }
    }

    /// Stops a `conns --format json` run: every line must be a complete
    /// record, and the summary must count them, with nothing lost.
    pub fn stop_conns(self) -> Vec<Conn> {
        let f = self.stop();
        let conns: Vec<Conn> = f.stdout.iter().map(|l| Conn::parse(l)).collect();
        check_summary(&f.stderr, conns.len());
        conns
    }
}

impl Drop for Tw {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Checks the exit summary of `conns`/`replay conns` (`--format json`, its
/// last line on stderr): "shown" equals the records printed and nothing was
/// undecodable. Returns the lost-event count; lost events are not a failure
/// by themselves (another busy process can fill the ring), but they are
/// announced, since they can make the timelines checked afterwards
/// incomplete.
pub fn check_summary(stderr: &[String], printed: usize) -> u64 {
    let Some(ExitSummary::Conns(s)) = ExitSummary::from_stderr(stderr) else {
        panic!("no summary on stderr:\n{}", stderr.join("\n"))
    };
    assert_eq!(s.shown, printed as u64, "shown ≠ records printed: {s:?}");
    assert_eq!(s.stream.undecodable, 0, "{s:?}");
    let lost = s.stream.lost.total;
    if lost > 0 {
        println!("note: {lost} events were lost (busy host), the checks below may see incomplete timelines: {s:?}");
    }
    lost
}

// ---------------------------------------------------------------------------
// conns records

/// Every field of a `conns --format json` record.
pub const CONN_FIELDS: [&str; 32] = [
    "ts",
    "start_ts",
    "skaddr",
    "pid",
    "comm",
    "cgroup",
    "owner_source",
    "family",
    "saddr",
    "sport",
    "daddr",
    "dport",
    "netns",
    "role",
    "open",
    "before_trace",
    "handshake_ms",
    "lifetime_ms",
    "close",
    "closed_by",
    "teardown_segments",
    "timewait",
    "error",
    "errno",
    "bytes_sent",
    "bytes_received",
    "srtt_us",
    "retransmits",
    "total_retrans",
    "resets_sent",
    "resets_received",
    "transitions",
];

/// One `conns --format json` record.
#[derive(Clone, Debug, PartialEq)]
pub struct Conn {
    pub line: String,
    pub v: Map<String, Value>,
}

impl Conn {
    pub fn parse(line: &str) -> Conn {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let Value::Object(v) = v else {
            panic!("not an object: {line}")
        };
        for f in CONN_FIELDS {
            assert!(v.contains_key(f), "field {f} missing: {line}");
        }
        assert_eq!(v.len(), CONN_FIELDS.len(), "unexpected fields: {line}");
        Conn {
            line: line.to_string(),
            v,
        }
    }

    pub fn get(&self, k: &str) -> &Value {
        &self.v[k]
    }

    pub fn str(&self, k: &str) -> &str {
        self.v[k]
            .as_str()
            .unwrap_or_else(|| panic!("{k} is not a string: {}", self.line))
    }

    pub fn num(&self, k: &str) -> f64 {
        self.v[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{k} is not a number: {}", self.line))
    }

    pub fn port(&self, k: &str) -> u16 {
        self.v[k].as_u64().unwrap_or(0) as u16
    }

    pub fn transitions(&self) -> Vec<(String, String)> {
        self.v["transitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["old"].as_str().unwrap().to_string(),
                    t["new"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Checks fields against exact JSON values.
    pub fn expect(&self, what: &str, checks: &[(&str, Value)]) {
        for (k, want) in checks {
            assert_eq!(
                &self.v[*k], want,
                "{what}: field {k}\nrecord: {}",
                self.line
            );
        }
    }

    pub fn expect_transitions(&self, what: &str, want: &[(&str, &str)]) {
        let got = self.transitions();
        let got: Vec<(&str, &str)> = got.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(got, want, "{what}: transitions\nrecord: {}", self.line);
    }

    /// The owner is this actor, seen in process context (or inherited from
    /// the listener that accepted it).
    pub fn expect_owner(&self, what: &str, actor: &Actor, source: &str) {
        self.expect(
            what,
            &[
                ("pid", actor.pid.into()),
                ("comm", actor.comm.as_str().into()),
                ("owner_source", source.into()),
            ],
        );
    }

    /// Checks what every finished record must get right: timestamps and
    /// durations that agree with each other and with the transitions, an
    /// errno and its name that agree, a timewait deadline `hold_s` after
    /// the close.
    pub fn check_shape(&self) {
        let line = &self.line;
        let ts = common::parse_ts(self.str("ts"));
        let start = common::parse_ts(self.str("start_ts"));
        assert!(start <= ts, "start_ts after ts: {line}");
        let life = self.num("lifetime_ms");
        assert!(
            ((ts - start) as f64 / 1e6 - life).abs() < 1e-5,
            "lifetime_ms ≠ ts − start_ts: {line}"
        );
        assert!(self.str("skaddr").starts_with("0x"), "skaddr: {line}");
        let tr = self.v["transitions"].as_array().unwrap();
        assert!(!tr.is_empty(), "no transitions: {line}");
        let mut prev = 0.0;
        for t in tr {
            let t_ts = common::parse_ts(t["ts"].as_str().unwrap());
            let t_ms = t["t_ms"].as_f64().unwrap();
            assert!(
                ((t_ts - start) as f64 / 1e6 - t_ms).abs() < 1e-5,
                "t_ms disagrees with ts: {t} in {line}"
            );
            assert!(t_ms >= prev, "transitions out of order: {line}");
            prev = t_ms;
        }
        assert_eq!(tr[0]["ts"], self.v["start_ts"], "first transition: {line}");
        // tcpwatch keeps later transitions to the microsecond (from the
        // first), the close itself to the nanosecond.
        let last = common::parse_ts(tr[tr.len() - 1]["ts"].as_str().unwrap());
        assert!(
            last <= ts && ts - last < 1000,
            "last transition is not the close: {line}"
        );
        assert_eq!(tr[tr.len() - 1]["new"], "CLOSE", "not closed: {line}");
        match (self.v["errno"].as_i64(), self.v["error"].as_str()) {
            (None, None) => {}
            (Some(n), Some(name)) => {
                let known = match n {
                    104 => Some("ECONNRESET"),
                    110 => Some("ETIMEDOUT"),
                    111 => Some("ECONNREFUSED"),
                    _ => None,
                };
                if let Some(k) = known {
                    assert_eq!(name, k, "error name of errno {n}: {line}");
                }
            }
            _ => panic!("error and errno disagree: {line}"),
        }
        if let Some(tw) = self.v["timewait"].as_object() {
            let hold = tw["hold_s"].as_f64().unwrap();
            let until = common::parse_ts(tw["until"].as_str().unwrap());
            assert_eq!(until - ts, (hold * 1e9) as i128, "timewait.until: {line}");
        }
        if let Some(h) = self.v["handshake_ms"].as_f64() {
            assert!(h > 0.0 && h < 1000.0, "handshake_ms: {line}");
        }
    }
}

/// The one record with this local and remote port.
pub fn find(conns: &[Conn], key: (u16, u16)) -> &Conn {
    let hits: Vec<&Conn> = conns
        .iter()
        .filter(|c| (c.port("sport"), c.port("dport")) == key)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "records with local port {} and remote port {}: {hits:#?}\nall records:\n{}",
        key.0,
        key.1,
        conns
            .iter()
            .map(|c| c.line.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    hits[0]
}

/// What tcpwatch reports as `bytes_sent` / `bytes_received` for `data`
/// application bytes: the kernel's `tcp_sock.bytes_acked` and
/// `bytes_received`, which count sequence space, so the client's SYN and
/// each FIN add one (a client that writes nothing reports bytes_sent 2).
/// What tcpwatch reports for `data` application bytes: exactly that (it
/// takes the SYN and FINs out of the kernel's sequence-space counters).
pub fn seq_bytes(data: u64, _syn: bool, _fin: bool) -> u64 {
    data
}

pub fn fin_timeout_s() -> f64 {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_fin_timeout")
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

pub fn timewait(state: &str, hold_s: f64) -> Value {
    serde_json::json!({ "state": state, "hold_s": hold_s })
}

/// The timewait object without its `until` (checked by `check_shape`).
pub fn timewait_of(c: &Conn) -> Value {
    match c.get("timewait") {
        Value::Object(o) => serde_json::json!({ "state": o["state"], "hold_s": o["hold_s"] }),
        other => other.clone(),
    }
}

// ---------------------------------------------------------------------------
// ladder

/// One connection drawn by `tcpwatch ladder`: its header line and the rest.
#[derive(Clone, Debug)]
pub struct LadderBlock {
    pub header: String,
    pub body: Vec<String>,
}

impl LadderBlock {
    pub fn text(&self) -> String {
        format!("{}\n{}", self.header, self.body.join("\n"))
    }
}

/// Splits ladder output into blocks (each ends with an empty line).
pub fn ladder_blocks(stdout: &[String]) -> Vec<LadderBlock> {
    let mut blocks: Vec<LadderBlock> = Vec::new();
    let mut open = false;
    for l in stdout {
        if l.is_empty() {
            open = false;
        } else if !open {
            blocks.push(LadderBlock {
                header: l.clone(),
                body: Vec::new(),
            });
            open = true;
        } else {
            blocks.last_mut().unwrap().body.push(l.clone());
        }
    }
    blocks
}

/// The header a paired ladder starts with: the client on the left.
pub fn ladder_header_prefix(link: &Link) -> String {
    format!("{} <-> {}   ", link.client, link.server)
}

// ---------------------------------------------------------------------------
// Network namespaces

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

pub const VETH_A: &str = "tw-veth-a";
pub const VETH_B: &str = "tw-veth-b";
pub const MAC_A: &str = "02:74:77:00:00:0a";
pub const MAC_B: &str = "02:74:77:00:00:0b";

/// Runs a command that must succeed; its stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two network namespaces made by the test, joined by a veth pair:
/// `a` has 10.231.N.1/24 on VETH_A, `b` has 10.231.N.2/24 on VETH_B. Both
/// are deleted when this is dropped, also when the test fails.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
    created: Vec<String>,
}

impl NetnsPair {
    pub fn create() -> NetnsPair {
        let n = NETNS_SEQ.fetch_add(2, Ordering::SeqCst);
        let pid = std::process::id();
        let subnet = (n / 2 % 200 + 1) as u8;
        let mut me = NetnsPair {
            a: format!("tcpwatch-test-{pid}-{n}"),
            b: format!("tcpwatch-test-{pid}-{}", n + 1),
            addr_a: Ipv4Addr::new(10, 231, subnet, 1),
            addr_b: Ipv4Addr::new(10, 231, subnet, 2),
            created: Vec::new(),
        };
        for ns in [me.a.clone(), me.b.clone()] {
            run_ok("ip", &["netns", "add", &ns]);
            me.created.push(ns);
        }
        // Both ends are created inside their namespaces: nothing appears in
        // the host's.
        run_ok(
            "ip",
            &[
                "link", "add", VETH_A, "address", MAC_A, "netns", &me.a, "type", "veth", "peer",
                "name", VETH_B, "address", MAC_B, "netns", &me.b,
            ],
        );
        for (ns, dev, addr) in [(&me.a, VETH_A, me.addr_a), (&me.b, VETH_B, me.addr_b)] {
            run_ok(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            );
            run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run_ok("ip", &["-n", ns, "link", "set", dev, "up"]);
        }
        me
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run_ok("ip", &all)
    }

    /// Writes a sysctl of namespace `ns`.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        run_ok(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sh",
                "-c",
                &format!("echo {value} > {path}"),
            ],
        );
    }

    /// The namespace's inode: what tcpwatch prints as `netns`.
    pub fn inode(ns: &str) -> u32 {
        fs::metadata(format!("/var/run/netns/{ns}"))
            .unwrap_or_else(|e| panic!("netns {ns}: {e}"))
            .ino() as u32
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            let ok = Command::new("ip")
                .args(["netns", "del", &ns])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("warning: could not delete network namespace {ns}");
            }
        }
    }
}

// ---------------------------------------------------------------------------
// tcpdump

/// One captured TCP segment.
#[derive(Clone, Debug)]
pub struct Segment {
    pub sport: u16,
    pub dport: u16,
    /// tcpdump's flags: "S", "S.", ".", "P.", "F.", "R." ...
    pub flags: String,
    pub len: u32,
    pub line: String,
}

/// `tcpdump -l` on an interface, parsed on stop.
pub struct Capture {
    proc: Proc,
}

fn port_of(endpoint: &str) -> Option<u16> {
    endpoint
        .trim_end_matches(':')
        .rsplit('.')
        .next()?
        .parse()
        .ok()
}

impl Capture {
    /// Starts tcpdump and returns once it is capturing.
    pub fn start(iface: &str, filter: &str) -> Capture {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-i", iface, "-nn", "-l", "--immediate-mode", filter]);
        let proc = Proc::spawn("tcpdump", cmd, false);
        proc.wait_stderr(|l| l.contains("listening on"), 1, common::START_TIMEOUT);
        Capture { proc }
    }

    /// Waits until nothing new was printed for a moment, stops tcpdump and
    /// returns the segments.
    pub fn stop(self) -> Vec<Segment> {
        let count = || self.proc.wait_stdout(|_| true, 0, Duration::ZERO).len();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = count();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = count();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        self.proc.signal(libc::SIGINT);
        let f = self.proc.finish(common::STOP_TIMEOUT);
        assert!(f.status.success(), "tcpdump: {}", f.stderr.join("\n"));
        f.stdout
            .iter()
            .filter_map(|l| {
                let t: Vec<&str> = l.split_whitespace().collect();
                if t.len() < 7 || !t[1].starts_with("IP") || t[5] != "Flags" {
                    return None;
                }
                let len = l.rsplit_once("length ")?.1;
                let len: String = len.chars().take_while(char::is_ascii_digit).collect();
                Some(Segment {
                    sport: port_of(t[2])?,
                    dport: port_of(t[4])?,
                    flags: t[6]
                        .trim_matches(|c| c == '[' || c == ']' || c == ',')
                        .to_string(),
                    len: len.parse().ok()?,
                    line: l.clone(),
                })
            })
            .collect()
    }
}

/// Counts the teardown segments of the connection between ports `a` and
/// `b`: from the first segment carrying a FIN, every segment carrying a FIN
/// and every pure ACK (a FIN that also acknowledges the other FIN counts
/// once). Returns the count and the segments counted.
pub fn teardown_in_capture(segs: &[Segment], a: u16, b: u16) -> (usize, Vec<String>) {
    let conn: Vec<&Segment> = segs
        .iter()
        .filter(|s| (s.sport, s.dport) == (a, b) || (s.sport, s.dport) == (b, a))
        .collect();
    let Some(first) = conn.iter().position(|s| s.flags.contains('F')) else {
        return (0, Vec::new());
    };
    let counted: Vec<String> = conn[first..]
        .iter()
        .filter(|s| s.flags.contains('F') || (s.flags == "." && s.len == 0))
        .map(|s| s.line.clone())
        .collect();
    (counted.len(), counted)
}

// ---------------------------------------------------------------------------
// Recordings

/// A scratch directory readable by every user, removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "tcpwatch-conns-test-{}-{tag}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap();
        set_mode(&path, 0o755);
        TempDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().mode() & 0o7777
}

/// What `tcpwatch replay` printed, run as an unprivileged user.
pub struct ReplayRun {
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

pub const NOBODY: &str = "65534";

/// `tcpwatch replay FILE ARGS` as uid/gid 65534 with no groups.
pub fn replay_as_nobody(file: &Path, args: &[&str]) -> ReplayRun {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        common::tcpwatch_bin(),
        "replay",
    ])
    .arg(file)
    .args(args);
    let proc = Proc::spawn("tcpwatch replay (uid 65534)", cmd, false);
    // A recording made on a busy host can hold millions of events.
    let f = proc.finish(Duration::from_secs(180));
    assert!(
        !f.stderr.iter().any(|l| l.contains("panicked")),
        "replay panicked:\n{}",
        f.stderr.join("\n")
    );
    ReplayRun {
        code: f.status.code(),
        stdout: f.stdout,
        stderr: f.stderr,
    }
}

/// Raw records of a recording: the header's snapshot length, then each
/// 144-byte record's (byte offset, sport, dport). Parsed here, not with
/// tcpwatch's reader, so the offsets it reports are checked independently.
pub struct RawRecording {
    pub snapshot_len: usize,
    pub records: Vec<(usize, u16, u16)>,
}

pub const HEADER_LEN: usize = 40;
pub const EVENT_SIZE: usize = 144;

impl RawRecording {
    pub fn read(path: &Path) -> RawRecording {
        let bytes = fs::read(path).unwrap();
        assert!(bytes.len() >= HEADER_LEN, "recording too short");
        assert_eq!(&bytes[0..8], b"TCPWATCH", "magic");
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(12) as usize, EVENT_SIZE, "event size in the header");
        let snapshot_len = u32_at(28) as usize;
        let start = HEADER_LEN + snapshot_len;
        assert_eq!(
            (bytes.len() - start) % EVENT_SIZE,
            0,
            "a finished recording holds whole records"
        );
        // struct Event (tcpwatch-common): sport at 128, dport at 130.
        let records = (start..bytes.len())
            .step_by(EVENT_SIZE)
            .map(|off| {
                let u16_at = |i: usize| u16::from_le_bytes([bytes[off + i], bytes[off + i + 1]]);
                (off, u16_at(128), u16_at(130))
            })
            .collect();
        RawRecording {
            snapshot_len,
            records,
        }
    }
}
