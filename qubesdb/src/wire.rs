//! The QubesDB wire format: one 72-byte header, then `data_len` bytes of data.
//!
//! Reference: `struct qdb_hdr` in qubes-core-qubesdb `include/qubesdb.h`, and mirage-qubes
//! `lib/db.ml` (the same header over vchan).
//!
//! ```text
//! byte  0        1 ............................ 64  65 .. 67  68 ........ 71  72 ...
//!      +------+---------------------------------+-----------+--------------+--------------+
//!      | type | path, NUL-terminated (64 bytes) |  padding  | data_len LE  | data         |
//!      +------+---------------------------------+-----------+--------------+--------------+
//! ```
//!
//! What this module accepts when decoding:
//!
//! - `type` must be one of the 14 [`MsgType`] values;
//! - `path` must contain a NUL within its 64 bytes; the bytes before it are the path, and the
//!   bytes after it are ignored (upstream C copies paths with `strncpy` into a stack header and
//!   may leave anything there). The path may be empty; otherwise it must use only
//!   `a-zA-Z0-9-_/.:@` and must not start with `-`;
//! - the 3 padding bytes may hold any value: upstream sends `sizeof(struct qdb_hdr)` straight
//!   from an uninitialised stack variable, so refusing non-zero padding would refuse upstream
//!   peers. We always send zeros;
//! - `data_len` (little-endian, x86-64 being the only platform Qubes runs on) must be at most
//!   [`MAX_DATA`] (3072). Upstream's daemon refuses `data_len >= 3072`; we follow the limit as
//!   the header documents it ("<= 3072") and note the difference in docs/qubesdb.md.
//!
//! Decoding is incremental: [`decode_prefix`] and [`Decoder`] return `Ok(None)` until a whole
//! message is buffered, and report a bad header as soon as its 72 bytes are there (before its
//! data arrives). After an error the byte stream cannot be resynchronised: drop the connection.

use std::fmt;

/// Size of the header (`sizeof(struct qdb_hdr)` on x86-64).
pub const HEADER_LEN: usize = 72;
/// Size of the `path` field, NUL included (`QDB_MAX_PATH`).
pub const PATH_FIELD_LEN: usize = 64;
/// Longest path: the field minus its terminating NUL.
pub const MAX_PATH_LEN: usize = PATH_FIELD_LEN - 1;
/// Largest `data_len` (`QDB_MAX_DATA`).
pub const MAX_DATA: usize = 3072;

const PATH_OFFSET: usize = 1;
const PADDING_OFFSET: usize = PATH_OFFSET + PATH_FIELD_LEN;
const DATA_LEN_OFFSET: usize = 68;

/// `enum qdb_msg`: the message type in byte 0, numbered from 0 in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum MsgType {
    CmdRead = 0,
    CmdWrite = 1,
    CmdMultiread = 2,
    CmdList = 3,
    CmdRm = 4,
    CmdWatch = 5,
    CmdUnwatch = 6,
    RespOk = 7,
    RespErrorNoent = 8,
    RespError = 9,
    RespRead = 10,
    RespMultiread = 11,
    RespList = 12,
    RespWatch = 13,
}

impl MsgType {
    /// Every type, in wire order (index = wire value).
    pub const ALL: [MsgType; 14] = [
        MsgType::CmdRead,
        MsgType::CmdWrite,
        MsgType::CmdMultiread,
        MsgType::CmdList,
        MsgType::CmdRm,
        MsgType::CmdWatch,
        MsgType::CmdUnwatch,
        MsgType::RespOk,
        MsgType::RespErrorNoent,
        MsgType::RespError,
        MsgType::RespRead,
        MsgType::RespMultiread,
        MsgType::RespList,
        MsgType::RespWatch,
    ];

