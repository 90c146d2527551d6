//! The status frame: the receiver's answer to a header, before any payload.

use std::fmt;

use crate::header::DecodeError;
use crate::{PREFIX_LEN, VERSION};

pub(crate) const STATUS_MAGIC: [u8; 4] = *b"FMTS";
/// Longest reason text carried in a status frame; longer text is cut.
pub const MAX_STATUS_MESSAGE: usize = 1024;

/// Why a stream was or was not accepted. Every non-`Ok` code means no
/// payload byte was forwarded, so the sender may try elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StatusCode {
    Ok,
    UnknownService,
    Denied,
    NoHealthyEndpoint,
    UpstreamRefused,
    BadHeader,
    Loop,
    Timeout,
    Overloaded,
    /// The gateway knows the named peer cluster is down (no live
    /// connection): nothing was sent there. Retry elsewhere; it need not
    /// count against a retry budget, no upstream did any work.
    PeerDown,
    /// A code this version does not know; treated as a failure.
    Other(u8),
}

impl StatusCode {
    pub fn to_u8(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::UnknownService => 1,
            Self::Denied => 2,
            Self::NoHealthyEndpoint => 3,
            Self::UpstreamRefused => 4,
            Self::BadHeader => 5,
            Self::Loop => 6,
            Self::Timeout => 7,
            Self::Overloaded => 8,
            Self::PeerDown => 9,
            Self::Other(c) => c,
        }
    }

    pub fn from_u8(c: u8) -> Self {
        match c {
            0 => Self::Ok,
            1 => Self::UnknownService,
            2 => Self::Denied,
            3 => Self::NoHealthyEndpoint,
            4 => Self::UpstreamRefused,
            5 => Self::BadHeader,
            6 => Self::Loop,
            7 => Self::Timeout,
            8 => Self::Overloaded,
            9 => Self::PeerDown,
            c => Self::Other(c),
        }
    }

    /// Whether another endpoint or cluster may succeed where this failed.
    /// A denial or a malformed request fails the same way everywhere.
    pub fn is_retryable_elsewhere(self) -> bool {
        matches!(
            self,
            Self::NoHealthyEndpoint
                | Self::UpstreamRefused
                | Self::Timeout
                | Self::Overloaded
                | Self::UnknownService
                | Self::PeerDown
        )
    }

    /// A short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::UnknownService => "unknown_service",
            Self::Denied => "denied",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::UpstreamRefused => "upstream_refused",
            Self::BadHeader => "bad_header",
            Self::Loop => "loop",
            Self::Timeout => "timeout",
            Self::Overloaded => "overloaded",
            Self::PeerDown => "peer_down",
            Self::Other(_) => "other",
        }
    }
}

impl StatusCode {
    /// What a gateway tells a peer cluster with this code, and nothing
    /// more: the reason in detail (addresses, service names, identities)
    /// stays in the gateway's own log and metrics, so a peer learns only
    /// what it could learn by asking for a service exported to it.
    pub fn fixed_message(self) -> &'static str {
        match self {
            Self::Ok => "",
            Self::UnknownService => "unknown service",
            Self::Denied => "denied",
            Self::NoHealthyEndpoint => "no healthy endpoint",
            Self::UpstreamRefused => "upstream refused",
            Self::BadHeader => "bad header",
            Self::Loop => "routing loop",
            Self::Timeout => "timed out",
            Self::Overloaded => "overloaded; try elsewhere",
            Self::PeerDown => "peer down",
            Self::Other(_) => "refused",
        }
    }
}

/// Most bytes of escaped text [`bounded`] keeps of a string others chose.
pub const MAX_LOGGED: usize = 256;

/// A string someone else chose (a header field, a status message, a
/// decode error quoting either), as it may be logged: control and
/// non-ASCII characters escaped, at most [`MAX_LOGGED`] bytes of that
/// escaped text, and a mark with what was left out when cut.
pub fn bounded(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.char_indices() {
        let before = out.len();
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
        if out.len() > MAX_LOGGED {
            // Counting what is written, not what was read: escapes make
            // the text up to ten times longer than the input.
            out.truncate(before);
            out.push_str(&format!("…(+{} bytes)", s.len() - i));
            return out;
        }
    }
    out
}

impl fmt::Display for StatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Other(c) => write!(f, "other({c})"),
            c => f.write_str(c.as_str()),
        }
    }
}

/// A status frame: code and a human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: StatusCode,
    pub message: String,
}

