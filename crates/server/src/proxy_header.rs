//! The PROXY protocol (HAProxy's specification, versions 1 and 2): the
//! header a load balancer sends first on every connection it opens to a
//! node, naming the client it stands for. confab reads it only from a
//! `--trusted-proxy` and only with `--proxy-protocol`, and then requires
//! it: the specification forbids guessing whether one will come, since a
//! client could otherwise send its own.
//!
//! The header is read with exact reads, never past its end, so that what
//! follows (the HTTP request) is still in the socket for hyper.

use std::net::SocketAddr;

use ppp::{v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Whom a connection from the proxy is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A client, at this address.
    Client(SocketAddr),
    /// The proxy itself (`LOCAL`, or no address: its health checks).
    Proxy,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection does not start with a PROXY protocol header")]
    Missing,
    #[error("bad PROXY protocol header: {0}")]
    Bad(String),
}

/// A version 1 header is one line of at most this many bytes, CRLF
/// included.
const V1_MAX_BYTES: usize = 107;

/// Bytes of addresses and TLVs taken after a version 2 header's fixed 16;
/// HAProxy sends a few dozen. The format allows 64 KiB, which nobody
/// needs to make a node hold.
const V2_MAX_PAYLOAD: usize = 1024;

/// Reads the header at the start of `stream`.
pub async fn read(stream: &mut (impl AsyncRead + Unpin)) -> Result<Source, HeaderError> {
    // Both versions are longer than the 12-byte version 2 signature (the
    // shortest version 1 header, "PROXY UNKNOWN\r\n", has 15).
    let mut header = vec![0u8; v2::PROTOCOL_PREFIX.len()];
    stream.read_exact(&mut header).await?;
    if header == v2::PROTOCOL_PREFIX {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await?;
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(HeaderError::Bad(format!("{len} bytes of addresses")));
        }
        header.extend_from_slice(&fixed);
        let start = header.len();
        header.resize(start + len, 0);
        stream.read_exact(&mut header[start..]).await?;
        let parsed =
            v2::Header::try_from(&header[..]).map_err(|e| HeaderError::Bad(e.to_string()))?;
        Ok(match (parsed.command, parsed.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Source::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Source::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            // The specification: keep the connection's own addresses.
            _ => Source::Proxy,
        })
    } else if header.starts_with(v1::PROTOCOL_PREFIX.as_bytes()) {
        while !header.ends_with(b"\r\n") {
            if header.len() >= V1_MAX_BYTES {
                return Err(HeaderError::Bad("a version 1 line without its end".into()));
            }
            header.push(stream.read_u8().await?);
        }
        let parsed =
            v1::Header::try_from(&header[..]).map_err(|e| HeaderError::Bad(e.to_string()))?;
        Ok(match parsed.addresses {
            v1::Addresses::Tcp4(a) => {
                Source::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            v1::Addresses::Tcp6(a) => {
                Source::Client(SocketAddr::from((a.source_address, a.source_port)))
            }
            v1::Addresses::Unknown => Source::Proxy,
        })
    } else {
        Err(HeaderError::Missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Command, Protocol, Version};

    async fn parse(bytes: &[u8]) -> (Result<Source, HeaderError>, Vec<u8>) {
        let mut input = bytes;
        let source = read(&mut input).await;
        (source, input.to_vec())
    }

    fn v2_header(command: Command, addresses: impl Into<v2::Addresses>) -> Vec<u8> {
        Builder::with_addresses(Version::Two | command, Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn version_2_names_the_client_and_leaves_the_request() {
        let client: SocketAddr = "203.0.113.7:51000".parse().unwrap();
        let to: SocketAddr = "10.0.0.1:8080".parse().unwrap();
        let mut bytes = v2_header(Command::Proxy, (client, to));
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let (source, rest) = parse(&bytes).await;
        assert_eq!(source.unwrap(), Source::Client(client));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");

        let client: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let to: SocketAddr = "[2001:db8::2]:8080".parse().unwrap();
        let (source, _) = parse(&v2_header(Command::Proxy, (client, to))).await;
        assert_eq!(source.unwrap(), Source::Client(client));
    }

    #[tokio::test]
    async fn a_local_header_is_the_proxy_itself() {
        let (source, rest) = parse(
            &[
                v2_header(Command::Local, v2::Addresses::Unspecified),
                b"x".to_vec(),
            ]
            .concat(),
        )
        .await;
        assert_eq!(source.unwrap(), Source::Proxy);
        assert_eq!(rest, b"x");
        let (source, _) = parse(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(source.unwrap(), Source::Proxy);
    }

    #[tokio::test]
    async fn version_1_names_the_client_and_leaves_the_request() {
        let (source, rest) = parse(b"PROXY TCP4 198.51.100.2 10.0.0.1 40000 8080\r\nGET /").await;
        assert_eq!(
            source.unwrap(),
            Source::Client("198.51.100.2:40000".parse().unwrap())
        );
        assert_eq!(rest, b"GET /");
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bad in [
            &b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n",
            &[b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat(),
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\xff\xff",
            b"PROXY",
        ] {
            let (source, _) = parse(bad).await;
            assert!(source.is_err(), "{:?} taken", String::from_utf8_lossy(bad));
        }
        let (source, _) = parse(b"GET / HTTP/1.1\r\n").await;
        assert!(matches!(source, Err(HeaderError::Missing)));
    }
}
