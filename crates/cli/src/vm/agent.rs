//! The guest agent: how `vsocket run --guest VM` runs a program inside a
//! VM guest and gets its output and exit status back.
//!
//! A lab VM runs `vsocket agent` (the host's binary, over the 9p root)
//! instead of a one-shot script. It listens on vsock [`AGENT_PORT`]; the
//! host reaches it through the VM's vsock backend (a unix stream to the
//! backend's socket, then `CONNECT <port>\n`, answered `OK <n>\n`, the
//! backend's protocol for connections from the host). On that stream the
//! host sends one [`Request`] (a length, then JSON) and the agent runs it,
//! sending back the program's output and end as frames: a kind byte, a
//! length, the bytes. The host's own input goes the other way as
//! [`Frame::Stdin`] frames, an empty one for its end. The stream ending
//! before the program (`vsocket run` killed, its host gone) kills the
//! program's process group, as a terminal's hang-up would. Every length is
//! bounded; anything malformed ends that stream only.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The vsock port the agent listens on in the VM.
pub const AGENT_PORT: u32 = 5000;

/// The host's vsock context id, the only peer the agent serves.
const HOST_CID: u32 = 2;

/// The longest request, and the longest frame.
const MAX_LEN: usize = 1 << 20;

/// What `vsocket run` asks the agent to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub program: String,
    pub args: Vec<String>,
    /// Set in the program's environment, over the agent's own.
    pub env: Vec<(String, String)>,
}

/// What a frame from the agent carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The program ended: its exit code, or 128 + the signal that ended it.
    Exit(i32),
    /// The program could not be started: why.
    Failed(String),
    /// Input for the program, from the host; empty: the end of it.
    Stdin(Vec<u8>),
}

const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const EXIT: u8 = 3;
const FAILED: u8 = 4;
const STDIN: u8 = 5;

/// Why talking to the agent failed.
#[derive(Debug)]
pub enum AgentError {
    /// The VM's agent could not be reached through {path} within {waited:?}: {last}
    Unreachable { path: String, waited: Duration, last: String },
    /// The stream to the agent failed: {0}
    Io(io::Error),
    /// The agent sent something that is not a frame: {0}
    Malformed(String),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Unreachable { path, waited, last } => {
                write!(f, "the VM's agent is not reachable through {path} (waited {waited:?}): {last}")
            }
            AgentError::Io(e) => write!(f, "the stream to the VM's agent failed: {e}"),
            AgentError::Malformed(what) => write!(f, "the VM's agent sent {what}"),
        }
    }
}

impl std::error::Error for AgentError {}

impl From<io::Error> for AgentError {
    fn from(e: io::Error) -> AgentError {
        AgentError::Io(e)
    }
}

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// Writes `request` to `to`.
pub fn write_request(to: &mut impl Write, request: &Request) -> io::Result<()> {
    let body = serde_json::to_vec(request).map_err(io::Error::other)?;
    to.write_all(&(body.len() as u32).to_le_bytes())?;
    to.write_all(&body)
}

