//! Just enough HTTP/1.1 for etcd's JSON gateway: one POST of a JSON body
//! per connection, and its response read whole (`Content-Length`) or as a
//! stream (`Transfer-Encoding: chunked`, which a watch answers with).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Where an etcd member listens for clients: `http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    host: String,
    port: u16,
}

impl Endpoint {
    /// Reads `http://HOST:PORT` (a trailing `/` is allowed). TLS (`https`)
    /// is not spoken here.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| format!("{url:?}: only http://HOST:PORT is spoken"))?;
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{url:?}: no port"))?;
        let port = port.parse().map_err(|_| format!("{url:?}: {port:?} is no port"))?;
        if host.is_empty() || rest.contains('/') {
            return Err(format!("{url:?}: not http://HOST:PORT"));
        }
        Ok(Endpoint { host: host.trim_start_matches('[').trim_end_matches(']').to_owned(), port })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

/// A response: its status and its body, to be read.
pub struct Response {
    pub status: u16,
    pub body: Body,
}

/// POSTs `body` (JSON) to `path` at `endpoint`; every step (connecting,
/// each read and write) times out after `timeout`. A stream (a watch)
/// may then wait longer between chunks with [`Body::set_timeout`].
pub fn post(endpoint: &Endpoint, path: &str, body: &[u8], timeout: Duration) -> io::Result<Response> {
    let addr = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{endpoint}: no address")))?;
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.host,
        endpoint.port,
        body.len()
    );
    let mut writer = &stream;
    writer.write_all(head.as_bytes())?;
    writer.write_all(body)?;
    let mut reader = BufReader::new(stream);
    let status = read_status(&mut reader)?;
    let mut length = None;
    let mut chunked = false;
    loop {
        let line = read_line(&mut reader)?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else { return Err(malformed("a header without a colon")) };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<u64>().map_err(|_| malformed("a Content-Length that is no number"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
        }
    }
    let body = match (chunked, length) {
        (true, _) => Body::Chunked { reader, left: 0, done: false },
        (false, Some(n)) => Body::Length(reader.take(n)),
        // Without either, the body runs to the end of the connection.
        (false, None) => Body::Length(reader.take(u64::MAX)),
    };
    Ok(Response { status, body })
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("etcd's answer has {what}"))
}

/// The longest header line taken.
const MAX_LINE: u64 = 16 << 10;

fn read_line(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut line = String::new();
    reader.by_ref().take(MAX_LINE).read_line(&mut line)?;
    if !line.ends_with('\n') {
        return Err(malformed("a line cut short or too long"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn read_status(reader: &mut BufReader<TcpStream>) -> io::Result<u16> {
    let line = read_line(reader)?;
    let mut words = line.split_whitespace();
    match (words.next(), words.next().and_then(|code| code.parse().ok())) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => Ok(code),
        _ => Err(malformed("no status line")),
    }
}

/// A response's body.
pub enum Body {
    Length(io::Take<BufReader<TcpStream>>),
    Chunked { reader: BufReader<TcpStream>, left: u64, done: bool },
}

impl Body {
    /// How long a read may wait (a watch waits for events).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        let stream = match self {
            Body::Length(take) => take.get_ref().get_ref(),
            Body::Chunked { reader, .. } => reader.get_ref(),
        };
        stream.set_read_timeout(timeout)
    }

    /// The whole body, at most `limit` bytes.
    pub fn read_all(mut self, limit: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        (&mut self).take(limit + 1).read_to_end(&mut out)?;
        if out.len() as u64 > limit {
            return Err(malformed(&format!("a body over {limit} bytes")));
        }
        Ok(out)
    }
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Body::Length(take) => take.read(buf),
            Body::Chunked { reader, left, done } => {
                if *done {
                    return Ok(0);
                }
                if *left == 0 {
                    let size = read_line(reader)?;
                    let size = size.split(';').next().unwrap_or("").trim();
                    *left = u64::from_str_radix(size, 16).map_err(|_| malformed("a chunk size that is no number"))?;
                    if *left == 0 {
                        *done = true;
                        return Ok(0);
                    }
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "etcd's answer ended inside a chunk"));
                }
                *left -= n as u64;
                if *left == 0 {
                    // The CRLF after each chunk's bytes.
                    if !read_line(reader)?.is_empty() {
                        return Err(malformed("a chunk longer than it said"));
                    }
                }
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_http_host_and_port() {
        let e = Endpoint::parse("http://127.0.0.1:2379/").unwrap();
        assert_eq!(e.to_string(), "http://127.0.0.1:2379");
        assert_eq!(Endpoint::parse("http://[::1]:2379").unwrap().host, "::1");
        for bad in ["https://a:1", "127.0.0.1:2379", "http://a", "http://a:x", "http://:1", "http://a:1/v3"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
}
