//! The probe's own HTTP/1.1 client: one request per connection, written
//! byte for byte as spelled, over plain TCP or TLS, and the head of the
//! answer read back (and, for the few reads that need it, a bounded body).
//!
//! General-purpose clients normalize dot segments or refuse some escapes,
//! which would hide exactly the spellings the probe is about; this one puts
//! the request target on the wire untouched. TLS only wraps the stream: the
//! exchange is the same code over any `AsyncRead + AsyncWrite`.

use std::fmt::Write as _;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::gate::MARKER_HEADER;

/// The largest answer head read; anything longer is not a Matrix answer.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The largest answer body read: an OAuth 2.0 server's metadata is a few
/// kilobytes.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// The head of an answer.
pub(super) struct AnswerHead {
    pub(super) status: u16,
    pub(super) marker: Option<String>,
    pub(super) server: Option<String>,
    pub(super) content_type: Option<String>,
}

/// How much of an answer to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Read {
    /// The head only: who answered, and how.
    Head,
    /// The head and the body (at most [`MAX_BODY_BYTES`]).
    HeadAndBody,
}

/// An answer: its head, and its body when asked for (else empty).
pub(super) struct Answer {
    pub(super) head: AnswerHead,
    pub(super) body: Vec<u8>,
}

/// How an answer's body ends.
enum Framing {
    /// After this many bytes.
    Length(usize),
    /// With a zero-size chunk.
    Chunked,
    /// When the server closes the connection (the request asked it to).
    Close,
}

/// How the bytes reach a base URL.
#[derive(Clone)]
pub(super) enum Transport {
    /// Plain TCP (`http://`).
    Plain,
    /// TLS over TCP (`https://`), verified for `server_name`, which is also
    /// the SNI sent.
    Tls {
        connector: TlsConnector,
        server_name: ServerName<'static>,
    },
}

pub(super) use crate::tls::{load_ca_file, tls_connector};

/// The host part of `host[:port]`: a name, an IPv4 address, or an IPv6
/// address with or without brackets.
pub(super) fn host_part(host_and_port: &str) -> &str {
    if let Some(bracketed) = host_and_port.strip_prefix('[') {
        return bracketed.split(']').next().unwrap_or(bracketed);
    }
    match host_and_port.rsplit_once(':') {
        // More than one `:` without brackets: a bare IPv6 address.
        Some((host, _)) if !host.contains(':') => host,
        _ => host_and_port,
    }
}

pub(super) use crate::tls::server_name;

/// The request on the wire: one request per connection, the target exactly
/// as spelled.
pub(super) fn request_bytes(method: &str, target: &str, host: &str, body: Option<&str>) -> Vec<u8> {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: matrix-gatekeeper-probe/{}\r\n\
         Accept: application/json\r\nConnection: close\r\n",
        env!("CARGO_PKG_VERSION"),
    );
    if let Some(body) = body {
        let _ = write!(
            head,
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
    } else {
        head.push_str("\r\n");
    }
    head.into_bytes()
}

/// Connects (with a TLS handshake for `https://`), sends `request`, and
/// reads the answer's head, and its body when `read` says so.
pub(super) async fn send(
    host: &str,
    port: u16,
    transport: &Transport,
    request: &[u8],
    read: Read,
) -> Result<Answer, String> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|error| error.to_string())?;
    match transport {
        Transport::Plain => exchange(tcp, request, read).await,
        Transport::Tls {
            connector,
            server_name,
        } => {
            let tls = connector
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|error| format!("TLS handshake: {error}"))?;
            exchange(tls, request, read).await
        }
    }
}

/// Sends `request` and reads the answer's head (skipping `1xx` heads), then
/// its body if `read` asks for it.
async fn exchange<S>(mut stream: S, request: &[u8], read: Read) -> Result<Answer, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    // A TLS stream holds written bytes until flushed.
    stream.flush().await.map_err(|e| format!("sending: {e}"))?;
    let mut buffer: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buffer) {
            Ok(httparse::Status::Complete(length)) => {
                let status = response.code.unwrap_or(0);
                if (100..200).contains(&status) {
                    buffer.drain(..length);
                    continue;
                }
                let header = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                };
                let head = AnswerHead {
                    status,
                    marker: header(MARKER_HEADER),
                    server: header("server"),
                    content_type: header("content-type"),
                };
                if read == Read::Head {
                    return Ok(Answer {
                        head,
                        body: Vec::new(),
                    });
                }
                let chunked = header("transfer-encoding")
                    .is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
                let framing = match header("content-length") {
                    _ if chunked => Framing::Chunked,
                    Some(length) => Framing::Length(
                        length
                            .parse()
                            .map_err(|_| format!("bad Content-Length {length:?}"))?,
                    ),
                    None => Framing::Close,
                };
                buffer.drain(..length);
                let body = read_body(&mut stream, buffer, &framing).await?;
                return Ok(Answer { head, body });
            }
            Ok(httparse::Status::Partial) => {}
            Err(error) => return Err(format!("not an HTTP answer ({error})")),
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err("answer head too large".to_owned());
        }
        if read_more(&mut stream, &mut buffer).await? == 0 {
            return Err(if buffer.is_empty() {
                "connection closed without an answer".to_owned()
            } else {
                "connection closed in the answer head".to_owned()
            });
        }
    }
}