impl Status {
    pub fn ok() -> Self {
        Self {
            code: StatusCode::Ok,
            message: String::new(),
        }
    }

    pub fn new(code: StatusCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_STATUS_MESSAGE {
            let mut cut = MAX_STATUS_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Self { code, message }
    }

    pub fn is_ok(&self) -> bool {
        self.code == StatusCode::Ok
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        let msg = &self.message.as_bytes()[..self.message.len().min(MAX_STATUS_MESSAGE)];
        out.extend_from_slice(&STATUS_MAGIC);
        out.push(VERSION);
        out.push(self.code.to_u8());
        out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        out.extend_from_slice(msg);
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PREFIX_LEN + self.message.len());
        self.encode(&mut v);
        v
    }

    /// Checks the prefix and returns the message length that follows.
    pub fn message_len(prefix: &[u8; PREFIX_LEN]) -> Result<usize, DecodeError> {
        let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
        if magic != STATUS_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        if prefix[4] != VERSION {
            return Err(DecodeError::UnsupportedVersion(prefix[4]));
        }
        let len = usize::from(u16::from_be_bytes([prefix[6], prefix[7]]));
        if len > MAX_STATUS_MESSAGE {
            return Err(DecodeError::TooLarge {
                len,
                max: MAX_STATUS_MESSAGE,
            });
        }
        Ok(len)
    }

    pub fn decode(buf: &[u8]) -> Result<(Status, usize), DecodeError> {
        let prefix = crate::split_prefix(buf)?;
        let len = Self::message_len(prefix)?;
        let msg = buf
            .get(PREFIX_LEN..PREFIX_LEN + len)
            .ok_or_else(|| DecodeError::Incomplete {
                needed: PREFIX_LEN + len - buf.len(),
            })?;
        let message = std::str::from_utf8(msg)
            .map_err(|_| DecodeError::StatusUtf8)?
            .to_owned();
        Ok((
            Status {
                code: StatusCode::from_u8(prefix[5]),
                message,
            },
            PREFIX_LEN + len,
        ))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.message)
        }
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[test]
    fn logged_strings_are_bounded_and_escaped() {
        let long = "a".repeat(12_000);
        let b = bounded(&long);
        assert!(b.len() < MAX_LOGGED + 32, "{}", b.len());
        assert!(
            b.ends_with(&format!("…(+{} bytes)", 12_000 - MAX_LOGGED)),
            "{b}"
        );
        assert_eq!(bounded("x\n\u{1b}[2J\u{202e}y"), "x\\n\\u{1b}[2J\\u{202e}y");
        assert_eq!(bounded("echo.demo:7000"), "echo.demo:7000");
        // Found by the `header` fuzz target: a name of NUL bytes escapes to
        // five times its length; the bound is on what is written.
        let nuls = "\0".repeat(5_000);
        let b = bounded(&nuls);
        assert!(b.len() < MAX_LOGGED + 32, "{}", b.len());
        assert!(b.starts_with("\\u{0}"), "{b}");
        let cut = b.find('…').unwrap();
        assert_eq!(b[cut..], format!("…(+{} bytes)", 5_000 - cut / 5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_codes() {
        for c in 0..=255u8 {
            let s = Status::new(StatusCode::from_u8(c), "why");
            let b = s.to_bytes();
            let (got, n) = Status::decode(&b).unwrap();
            assert_eq!(got, s);
            assert_eq!(n, b.len());
            assert_eq!(got.code.to_u8(), c);
        }
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = Status::new(StatusCode::Denied, "é".repeat(1000));
        assert!(s.message.len() <= MAX_STATUS_MESSAGE);
        assert!(Status::decode(&s.to_bytes()).is_ok());
    }

    #[test]
    fn bad_status_bytes() {
        assert!(matches!(
            Status::decode(b"FMTH\x01\x00\x00\x00"),
            Err(DecodeError::BadMagic(_))
        ));
        assert!(matches!(
            Status::decode(b"FMTS\x02\x00\x00\x00"),
            Err(DecodeError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            Status::decode(b"FMTS\x01\x00\xff\xff"),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            Status::decode(b"FMTS\x01\x00\x00\x02\xff\xfe"),
            Err(DecodeError::StatusUtf8)
        ));
        assert!(matches!(
            Status::decode(b"FMTS\x01\x00\x00\x02a"),
            Err(DecodeError::Incomplete { needed: 1 })
        ));
    }
}