/// Reads a request from `from`.
pub fn read_request(from: &mut impl Read) -> io::Result<Request> {
    let mut len = [0u8; 4];
    from.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_LEN {
        return Err(invalid(format!("a request of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    from.read_exact(&mut body)?;
    serde_json::from_slice(&body).map_err(|e| invalid(format!("a malformed request: {e}")))
}

/// Writes `frame` to `to`.
pub fn write_frame(to: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let code;
    let (kind, payload): (u8, &[u8]) = match frame {
        Frame::Stdout(bytes) => (STDOUT, bytes),
        Frame::Stderr(bytes) => (STDERR, bytes),
        Frame::Exit(status) => {
            code = status.to_le_bytes();
            (EXIT, &code)
        }
        Frame::Failed(why) => (FAILED, why.as_bytes()),
        Frame::Stdin(bytes) => (STDIN, bytes),
    };
    let mut head = [kind, 0, 0, 0, 0];
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    to.write_all(&head)?;
    to.write_all(payload)
}

/// Reads the next frame from `from`; `None` at the end of the stream.
pub fn read_frame(from: &mut impl Read) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match from.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_LEN {
        return Err(invalid(format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    from.read_exact(&mut payload)?;
    Ok(Some(match head[0] {
        STDOUT => Frame::Stdout(payload),
        STDERR => Frame::Stderr(payload),
        EXIT => {
            let code: [u8; 4] = payload.try_into().map_err(|_| invalid("an exit frame of another length"))?;
            Frame::Exit(i32::from_le_bytes(code))
        }
        FAILED => Frame::Failed(String::from_utf8_lossy(&payload).into_owned()),
        STDIN => Frame::Stdin(payload),
        other => return Err(invalid(format!("a frame of unknown kind {other}"))),
    }))
}

/// The agent: says where the VM's attachment is (for programs started
/// without `VSOCKET_CONTROL`), then serves run requests on vsock
/// [`AGENT_PORT`] until killed (the VM powers off with it).
pub fn serve() -> io::Result<()> {
    let attachment = vsocket_abi::stream::ATTACHMENT_FILE;
    std::fs::write(attachment, "vsock\n").map_err(|e| io::Error::new(e.kind(), format!("{attachment}: {e}")))?;
    let listener = vsocket_sys::vsock_listen(AGENT_PORT, 64)?;
    loop {
        let stream = match vsocket_sys::accept(std::os::fd::AsFd::as_fd(&listener)) {
            // Only the host runs programs here: a process in the VM that
            // reached the port would run them as the agent (root).
            Ok(fd) => match vsocket_sys::vsock_peer_cid(std::os::fd::AsFd::as_fd(&fd)) {
                Ok(HOST_CID) => File::from(fd),
                Ok(cid) => {
                    eprintln!("vsocket agent: refused a stream from context {cid}, not the host");
                    continue;
                }
                Err(e) => {
                    eprintln!("vsocket agent: a stream with no peer: {e}");
                    continue;
                }
            },
            Err(e) => {
                eprintln!("vsocket agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        std::thread::spawn(move || {
            if let Err(e) = run_one(stream) {
                eprintln!("vsocket agent: {e}");
            }
        });
    }
}

/// Runs one request from `stream` and sends its output and end back.
fn run_one(mut stream: File) -> io::Result<()> {
    let request = read_request(&mut stream)?;
    if let Some((name, _)) = request.env.iter().find(|(name, _)| name.is_empty() || name.contains(['=', '\0'])) {
        return write_frame(&mut stream, &Frame::Failed(format!("{name:?} is no environment variable's name")));
    }
    let mut command = Command::new(&request.program);
    command.args(&request.args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Its own group, which leads nothing else: the host's going kills the
    // program and whatever it started.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if std::env::var_os("PATH").is_none() {
        command.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    }
    command.envs(request.env.iter().map(|(k, v)| (k, v)));
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return write_frame(&mut stream, &Frame::Failed(format!("{}: {e}", request.program))),
    };
    let out = Arc::new(Mutex::new(stream.try_clone()?));
    let forward = |mut pipe: Box<dyn Read + Send>, wrap: fn(Vec<u8>) -> Frame| {
        let out = out.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
                if write_frame(&mut *out, &wrap(buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        })
    };
    let pipes = (child.stdout.take(), child.stderr.take());
    let readers: Vec<_> =
        [pipes.0.map(|p| forward(Box::new(p), Frame::Stdout)), pipes.1.map(|p| forward(Box::new(p), Frame::Stderr))]
            .into_iter()
            .flatten()
            .collect();
    let host_gone = Arc::new(AtomicBool::new(false));
    let (input, gone) = (stream.try_clone()?, host_gone.clone());
    let stdin = child.stdin.take();
    std::thread::spawn(move || take_input(input, stdin, &gone));
    // Polled rather than waited for, so that the program is killed while
    // it is still unreaped: its group's id cannot have been reused.
    let mut killed = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if !killed && host_gone.load(Ordering::Relaxed) {
            killed = true;
            let _ = vsocket_sys::signal_group(child.id(), libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let code = status.code().or(status.signal().map(|signal| 128 + signal)).unwrap_or(1);
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    write_frame(&mut *out, &Frame::Exit(code))
}

/// Passes the host's input frames from `stream` to the program's `stdin`
/// (closed at the empty frame); sets `gone` when the stream ends, or
/// carries anything else: the host is gone.
fn take_input(mut stream: File, mut stdin: Option<std::process::ChildStdin>, gone: &AtomicBool) {
    loop {
        match read_frame(&mut stream) {
            Ok(Some(Frame::Stdin(bytes))) if bytes.is_empty() => stdin = None,
            Ok(Some(Frame::Stdin(bytes))) => {
                // A program that closed its input, or exited, takes no
                // more: the rest is dropped, as a pipe's reader gone.
                if stdin.as_mut().is_some_and(|s| s.write_all(&bytes).is_err()) {
                    stdin = None;
                }
            }
            _ => {
                gone.store(true, Ordering::Relaxed);
                return;
            }
        }
    }
}

/// Opens a stream to the agent of the VM whose vsock backend listens on
/// `uds`, trying again while the VM boots, for at most `wait`.
pub fn connect(uds: &Path, wait: Duration) -> Result<UnixStream, AgentError> {
    let began = Instant::now();
    loop {
        let last = match try_connect(uds) {
            Ok(stream) => return Ok(stream),
            Err(e) => e.to_string(),
        };
        if began.elapsed() >= wait {
            return Err(AgentError::Unreachable { path: uds.display().to_string(), waited: wait, last });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn try_connect(uds: &Path) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(uds)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
    let mut line = String::new();
    // Read the answer byte by byte: what follows it is the agent's.
    let mut reader = io::BufReader::with_capacity(1, &stream);
    reader.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("the backend answered {line:?}")));
    }
    stream.set_read_timeout(None)?;
    Ok(stream)
}

/// Runs `request` through the agent on `stream`, passing it what comes on
/// `stdin` (from a thread of its own) and writing the program's output to
/// `stdout` and `stderr` as it comes; returns its exit code.
pub fn run(
    mut stream: UnixStream,
    request: &Request,
    stdin: impl Read + Send + 'static,
    stdout: &mut impl Write,
    stderr: &mut impl Write,
) -> Result<i32, AgentError> {
    write_request(&mut stream, request)?;
    let input = stream.try_clone()?;
    std::thread::spawn(move || give_input(stdin, input));
    loop {
        match read_frame(&mut stream).map_err(|e| AgentError::Malformed(e.to_string()))? {
            Some(Frame::Stdout(bytes)) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            Some(Frame::Stderr(bytes)) => {
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            Some(Frame::Exit(code)) => return Ok(code),
            Some(Frame::Failed(why)) => {
                writeln!(stderr, "vsocket: cannot run in the VM: {why}")?;
                return Ok(127);
            }
            None => return Err(AgentError::Malformed("the end of the stream before the program's".into())),
            Some(Frame::Stdin(_)) => return Err(AgentError::Malformed("input frames".into())),
        }
    }
}

/// Sends what `from` holds to the agent on `to` as input frames, then the
/// empty frame that ends it. The stream stays open: its end would tell the
/// agent that this side is gone.
fn give_input(mut from: impl Read, mut to: UnixStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if write_frame(&mut to, &Frame::Stdin(buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = write_frame(&mut to, &Frame::Stdin(Vec::new()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_frames_read_back_as_written() {
        let request = Request {
            program: "redis-cli".into(),
            args: vec!["-p".into(), "7600".into()],
            env: vec![("VSOCKET_CONTROL".into(), "vsock".into())],
        };
        let mut bytes = Vec::new();
        write_request(&mut bytes, &request).unwrap();
        assert_eq!(read_request(&mut bytes.as_slice()).unwrap(), request);
        let frames = [
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(vec![]),
            Frame::Exit(-3),
            Frame::Failed("no such file".into()),
            Frame::Stdin(b"in".to_vec()),
            Frame::Stdin(vec![]),
        ];
        let mut bytes = Vec::new();
        for frame in &frames {
            write_frame(&mut bytes, frame).unwrap();
        }
        let mut reader = bytes.as_slice();
        for frame in &frames {
            assert_eq!(read_frame(&mut reader).unwrap().as_ref(), Some(frame));
        }
        assert_eq!(read_frame(&mut reader).unwrap(), None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        // Too long, unknown kind, an exit of the wrong size, cut short.
        assert!(read_request(&mut &(u32::MAX.to_le_bytes())[..]).is_err());
        assert!(read_request(&mut &[2, 0, 0, 0, b'{', b'x'][..]).is_err());
        assert!(read_frame(&mut &[9, 0, 0, 0, 0][..]).is_err());
        assert!(read_frame(&mut &[EXIT, 2, 0, 0, 0, 1, 2][..]).is_err());
        assert!(read_frame(&mut &[STDOUT, 0, 0, 0x10, 0][..]).is_err());
        assert!(read_frame(&mut &[STDOUT, 5, 0, 0, 0, 1][..]).is_err());
    }
}