/// Reads the rest of a body whose first bytes are `buffer`, up to
/// [`MAX_BODY_BYTES`].
async fn read_body<S>(
    stream: &mut S,
    mut buffer: Vec<u8>,
    framing: &Framing,
) -> Result<Vec<u8>, String>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(body) = complete_body(&buffer, framing)? {
            return Ok(body);
        }
        if buffer.len() > MAX_BODY_BYTES {
            return Err("answer body too large".to_owned());
        }
        if read_more(stream, &mut buffer).await? == 0 {
            return match framing {
                Framing::Close => Ok(buffer),
                _ => Err("connection closed in the answer body".to_owned()),
            };
        }
    }
}

/// Reads what the stream has next onto `buffer`: the number of bytes
/// read, `0` at its end.
async fn read_more<S>(stream: &mut S, buffer: &mut Vec<u8>) -> Result<usize, String>
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| format!("reading: {e}"))?;
    buffer.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// The body, if `buffer` holds all of it.
fn complete_body(buffer: &[u8], framing: &Framing) -> Result<Option<Vec<u8>>, String> {
    match framing {
        Framing::Length(length) => {
            Ok((buffer.len() >= *length).then(|| buffer[..*length].to_vec()))
        }
        Framing::Close => Ok(None),
        Framing::Chunked => {
            let mut body = Vec::new();
            let mut rest = buffer;
            loop {
                let (start, size) = match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete(found)) => found,
                    Ok(httparse::Status::Partial) => return Ok(None),
                    Err(_) => return Err("bad chunk in the answer body".to_owned()),
                };
                let size = usize::try_from(size)
                    .ok()
                    .filter(|size| *size <= MAX_BODY_BYTES)
                    .ok_or("answer body too large")?;
                if size == 0 {
                    // Trailers, if any, are of no use here.
                    return Ok(Some(body));
                }
                // The chunk and the CRLF after it.
                let Some(data) = rest.get(start..start + size + 2) else {
                    return Ok(None);
                };
                body.extend_from_slice(&data[..size]);
                rest = &rest[start + size + 2..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_end_as_their_framing_says() {
        let length = Framing::Length(5);
        assert_eq!(complete_body(b"hel", &length), Ok(None));
        assert_eq!(
            complete_body(b"hello", &length),
            Ok(Some(b"hello".to_vec()))
        );
        let chunked = Framing::Chunked;
        assert_eq!(complete_body(b"3\r\nhel\r\n", &chunked), Ok(None));
        assert_eq!(
            complete_body(b"3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\n\r\n", &chunked),
            Ok(Some(b"hello".to_vec()))
        );
        assert!(complete_body(b"zz\r\n", &chunked).is_err());
        assert_eq!(complete_body(b"anything", &Framing::Close), Ok(None));
    }

    #[test]
    fn the_host_part_drops_the_port_and_brackets() {
        for (given, host) in [
            ("matrix.example.org", "matrix.example.org"),
            ("matrix.example.org:8448", "matrix.example.org"),
            ("127.0.0.1:443", "127.0.0.1"),
            ("[::1]:8448", "::1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
        ] {
            assert_eq!(host_part(given), host, "{given}");
        }
    }

    #[test]
    fn server_names_are_dns_names_or_addresses() {
        assert!(matches!(
            server_name("matrix.example.org"),
            Ok(ServerName::DnsName(name)) if name.as_ref() == "matrix.example.org"
        ));
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("not a name").is_err());
    }

    #[test]
    fn a_ca_file_needs_a_usable_certificate() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        // A file of the repository that is not PEM at all.
        let error = load_ca_file(&dir.join("Cargo.toml")).expect_err("not a certificate");
        assert!(error.contains("no CERTIFICATE"), "{error}");
        let error = load_ca_file(&dir.join("no-such-file.pem")).expect_err("missing");
        assert!(error.contains("No such file"), "{error}");
    }
}
