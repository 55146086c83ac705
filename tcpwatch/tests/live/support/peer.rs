//! The peer: the test binary re-executed (inside a network namespace via
//! `ip netns exec` if asked) under a name of the test's choosing, doing
//! socket calls on command. Every socket it makes has a known owner (pid
//! and comm), and the test decides exactly when each end binds, listens,
//! connects, writes, reads, shuts down or closes.
//!
//! Protocol: each stdin line is `SEQ cmd; cmd; ...`. The commands run back
//! to back (so "eof; close" closes microseconds after EOF); each value is
//! printed as `ACT SEQ = VALUE`, a failure as `ACT SEQ error ...` (the rest
//! of the line is skipped), and `ACT SEQ done` ends the line. Lines queue:
//! a test may send a line (an accept loop, say) and go on while it runs.

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::time::Duration;

use super::netns::Netns;
use super::proc::Proc;
use super::sockets;

/// Environment variable naming the peer; its value becomes the comm.
pub const PEER_ENV: &str = "TCPWATCH_PEER";

/// Longest any single command line may take (a timed-out connect takes ~3 s).
pub const ACT_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The peer program (runs in the re-executed test binary)

/// Runs the peer's command loop and exits if this process is a peer;
/// returns otherwise.
pub fn peer_main() {
    let Ok(comm) = std::env::var(PEER_ENV) else {
        return;
    };
    let comm = name_threads(&comm);
    println!("ACT ready {} {comm}", std::process::id());
    let mut state = PeerState::default();
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

/// libtest runs the peer on a thread named after the test; socket calls
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

/// The sockets a peer holds.
#[derive(Default)]
pub struct PeerState {
    listener: Option<TcpListener>,
    conn: Option<TcpStream>,
    /// Bound but not listening: connections to them are refused.
    bound: Vec<OwnedFd>,
    /// Connections kept open by `hold`.
    held: Vec<TcpStream>,
    syncnt: Option<i32>,
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl PeerState {
    fn conn(&mut self) -> io::Result<&mut TcpStream> {
        self.conn
            .as_mut()
            .ok_or_else(|| bad("no connection".into()))
    }

    /// Runs one command; `Ok(Some(v))` when it has a value to report.
    pub fn exec(&mut self, cmd: &str) -> io::Result<Option<String>> {
        let (verb, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let args: Vec<&str> = rest.split_whitespace().collect();
        let addr = |i: usize| -> io::Result<SocketAddr> {
            let a = args.get(i).copied().unwrap_or("");
            a.parse()
                .map_err(|_| bad(format!("'{a}' is not an address")))
        };
        let num = |i: usize| -> io::Result<u64> {
            let a = args.get(i).copied().unwrap_or("");
            a.parse().map_err(|_| bad(format!("'{a}' is not a number")))
        };
        match verb {
            // bind + listen (SO_REUSEADDR, backlog 1024 or the second
            // argument); value: the port.
            "listen" => {
                let backlog = if args.len() > 1 { num(1)? as i32 } else { 1024 };
                let l = sockets::listen(addr(0)?, backlog)?;
                let port = l.local_addr()?.port();
                self.listener = Some(l);
                Ok(Some(port.to_string()))
            }
            // bind without listen (no state transition); value: the port.
            "bind" => {
                let a = addr(0)?;
                let fd = sockets::socket(a, 0)?;
                sockets::bind(&fd, a)?;
                let port = sockets::local_port(&fd)?;
                self.bound.push(fd);
                Ok(Some(port.to_string()))
            }
            // listen() on the socket bound last (CLOSE→LISTEN).
            "listen_bound" => {
                let fd = self
                    .bound
                    .pop()
                    .ok_or_else(|| bad("nothing bound".into()))?;
                self.listener = Some(sockets::listen_on(fd, 1024)?);
                Ok(None)
            }
            "close_listener" => {
                self.listener = None;
                Ok(None)
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
            // Keeps the connection open (until `release`); value: how many
            // are held.
            "hold" => {
                let c = self
                    .conn
                    .take()
                    .ok_or_else(|| bad("no connection".into()))?;
                self.held.push(c);
                Ok(Some(self.held.len().to_string()))
            }
            "release" => {
                self.held.clear();
                Ok(None)
            }
            // TCP_SYNCNT for the next connect.
            "syncnt" => {
                self.syncnt = Some(num(0)? as i32);
                Ok(None)
            }
            // value: the local port.
            "connect" => {
                let s = connect(addr(0)?, self.syncnt.take()).map_err(|(e, _)| e)?;
                let port = s.local_addr()?.port();
                self.conn = Some(s);
                Ok(Some(port.to_string()))
            }
            // From a given source address and port; value: the local port.
            "connect_from" => {
                let s = sockets::connect_from(addr(0)?, addr(1)?, false)?;
                let port = s.local_addr()?.port();
                self.conn = Some(s);
                Ok(Some(port.to_string()))
            }
            // A connect that must fail; value: "ERRNO LOCALPORT".
            "connect_fail" => match connect(addr(0)?, self.syncnt.take()) {
                Ok(s) => Err(bad(format!("connected from {:?}", s.local_addr()))),
                Err((e, port)) => Ok(Some(format!("{} {port}", e.raw_os_error().unwrap_or(0)))),
            },
            // A nonblocking connect given up after MS milliseconds (the
            // application's own connect timeout): the socket is closed in
            // SYN_SENT. value: the local port.
            "connect_give_up" => {
                let to = addr(0)?;
                let fd = sockets::socket(to, libc::SOCK_NONBLOCK)?;
                sockets::bind(&fd, sockets::any_of(to))?;
                let port = sockets::local_port(&fd)?;
                if sockets::connect_fd(&fd, to)? {
                    return Err(bad(format!("connected to {to} at once")));
                }
                std::thread::sleep(Duration::from_millis(num(1)?));
                drop(fd);
                Ok(Some(port.to_string()))
            }
            // connect() with the port chosen at connect time (no bind to a
            // port first), held open when it succeeds; value: "0 LOCALPORT"
            // or "ERRNO 0".
            "connect_port_at_connect" => {
                let to = addr(0)?;
                match sockets::connect_from(sockets::any_of(to), to, true) {
                    Ok(s) => {
                        let port = s.local_addr()?.port();
                        self.held.push(s);
                        Ok(Some(format!("0 {port}")))
                    }
                    Err(e) => Ok(Some(format!("{} 0", e.raw_os_error().unwrap_or(0)))),
                }
            }
            "write" => {
                let data = vec![b'x'; num(0)? as usize];
                self.conn()?.write_all(&data)?;
                Ok(None)
            }
            // Writes the rest of the command, with \r and \n written as
            // such (a request to a real server); value: the bytes written.
            "send" => {
                let text = rest.trim().replace("\\r", "\r").replace("\\n", "\n");
                self.conn()?.write_all(text.as_bytes())?;
                Ok(Some(text.len().to_string()))
            }
            // Reads one HTTP response (headers, then Content-Length bytes);
            // value: its length.
            "read_http" => {
                let conn = self.conn()?;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    conn.read_exact(&mut byte)?;
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let body: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|n| n.trim().parse().ok())
                    .ok_or_else(|| bad(format!("no Content-Length in {text:?}")))?;
                let mut data = vec![0u8; body];
                conn.read_exact(&mut data)?;
                Ok(Some((head.len() + body).to_string()))
            }
            "read" => {
                let mut data = vec![0u8; num(0)? as usize];
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
                sockets::linger_zero(self.conn()?)?;
                Ok(None)
            }
            "close" => {
                self.conn = None;
                Ok(None)
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(num(0)?));
                Ok(None)
            }
            _ => Err(bad(format!("unknown command '{verb}'"))),
        }
    }
}

/// connect(2), optionally with TCP_SYNCNT. The socket is bound to an
/// ephemeral port first so that a failed connect still has a known local
/// port (returned with the error).
fn connect(to: SocketAddr, syncnt: Option<i32>) -> Result<TcpStream, (io::Error, u16)> {
    let fd = sockets::socket(to, 0).map_err(|e| (e, 0))?;
    if let Some(n) = syncnt {
        sockets::setsockopt(&fd, libc::IPPROTO_TCP, libc::TCP_SYNCNT, &n).map_err(|e| (e, 0))?;
    }
    sockets::bind(&fd, sockets::any_of(to)).map_err(|e| (e, 0))?;
    let port = sockets::local_port(&fd).map_err(|e| (e, 0))?;
    sockets::connect_fd(&fd, to).map_err(|e| (e, port))?;
    Ok(TcpStream::from(fd))
}

// ---------------------------------------------------------------------------
// Peers, seen from the test

/// A peer process. Dropping it kills it.
pub struct Peer {
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

/// A peer's protocol line: libtest may print "test peer_entry ... " on the
/// same line before it.
fn act_text(line: &str) -> Option<&str> {
    line.find("ACT ").map(|i| &line[i..])
}

impl Peer {
    /// Starts a peer named `comm`, inside network namespace `netns` if given.
    pub fn spawn(comm: &str, netns: Option<&Netns>) -> Peer {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match netns {
            Some(ns) => ns.command(&exe),
            None => std::process::Command::new(&exe),
        };
        cmd.args(["--exact", "peer_entry", "--nocapture", "--test-threads=1"])
            .env(PEER_ENV, comm);
        let proc = Proc::spawn(&format!("peer {comm}"), cmd, true);
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
        assert_eq!(pid, proc.pid(), "the peer is not the process we started");
        // What the kernel will report for the peer: read while it is alive.
        assert_eq!(
            super::proc_comm(pid),
            fields[3],
            "peer thread and process comm differ"
        );
        Peer {
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

    /// Closes its stdin, which ends it, and checks it exited cleanly.
    pub fn finish(self) {
        let name = self.proc.name.clone();
        let f = self.proc.finish(ACT_TIMEOUT);
        assert!(
            f.status.success(),
            "{name} failed ({})\nstdout:\n{}\nstderr:\n{}",
            f.status,
            f.stdout.join("\n"),
            f.stderr.join("\n")
        );
    }
}

/// `cmds` `n` times over, as one command line.
pub fn repeat(cmds: &str, n: usize) -> String {
    vec![cmds; n].join("; ")
}

/// One established connection between two peers.
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
    server: &mut Peer,
    client: &mut Peer,
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
pub fn accept_one(server: &mut Peer, client: &mut Peer, to: SocketAddr, client_ip: IpAddr) -> Link {
    let accepted = server.send("accept");
    let cport: u16 = client.run1(&format!("connect {to}")).parse().unwrap();
    let seen: u16 = server.wait(accepted)[0].parse().unwrap();
    assert_eq!(seen, cport, "the server accepted someone else");
    Link {
        client: SocketAddr::new(client_ip, cport),
        server: to,
    }
}
