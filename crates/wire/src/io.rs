//! Async read/write of tunnel frames over any tokio stream. Reads never
//! consume a byte past the frame, so the payload that follows is intact.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{DecodeError, Header, Limits, Status, PREFIX_LEN};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    #[error("stream closed before a frame")]
    Closed,
    #[error("reading frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
}

async fn read_prefix<R: AsyncRead + Unpin>(r: &mut R) -> Result<[u8; PREFIX_LEN], ReadError> {
    let mut prefix = [0u8; PREFIX_LEN];
    let mut filled = 0;
    while filled < PREFIX_LEN {
        match r.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Err(ReadError::Closed),
            0 => {
                return Err(DecodeError::Incomplete {
                    needed: PREFIX_LEN - filled,
                }
                .into())
            }
            n => filled += n,
        }
    }
    Ok(prefix)
}

/// Reads one header. The size limit is enforced from the prefix, before the
/// body is read.
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
) -> Result<Header, ReadError> {
    let prefix = read_prefix(r).await?;
    let len = Header::body_len(&prefix, limits)?;
    let mut body = vec![0u8; len];
    read_body(r, &mut body).await?;
    Ok(Header::decode_body(&body)?)
}

pub async fn read_status<R: AsyncRead + Unpin>(r: &mut R) -> Result<Status, ReadError> {
    let prefix = read_prefix(r).await?;
    let len = Status::message_len(&prefix)?;
    let mut frame = Vec::with_capacity(PREFIX_LEN + len);
    frame.extend_from_slice(&prefix);
    frame.resize(PREFIX_LEN + len, 0);
    read_body(r, &mut frame[PREFIX_LEN..]).await?;
    Ok(Status::decode(&frame)?.0)
}

async fn read_body<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), ReadError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(DecodeError::Incomplete { needed: buf.len() }.into())
        }
        Err(e) => Err(e.into()),
    }
}

pub async fn write_header<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &Header,
    limits: &Limits,
) -> std::io::Result<()> {
    let bytes = header
        .to_bytes(limits)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    w.write_all(&bytes).await?;
    w.flush().await
}

pub async fn write_status<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: &Status,
) -> std::io::Result<()> {
    w.write_all(&status.to_bytes()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ServiceName, StatusCode, Target};

    #[tokio::test]
    async fn header_then_payload_over_a_pipe() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let h = Header::new(Target::Service {
            name: ServiceName::new("echo", "demo").unwrap(),
            port: 80,
        });
        let l = Limits::default();
        let h2 = h.clone();
        let w = tokio::spawn(async move {
            write_header(&mut a, &h2, &l).await.unwrap();
            a.write_all(b"hello").await.unwrap();
            let s = read_status(&mut a).await.unwrap();
            assert_eq!(s.code, StatusCode::Denied);
        });
        assert_eq!(read_header(&mut b, &l).await.unwrap(), h);
        let mut p = [0u8; 5];
        b.read_exact(&mut p).await.unwrap();
        assert_eq!(&p, b"hello");
        write_status(&mut b, &Status::new(StatusCode::Denied, "no"))
            .await
            .unwrap();
        w.await.unwrap();
    }

    #[tokio::test]
    async fn closed_truncated_and_oversized() {
        let l = Limits::default();
        let mut empty: &[u8] = b"";
        assert!(matches!(
            read_header(&mut empty, &l).await,
            Err(ReadError::Closed)
        ));
        let mut short: &[u8] = b"FMT";
        assert!(matches!(
            read_header(&mut short, &l).await,
            Err(ReadError::Decode(DecodeError::Incomplete { .. }))
        ));
        // The prefix claims 60000 bytes; refused without waiting for them.
        let mut big: &[u8] = &[b'F', b'M', b'T', b'H', 1, 0, 0xea, 0x60];
        assert!(matches!(
            read_header(&mut big, &l).await,
            Err(ReadError::Decode(DecodeError::TooLarge { .. }))
        ));
        let mut body_short: &[u8] = &[b'F', b'M', b'T', b'H', 1, 0, 0, 10, 1];
        assert!(matches!(
            read_header(&mut body_short, &l).await,
            Err(ReadError::Decode(DecodeError::Incomplete { .. }))
        ));
    }
}