    /// The type with wire value `value`, if there is one.
    pub fn from_u8(value: u8) -> Option<MsgType> {
        MsgType::ALL.get(usize::from(value)).copied()
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// The upstream name without its `QDB_` prefix, e.g. `CMD_READ`.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::CmdRead => "CMD_READ",
            MsgType::CmdWrite => "CMD_WRITE",
            MsgType::CmdMultiread => "CMD_MULTIREAD",
            MsgType::CmdList => "CMD_LIST",
            MsgType::CmdRm => "CMD_RM",
            MsgType::CmdWatch => "CMD_WATCH",
            MsgType::CmdUnwatch => "CMD_UNWATCH",
            MsgType::RespOk => "RESP_OK",
            MsgType::RespErrorNoent => "RESP_ERROR_NOENT",
            MsgType::RespError => "RESP_ERROR",
            MsgType::RespRead => "RESP_READ",
            MsgType::RespMultiread => "RESP_MULTIREAD",
            MsgType::RespList => "RESP_LIST",
            MsgType::RespWatch => "RESP_WATCH",
        }
    }

    /// Whether a client may send this type (`CMD_*`); the others are answers.
    pub fn is_command(self) -> bool {
        self.as_u8() <= MsgType::CmdUnwatch.as_u8()
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with bytes that claim to be a QubesDB message, or with a message to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Fewer than [`HEADER_LEN`] bytes where a whole message was expected.
    ShortHeader { got: usize },
    /// Byte 0 is not a [`MsgType`].
    UnknownType(u8),
    /// No NUL in the 64-byte path field.
    PathNotTerminated,
    /// A path to encode is longer than [`MAX_PATH_LEN`].
    PathTooLong { len: usize },
    /// The path starts with `-`.
    PathLeadingDash,
    /// The path holds a byte outside `a-zA-Z0-9-_/.:@`, at offset `at` of the path.
    PathBadChar { byte: u8, at: usize },
    /// `data_len` (or the data to encode) is over [`MAX_DATA`].
    DataTooLong { len: usize },
    /// A whole message was expected but its data is cut short.
    TruncatedData { data_len: usize, got: usize },
    /// A whole message was expected but more bytes follow it.
    TrailingBytes { extra: usize },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::ShortHeader { got } => {
                write!(f, "short header: {got} of {HEADER_LEN} bytes")
            }
            WireError::UnknownType(t) => write!(f, "unknown message type {t}"),
            WireError::PathNotTerminated => write!(
                f,
                "path is not NUL-terminated within {PATH_FIELD_LEN} bytes"
            ),
            WireError::PathTooLong { len } => write!(
                f,
                "path is {len} bytes long, more than the {MAX_PATH_LEN} that fit in the \
                 {PATH_FIELD_LEN}-byte field with its NUL"
            ),
            WireError::PathLeadingDash => write!(f, "path starts with '-'"),
            WireError::PathBadChar { byte, at } => {
                if byte.is_ascii_graphic() || *byte == b' ' {
                    write!(f, "path contains '{}' at byte {at}", char::from(*byte))
                } else {
                    write!(f, "path contains byte 0x{byte:02x} at byte {at}")
                }
            }
            WireError::DataTooLong { len } => {
                write!(f, "data_len {len} exceeds QDB_MAX_DATA ({MAX_DATA})")
            }
            WireError::TruncatedData { data_len, got } => write!(
                f,
                "truncated data: data_len is {data_len} but only {got} data bytes follow the header"
            ),
            WireError::TrailingBytes { extra } => {
                write!(f, "{extra} unexpected bytes follow the message")
            }
        }
    }
}

impl std::error::Error for WireError {}

/// Whether `byte` may appear in a path (`a-zA-Z0-9-_/.:@`).
pub fn is_path_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-_/.:@".contains(&byte)
}

/// Checks a path's length and characters: at most 63 bytes of `a-zA-Z0-9-_/.:@`, not
/// starting with `-`. The empty path passes (it is meaningful in some messages).
pub fn check_path(path: &[u8]) -> Result<(), WireError> {
    if path.len() > MAX_PATH_LEN {
        return Err(WireError::PathTooLong { len: path.len() });
    }
    if let Some(at) = path.iter().position(|&b| !is_path_byte(b)) {
        return Err(WireError::PathBadChar { byte: path[at], at });
    }
    if path.first() == Some(&b'-') {
        return Err(WireError::PathLeadingDash);
    }
    Ok(())
}

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub msg_type: MsgType,
    /// The path before its NUL (validated, so ASCII).
    pub path: String,
    pub data_len: usize,
}

impl Header {
    /// Parses and validates the header in the first [`HEADER_LEN`] bytes of `bytes` (later
    /// bytes are not looked at). Checks, in order: length, type, path, `data_len`.
    pub fn parse(bytes: &[u8]) -> Result<Header, WireError> {
        let Some(raw) = bytes.get(..HEADER_LEN) else {
            return Err(WireError::ShortHeader { got: bytes.len() });
        };
        let msg_type = MsgType::from_u8(raw[0]).ok_or(WireError::UnknownType(raw[0]))?;
        let path = parse_path_field(&raw[PATH_OFFSET..PADDING_OFFSET])?;
        let data_len = u32::from_le_bytes([
            raw[DATA_LEN_OFFSET],
            raw[DATA_LEN_OFFSET + 1],
            raw[DATA_LEN_OFFSET + 2],
            raw[DATA_LEN_OFFSET + 3],
        ]);
        let data_len = usize::try_from(data_len).unwrap_or(usize::MAX);
        if data_len > MAX_DATA {
            return Err(WireError::DataTooLong { len: data_len });
        }
        Ok(Header {
            msg_type,
            path,
            data_len,
        })
    }

    /// The 72 header bytes: path NUL-padded, padding zero.
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], WireError> {
        check_path(self.path.as_bytes())?;
        if self.data_len > MAX_DATA {
            return Err(WireError::DataTooLong { len: self.data_len });
        }
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.msg_type.as_u8();
        out[PATH_OFFSET..PATH_OFFSET + self.path.len()].copy_from_slice(self.path.as_bytes());
        let len = u32::try_from(self.data_len)
            .map_err(|_| WireError::DataTooLong { len: self.data_len })?;
        out[DATA_LEN_OFFSET..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
        Ok(out)
    }
}

fn parse_path_field(field: &[u8]) -> Result<String, WireError> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::PathNotTerminated)?;
    let path = &field[..end];
    check_path(path)?;
    // check_path admits ASCII only, so each byte is one char.
    Ok(path.iter().map(|&b| char::from(b)).collect())
}

/// The path of a header that failed to decode, if its type-independent path field is valid;
/// the empty path otherwise. Used to address a `RESP_ERROR` to a malformed command.
pub fn salvage_path(bytes: &[u8]) -> String {
    bytes
        .get(PATH_OFFSET..PADDING_OFFSET)
        .and_then(|field| parse_path_field(field).ok())
        .unwrap_or_default()
}

/// One whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub msg_type: MsgType,
    pub path: String,
    pub data: Vec<u8>,
}

impl Message {
    /// A message (not validated until encoded).
    pub fn new(msg_type: MsgType, path: impl Into<String>, data: impl Into<Vec<u8>>) -> Message {
        Message {
            msg_type,
            path: path.into(),
            data: data.into(),
        }
    }

    /// A message without data.
    pub fn bare(msg_type: MsgType, path: impl Into<String>) -> Message {
        Message::new(msg_type, path, Vec::new())
    }

    /// The wire bytes of this message.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        encode(self.msg_type, &self.path, &self.data)
    }

    /// Appends the wire bytes of this message to `out` (unchanged on error).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        let header = Header {
            msg_type: self.msg_type,
            path: self.path.clone(),
            data_len: self.data.len(),
        }
        .encode()?;
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.data);
        Ok(())
    }

    /// Decodes exactly one message: `bytes` must hold its header, all its data and nothing
    /// more.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        let header = Header::parse(bytes)?;
        let got = bytes.len() - HEADER_LEN;
        if got < header.data_len {
            return Err(WireError::TruncatedData {
                data_len: header.data_len,
                got,
            });
        }
        if got > header.data_len {
            return Err(WireError::TrailingBytes {
                extra: got - header.data_len,
            });
        }
        Ok(Message {
            msg_type: header.msg_type,
            path: header.path,
            data: bytes[HEADER_LEN..].to_vec(),
        })
    }
}

/// The wire bytes of one message: the header (path NUL-padded to 64 bytes, zero padding,
/// `data_len` little-endian) followed by `data`.
pub fn encode(msg_type: MsgType, path: &str, data: &[u8]) -> Result<Vec<u8>, WireError> {
    let header = Header {
        msg_type,
        path: path.to_string(),
        data_len: data.len(),
    }
    .encode()?;
    let mut out = Vec::with_capacity(HEADER_LEN + data.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    Ok(out)
}

/// Decodes the message at the start of a stream buffer. `Ok(None)`: more bytes are needed;
/// `Ok(Some((message, used)))`: the first `used` bytes were that message.
pub fn decode_prefix(buf: &[u8]) -> Result<Option<(Message, usize)>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = Header::parse(buf)?;
    let used = HEADER_LEN + header.data_len;
    let Some(data) = buf.get(HEADER_LEN..used) else {
        return Ok(None);
    };
    Ok(Some((
        Message {
            msg_type: header.msg_type,
            path: header.path,
            data: data.to_vec(),
        },
        used,
    )))
}

/// A stream decoder: feed it bytes as they arrive and take whole messages out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends received bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. An error leaves the bytes
    /// in place (and is returned again): the stream cannot be resynchronised.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        match decode_prefix(&self.buf)? {
            Some((message, used)) => {
                self.buf.drain(..used);
                Ok(Some(message))
            }
            None => Ok(None),
        }
    }

    /// Bytes received but not yet returned as a message.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_values_follow_the_enum_order() {
        for (i, t) in MsgType::ALL.iter().enumerate() {
            assert_eq!(usize::from(t.as_u8()), i);
            assert_eq!(MsgType::from_u8(t.as_u8()), Some(*t));
        }
        assert_eq!(MsgType::from_u8(14), None);
        assert_eq!(MsgType::RespWatch.as_u8(), 13);
        assert!(MsgType::CmdUnwatch.is_command());
        assert!(!MsgType::RespOk.is_command());
    }

    #[test]
    fn path_checks() {
        assert_eq!(check_path(b""), Ok(()));
        assert_eq!(check_path(b"/a-b_c.d:e@f/0"), Ok(()));
        assert_eq!(check_path(&[b'a'; 63]), Ok(()));
        assert_eq!(
            check_path(&[b'a'; 64]),
            Err(WireError::PathTooLong { len: 64 })
        );
        assert_eq!(check_path(b"-x"), Err(WireError::PathLeadingDash));
        assert_eq!(
            check_path(b"/a b"),
            Err(WireError::PathBadChar { byte: b' ', at: 2 })
        );
    }

    #[test]
    fn decoder_waits_for_whole_messages() {
        let bytes = encode(MsgType::RespRead, "/k", b"value").expect("encode");
        let mut d = Decoder::new();
        for (i, b) in bytes.iter().enumerate() {
            assert_eq!(d.next_message(), Ok(None), "after {i} bytes");
            d.feed(&[*b]);
        }
        let m = d.next_message().expect("decode").expect("whole message");
        assert_eq!(m, Message::new(MsgType::RespRead, "/k", b"value".to_vec()));
        assert!(d.pending().is_empty());
    }
}
