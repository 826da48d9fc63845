//! The XenStore wire format: the message header, the message types, the error names and
//! the payload syntax, from Xen's `xen/include/public/io/xs_wire.h` (xen-project/xen) and
//! the message semantics in Xen's `docs/misc/xenstore.txt`.
//!
//! Every message, in either direction and on every transport (a xenstored Unix socket, the
//! Linux device `/dev/xen/xenbus`, the shared ring page), is a 16-byte header
//! (`struct xsd_sockmsg`: `type`, `req_id`, `tx_id`, `len`, each a `uint32_t` in the
//! machine's byte order, little-endian on x86 and Arm) followed by `len` bytes of payload,
//! at most [`XENSTORE_PAYLOAD_MAX`]. Payloads are mostly NUL-terminated strings; a value
//! (the payload of a READ reply, the tail of a WRITE request) is raw bytes with no NUL.
//!
//! Nothing here panics on input: a byte stream from a peer is untrusted, so a header that
//! announces too long a payload, a payload without its NUL, or a path that is not UTF-8 is
//! a [`WireError`].

use std::fmt;

use super::DomId;

/// Bytes in a message header (`sizeof(struct xsd_sockmsg)`).
pub const HEADER_LEN: usize = 16;

/// The largest payload in either direction (`XENSTORE_PAYLOAD_MAX`). xenstored kills a
/// connection that exceeds it ("Violating this is very bad", `xs_wire.h`), and so do we.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;

/// The longest absolute path (`XENSTORE_ABS_PATH_MAX`); longer ones get `EINVAL`.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;

/// The longest relative path a client should send (`XENSTORE_REL_PATH_MAX`).
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

/// The number of valid message types (`XS_TYPE_COUNT`).
pub const XS_TYPE_COUNT: u32 = 27;

/// A message type (`enum xsd_sockmsg_type` in `xs_wire.h`), with the numbers of that enum.
/// The header carries the raw `u32` so that an unknown type can still be answered (with
/// `ENOSYS`, as `xenstore.txt` asks); [`MsgType::from_u32`] names the known ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum MsgType {
    /// `XS_CONTROL` (alias `XS_DEBUG`): xenstore-control commands.
    Control = 0,
    /// `XS_DIRECTORY`: `<path>|` → `<child-leaf-name>|*`.
    Directory = 1,
    /// `XS_READ`: `<path>|` → `<value|>`.
    Read = 2,
    /// `XS_GET_PERMS`: `<path>|` → `<perm-as-string>|+`.
    GetPerms = 3,
    /// `XS_WATCH`: `<wpath>|<token>|`.
    Watch = 4,
    /// `XS_UNWATCH`: `<wpath>|<token>|`.
    Unwatch = 5,
    /// `XS_TRANSACTION_START`: `|` → `<transid>|`.
    TransactionStart = 6,
    /// `XS_TRANSACTION_END`: `T|` (commit) or `F|` (abort).
    TransactionEnd = 7,
    /// `XS_INTRODUCE`: `<domid>|<gfn>|<evtchn>|` (dom0 only).
    Introduce = 8,
    /// `XS_RELEASE`: `<domid>|` (dom0 only).
    Release = 9,
    /// `XS_GET_DOMAIN_PATH`: `<domid>|` → `/local/domain/<domid>|`.
    GetDomainPath = 10,
    /// `XS_WRITE`: `<path>|<value|>`.
    Write = 11,
    /// `XS_MKDIR`: `<path>|`.
    Mkdir = 12,
    /// `XS_RM`: `<path>|`.
    Rm = 13,
    /// `XS_SET_PERMS`: `<path>|<perm-as-string>|+`.
    SetPerms = 14,
    /// `XS_WATCH_EVENT`: `<epath>|<token>|`, unsolicited, `req_id` and `tx_id` 0.
    WatchEvent = 15,
    /// `XS_ERROR`: `E<name>|`, the reply to a failed request.
    Error = 16,
    /// `XS_IS_DOMAIN_INTRODUCED`: `<domid>|` → `T|` or `F|`.
    IsDomainIntroduced = 17,
    /// `XS_RESUME`: `<domid>|`.
    Resume = 18,
    /// `XS_SET_TARGET`: `<domid>|<tdomid>|`.
    SetTarget = 19,
    // 20 was XS_RESTRICT, removed; `xs_wire.h` keeps the number unused.
    /// `XS_RESET_WATCHES`: `|`, drops the caller's watches and transactions.
    ResetWatches = 21,
    /// `XS_DIRECTORY_PART`: `<path>|<offset>` → `<gencnt>|<child-leaf-name>|*`.
    DirectoryPart = 22,
    /// `XS_GET_FEATURE`.
    GetFeature = 23,
    /// `XS_SET_FEATURE`.
    SetFeature = 24,
    /// `XS_GET_QUOTA`.
    GetQuota = 25,
    /// `XS_SET_QUOTA`.
    SetQuota = 26,
    /// `XS_INVALID`: guaranteed never to be a valid type.
    Invalid = 0xffff,
}

impl MsgType {
    /// `XS_DEBUG`, the deprecated alias of `XS_CONTROL`.
    pub const DEBUG: MsgType = MsgType::Control;

    /// Every type `xs_wire.h` defines, for lookups and tests.
    pub const ALL: [MsgType; 27] = [
        MsgType::Control,
        MsgType::Directory,
        MsgType::Read,
        MsgType::GetPerms,
        MsgType::Watch,
        MsgType::Unwatch,
        MsgType::TransactionStart,
        MsgType::TransactionEnd,
        MsgType::Introduce,
        MsgType::Release,
        MsgType::GetDomainPath,
        MsgType::Write,
        MsgType::Mkdir,
        MsgType::Rm,
        MsgType::SetPerms,
        MsgType::WatchEvent,
        MsgType::Error,
        MsgType::IsDomainIntroduced,
        MsgType::Resume,
        MsgType::SetTarget,
        MsgType::ResetWatches,
        MsgType::DirectoryPart,
        MsgType::GetFeature,
        MsgType::SetFeature,
        MsgType::GetQuota,
        MsgType::SetQuota,
        MsgType::Invalid,
    ];

    /// The type with this number, if `xs_wire.h` defines one (20, the removed
    /// `XS_RESTRICT`, is not).
    pub fn from_u32(n: u32) -> Option<MsgType> {
        MsgType::ALL.iter().copied().find(|t| *t as u32 == n)
    }

    /// The C name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Control => "XS_CONTROL",
            MsgType::Directory => "XS_DIRECTORY",
            MsgType::Read => "XS_READ",
            MsgType::GetPerms => "XS_GET_PERMS",
            MsgType::Watch => "XS_WATCH",
            MsgType::Unwatch => "XS_UNWATCH",
            MsgType::TransactionStart => "XS_TRANSACTION_START",
            MsgType::TransactionEnd => "XS_TRANSACTION_END",
            MsgType::Introduce => "XS_INTRODUCE",
            MsgType::Release => "XS_RELEASE",
            MsgType::GetDomainPath => "XS_GET_DOMAIN_PATH",
            MsgType::Write => "XS_WRITE",
            MsgType::Mkdir => "XS_MKDIR",
            MsgType::Rm => "XS_RM",
            MsgType::SetPerms => "XS_SET_PERMS",
            MsgType::WatchEvent => "XS_WATCH_EVENT",
            MsgType::Error => "XS_ERROR",
            MsgType::IsDomainIntroduced => "XS_IS_DOMAIN_INTRODUCED",
            MsgType::Resume => "XS_RESUME",
            MsgType::SetTarget => "XS_SET_TARGET",
            MsgType::ResetWatches => "XS_RESET_WATCHES",
            MsgType::DirectoryPart => "XS_DIRECTORY_PART",
            MsgType::GetFeature => "XS_GET_FEATURE",
            MsgType::SetFeature => "XS_SET_FEATURE",
            MsgType::GetQuota => "XS_GET_QUOTA",
            MsgType::SetQuota => "XS_SET_QUOTA",
            MsgType::Invalid => "XS_INVALID",
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error name (`xsd_errors` in `xs_wire.h`). Errors travel as the name's string in an
/// `XS_ERROR` payload, never as a number, so the numbering of the host's errno does not
/// matter. The variants are in the order of that array.
#[allow(clippy::upper_case_acronyms)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
    EPERM,
}

impl Errno {
    /// Every name of `xsd_errors`, in its order.
    pub const ALL: [Errno; 16] = [
        Errno::EINVAL,
        Errno::EACCES,
        Errno::EEXIST,
        Errno::EISDIR,
        Errno::ENOENT,
        Errno::ENOMEM,
        Errno::ENOSPC,
        Errno::EIO,
        Errno::ENOTEMPTY,
        Errno::ENOSYS,
        Errno::EROFS,
        Errno::EBUSY,
        Errno::EAGAIN,
        Errno::EISCONN,
        Errno::E2BIG,
        Errno::EPERM,
    ];

    /// The name as sent on the wire (`"ENOENT"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Errno::EINVAL => "EINVAL",
            Errno::EACCES => "EACCES",
            Errno::EEXIST => "EEXIST",
            Errno::EISDIR => "EISDIR",
            Errno::ENOENT => "ENOENT",
            Errno::ENOMEM => "ENOMEM",
            Errno::ENOSPC => "ENOSPC",
            Errno::EIO => "EIO",
            Errno::ENOTEMPTY => "ENOTEMPTY",
            Errno::ENOSYS => "ENOSYS",
            Errno::EROFS => "EROFS",
            Errno::EBUSY => "EBUSY",
            Errno::EAGAIN => "EAGAIN",
            Errno::EISCONN => "EISCONN",
            Errno::E2BIG => "E2BIG",
            Errno::EPERM => "EPERM",
        }
    }

    /// The error with this wire name, if it is one of `xsd_errors`.
    pub fn from_name(name: &str) -> Option<Errno> {
        Errno::ALL.iter().copied().find(|e| e.as_str() == name)
    }

    /// What the name means, for messages people read.
    pub fn describe(self) -> &'static str {
        match self {
            Errno::EINVAL => "invalid argument",
            Errno::EACCES => "permission denied",
            Errno::EEXIST => "already exists",
            Errno::EISDIR => "is a directory",
            Errno::ENOENT => "no such node",
            Errno::ENOMEM => "out of memory",
            Errno::ENOSPC => "quota exceeded",
            Errno::EIO => "input/output error",
            Errno::ENOTEMPTY => "not empty",
            Errno::ENOSYS => "not supported",
            Errno::EROFS => "read-only",
            Errno::EBUSY => "busy",
            Errno::EAGAIN => "transaction conflict, try again",
            Errno::EISCONN => "already connected",
            Errno::E2BIG => "too big",
            Errno::EPERM => "operation not permitted",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Input that does not follow `xs_wire.h` / `xenstore.txt`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireError {
    /// A header announced a payload longer than [`XENSTORE_PAYLOAD_MAX`] (or a message to
    /// encode has one).
    TooLong { len: usize },
    /// A payload ended where a NUL-terminated string was still expected.
    MissingNul,
    /// A string (a path, a token, a number) is not UTF-8.
    NotUtf8,
    /// A field is not what its message type allows (a bad permission string, a number
    /// that does not parse, bytes after the last field).
    Malformed(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::TooLong { len } => write!(
                f,
                "payload of {len} bytes is over the {XENSTORE_PAYLOAD_MAX}-byte XenStore limit"
            ),
            WireError::MissingNul => f.write_str("payload ends without the NUL of a string"),
            WireError::NotUtf8 => f.write_str("string in the payload is not UTF-8"),
            WireError::Malformed(what) => write!(f, "malformed payload: {what}"),
        }
    }
}

impl std::error::Error for WireError {}

/// The message header, `struct xsd_sockmsg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `type`: an [`MsgType`] number (raw, so unknown types survive decoding).
    pub msg_type: u32,
    /// `req_id`: chosen by the requester, echoed in the reply; 0 in watch events.
    pub req_id: u32,
    /// `tx_id`: the transaction, 0 outside one.
    pub tx_id: u32,
    /// `len`: payload bytes following the header.
    pub len: u32,
}

impl Header {
    /// The 16 header bytes, each field little-endian (the byte order of x86 and Arm Xen).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.msg_type.to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// The header in 16 bytes. Any bytes are a header; the length is checked by whoever
    /// reads the payload ([`Decoder`]).
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> Header {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header {
            msg_type: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        }
    }
}

/// One whole message: header fields and payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The raw type number (see [`Message::kind`]).
    pub msg_type: u32,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl Message {
    /// A message of a known type.
    pub fn new(kind: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            msg_type: kind as u32,
            req_id,
            tx_id,
            payload,
        }
    }

    /// The message type, if `xs_wire.h` defines this number.
    pub fn kind(&self) -> Option<MsgType> {
        MsgType::from_u32(self.msg_type)
    }

    /// The header that goes before this payload.
    pub fn header(&self) -> Result<Header, WireError> {
        let len = self.payload.len();
        if len > XENSTORE_PAYLOAD_MAX {
            return Err(WireError::TooLong { len });
        }
        Ok(Header {
            msg_type: self.msg_type,
            req_id: self.req_id,
            tx_id: self.tx_id,
            // In range: checked against XENSTORE_PAYLOAD_MAX just above.
            len: len as u32,
        })
    }

    /// Appends header and payload to `out`. A payload over the limit is refused rather
    /// than sent: the peer would kill the connection for it.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        out.extend_from_slice(&self.header()?.to_bytes());
        out.extend_from_slice(&self.payload);
        Ok(())
    }

    /// Header and payload as one buffer, to go out in one `write` (the xenbus device
    /// wants a request whole).
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out)?;
        Ok(out)
    }
}

/// Cuts whole messages out of a byte stream that arrives in pieces of any size.
///
/// [`Decoder::feed`] what was read, then take messages with [`Decoder::next_message`]
/// until it says `None`. The buffer holds at most one partial message between calls when
/// used like that (under `HEADER_LEN + XENSTORE_PAYLOAD_MAX` bytes plus the last read).
/// An error is final: after a bad header the stream has no trustworthy boundaries left,
/// so the connection should be closed (as xenstored does).
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    failed: Option<WireError>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Appends bytes read from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Bytes received but not yet part of a returned message.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole message, `None` if more bytes are needed. A header whose `len` is
    /// over [`XENSTORE_PAYLOAD_MAX`] is an error as soon as the header is in, without
    /// waiting for (or buffering) its payload.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(head) = self.buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::from_bytes(head);
        let len = header.len as usize;
        if len > XENSTORE_PAYLOAD_MAX {
            let e = WireError::TooLong { len };
            self.failed = Some(e.clone());
            self.buf = Vec::new();
            return Err(e);
        }
        if self.buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.buf.drain(..HEADER_LEN + len);
        Ok(Some(Message {
            msg_type: header.msg_type,
            req_id: header.req_id,
            tx_id: header.tx_id,
            payload,
        }))
    }
}

/// Concatenates `parts`, each followed by a NUL (`<foo>|*` in `xenstore.txt`).
pub fn nul_strings<S: AsRef<[u8]>>(parts: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_ref());
        out.push(0);
    }
    out
}

/// The first NUL-terminated string of `payload` (UTF-8) and the bytes after its NUL.
pub fn split_first(payload: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let nul = payload
        .iter()
        .position(|&b| b == 0)
        .ok_or(WireError::MissingNul)?;
    let s = std::str::from_utf8(&payload[..nul]).map_err(|_| WireError::NotUtf8)?;
    Ok((s, &payload[nul + 1..]))
}

/// All the strings of a `<foo>|*` payload: every one ends in a NUL, so a non-empty payload
/// that does not end in one is an error (a truncated list must not pass for a shorter one).
pub fn split_strings(payload: &[u8]) -> Result<Vec<&str>, WireError> {
    let mut rest = payload;
    let mut out = Vec::new();
    while !rest.is_empty() {
        let (s, tail) = split_first(rest)?;
        out.push(s);
        rest = tail;
    }
    Ok(out)
}

/// Exactly `n` NUL-terminated strings and nothing after them.
pub fn exact_strings(payload: &[u8], n: usize) -> Result<Vec<&str>, WireError> {
    let v = split_strings(payload)?;
    if v.len() != n {
        return Err(WireError::Malformed("wrong number of strings"));
    }
    Ok(v)
}

/// The single string of a one-string payload such as `<path>|`: one string and its NUL,
/// nothing after. C xenstored's `onearg` insists on the NUL too (a payload without it is
/// `EINVAL`), and every client sends it (Linux's `xs_single` sends `strlen + 1` bytes).
pub fn single_string(payload: &[u8]) -> Result<&str, WireError> {
    let Some((0, body)) = payload.split_last() else {
        return Err(WireError::MissingNul);
    };
    if body.contains(&0) {
        return Err(WireError::Malformed("more than one string"));
    }
    std::str::from_utf8(body).map_err(|_| WireError::NotUtf8)
}

/// A `XS_WRITE` payload, `<path>|<value|>`: the value is raw and has no NUL after it.
pub fn write_payload(path: &str, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 1 + value.len());
    out.extend_from_slice(path.as_bytes());
    out.push(0);
    out.extend_from_slice(value);
    out
}

/// A watch event (`XS_WATCH_EVENT`, payload `<epath>|<token>|`): `path` changed, and the
/// watch that matched was set with `token`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

impl WatchEvent {
    /// `path\0token\0`.
    pub fn to_payload(&self) -> Vec<u8> {
        nul_strings(&[self.path.as_bytes(), self.token.as_bytes()])
    }

    /// Parses `path\0token\0`. Linux's xenbus and xenstored both send exactly two
    /// strings; a third (some old servers padded) is tolerated, a missing NUL is not.
    pub fn from_payload(payload: &[u8]) -> Result<WatchEvent, WireError> {
        let v = split_strings(payload)?;
        match v.as_slice() {
            [path, token] | [path, token, _] => Ok(WatchEvent {
                path: (*path).to_owned(),
                token: (*token).to_owned(),
            }),
            _ => Err(WireError::Malformed("a watch event is <path>|<token>|")),
        }
    }
}

/// What a permission entry allows (`n`, `r`, `w`, `b` in `xenstore.txt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: no access.
    None,
    /// `r`: read only.
    Read,
    /// `w`: write only.
    Write,
    /// `b`: read and write.
    Both,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }

    fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }
}

/// One permission entry, `<letter><domid>` such as `r5`. A node's first entry names its
/// owner (who always has full access) and, by its letter, what every domain without an
/// entry of its own may do (`xenstore.txt`, "Permissions").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    pub domid: DomId,
    pub access: Access,
}

impl Perm {
    pub fn new(access: Access, domid: DomId) -> Perm {
        Perm { domid, access }
    }

    /// Parses `n0`, `r5`, `w12`, `b7`.
    pub fn parse(s: &str) -> Result<Perm, WireError> {
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => {
                return Err(WireError::Malformed(
                    "permission must start with n, r, w or b",
                ))
            }
        };
        let digits = chars.as_str();
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(WireError::Malformed(
                "permission domid is not a decimal number",
            ));
        }
        let domid = digits
            .parse::<DomId>()
            .map_err(|_| WireError::Malformed("permission domid is out of range"))?;
        Ok(Perm { domid, access })
    }

    /// Parses a `<perm-as-string>|+` payload (a GET_PERMS reply, the tail of SET_PERMS).
    pub fn parse_list(payload: &[u8]) -> Result<Vec<Perm>, WireError> {
        let v = split_strings(payload)?;
        if v.is_empty() {
            return Err(WireError::Malformed(
                "a permission list has at least one entry",
            ));
        }
        v.into_iter().map(Perm::parse).collect()
    }

    /// `perm\0perm\0…`.
    pub fn list_payload(perms: &[Perm]) -> Vec<u8> {
        let strings: Vec<String> = perms.iter().map(Perm::to_string).collect();
        nul_strings(&strings)
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_numbers_are_those_of_xs_wire_h() {
        let expect: [(MsgType, u32); 27] = [
            (MsgType::Control, 0),
            (MsgType::Directory, 1),
            (MsgType::Read, 2),
            (MsgType::GetPerms, 3),
            (MsgType::Watch, 4),
            (MsgType::Unwatch, 5),
            (MsgType::TransactionStart, 6),
            (MsgType::TransactionEnd, 7),
            (MsgType::Introduce, 8),
            (MsgType::Release, 9),
            (MsgType::GetDomainPath, 10),
            (MsgType::Write, 11),
            (MsgType::Mkdir, 12),
            (MsgType::Rm, 13),
            (MsgType::SetPerms, 14),
            (MsgType::WatchEvent, 15),
            (MsgType::Error, 16),
            (MsgType::IsDomainIntroduced, 17),
            (MsgType::Resume, 18),
            (MsgType::SetTarget, 19),
            (MsgType::ResetWatches, 21),
            (MsgType::DirectoryPart, 22),
            (MsgType::GetFeature, 23),
            (MsgType::SetFeature, 24),
            (MsgType::GetQuota, 25),
            (MsgType::SetQuota, 26),
            (MsgType::Invalid, 0xffff),
        ];
        for (t, n) in expect {
            assert_eq!(t as u32, n, "{t}");
            assert_eq!(MsgType::from_u32(n), Some(t));
        }
        assert_eq!(MsgType::DEBUG as u32, 0);
        assert_eq!(MsgType::from_u32(20), None, "XS_RESTRICT was removed");
        assert_eq!(MsgType::from_u32(XS_TYPE_COUNT), None);
        assert_eq!(XENSTORE_PAYLOAD_MAX, 4096);
    }

    #[test]
    fn error_names_round_trip_in_xsd_errors_order() {
        let names: Vec<&str> = Errno::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(
            names,
            [
                "EINVAL",
                "EACCES",
                "EEXIST",
                "EISDIR",
                "ENOENT",
                "ENOMEM",
                "ENOSPC",
                "EIO",
                "ENOTEMPTY",
                "ENOSYS",
                "EROFS",
                "EBUSY",
                "EAGAIN",
                "EISCONN",
                "E2BIG",
                "EPERM"
            ]
        );
        for e in Errno::ALL {
            assert_eq!(Errno::from_name(e.as_str()), Some(e));
        }
        assert_eq!(Errno::from_name("EQUOTA"), None);
    }

    #[test]
    fn read_request_is_byte_exact() {
        let path = "/local/domain/0/name";
        let m = Message::new(MsgType::Read, 7, 0, nul_strings(&[path]));
        let bytes = m.encode().expect("small payload");
        // type 2 (XS_READ), req_id 7, tx_id 0, len 21 (20 path bytes and the NUL), each LE.
        assert_eq!(
            &bytes[..HEADER_LEN],
            &[2, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 21, 0, 0, 0]
        );
        assert_eq!(&bytes[HEADER_LEN..], b"/local/domain/0/name\0");
        assert_eq!(bytes.len(), 16 + 21);
    }

    #[test]
    fn write_and_watch_event_payloads_are_byte_exact() {
        let m = Message::new(MsgType::Write, 0x0102_0304, 9, write_payload("/a", b"v"));
        assert_eq!(
            m.encode().expect("small"),
            [11, 0, 0, 0, 4, 3, 2, 1, 9, 0, 0, 0, 4, 0, 0, 0, b'/', b'a', 0, b'v']
        );
        let ev = WatchEvent {
            path: "/local/domain/5/device".into(),
            token: "tok".into(),
        };
        assert_eq!(ev.to_payload(), b"/local/domain/5/device\0tok\0");
        assert_eq!(WatchEvent::from_payload(&ev.to_payload()), Ok(ev));
    }

    #[test]
    fn messages_round_trip_through_the_decoder_fed_a_byte_at_a_time() {
        let msgs = vec![
            Message::new(MsgType::Read, 1, 0, b"/x\0".to_vec()),
            Message::new(MsgType::TransactionStart, 2, 0, b"\0".to_vec()),
            Message::new(MsgType::Write, 3, 44, write_payload("/y", &[0, 1, 2, 255])),
            Message::new(MsgType::Directory, 4, 0, Vec::new()),
            Message {
                msg_type: 999,
                req_id: 5,
                tx_id: 0,
                payload: vec![0xAA; XENSTORE_PAYLOAD_MAX],
            },
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode_into(&mut stream).expect("within the limit");
        }
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for b in &stream {
            d.feed(std::slice::from_ref(b));
            while let Some(m) = d.next_message().expect("well-formed stream") {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversize_payloads_are_refused_both_ways() {
        let m = Message::new(MsgType::Write, 1, 0, vec![b'a'; XENSTORE_PAYLOAD_MAX + 1]);
        assert_eq!(m.encode(), Err(WireError::TooLong { len: 4097 }));

        let mut d = Decoder::new();
        let h = Header {
            msg_type: 2,
            req_id: 1,
            tx_id: 0,
            len: 4097,
        };
        d.feed(&h.to_bytes());
        assert_eq!(d.next_message(), Err(WireError::TooLong { len: 4097 }));
        // Final: later bytes do not resynchronise a stream that lost its boundaries.
        d.feed(
            &Message::new(MsgType::Read, 2, 0, b"/\0".to_vec())
                .encode()
                .expect("ok"),
        );
        assert!(d.next_message().is_err());
        assert_eq!(d.buffered(), 0, "the bad payload is not buffered");
    }

    #[test]
    fn truncated_input_waits_rather_than_failing() {
        let bytes = Message::new(MsgType::Read, 1, 0, b"/abc\0".to_vec())
            .encode()
            .expect("ok");
        for cut in 0..bytes.len() {
            let mut d = Decoder::new();
            d.feed(&bytes[..cut]);
            assert_eq!(d.next_message(), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn payload_helpers_reject_what_xenstore_txt_forbids() {
        assert_eq!(split_strings(b""), Ok(vec![]));
        assert_eq!(split_strings(b"a\0bc\0"), Ok(vec!["a", "bc"]));
        assert_eq!(split_strings(b"a\0bc"), Err(WireError::MissingNul));
        assert_eq!(split_strings(b"\xff\0"), Err(WireError::NotUtf8));
        assert_eq!(split_first(b"/p\0val"), Ok(("/p", &b"val"[..])));
        assert_eq!(split_first(b"/p"), Err(WireError::MissingNul));
        assert_eq!(single_string(b"/p\0"), Ok("/p"));
        assert_eq!(single_string(b"T\0"), Ok("T"));
        assert_eq!(single_string(b"T"), Err(WireError::MissingNul));
        assert_eq!(single_string(b""), Err(WireError::MissingNul));
        assert!(single_string(b"/p\0x\0").is_err());
        assert!(exact_strings(b"a\0", 2).is_err());
        assert!(WatchEvent::from_payload(b"/p\0tok").is_err());
        assert!(WatchEvent::from_payload(b"/p\0").is_err());
    }

    #[test]
    fn permission_strings_parse_and_print() {
        let perms = Perm::parse_list(b"n0\0r5\0w7\0b65535\0").expect("valid");
        assert_eq!(
            perms,
            [
                Perm::new(Access::None, 0),
                Perm::new(Access::Read, 5),
                Perm::new(Access::Write, 7),
                Perm::new(Access::Both, 65535)
            ]
        );
        assert_eq!(Perm::list_payload(&perms), b"n0\0r5\0w7\0b65535\0");
        for bad in ["", "x1", "r", "r-1", "r65536", "r 1", "rr1"] {
            assert!(Perm::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Perm::parse_list(b"").is_err());
        assert!(Perm::parse_list(b"r1").is_err());
    }

    /// A small xorshift generator: deterministic, so a failure reproduces from the seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn decoder_and_parsers_never_panic_on_random_bytes() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        for _ in 0..2000 {
            let mut d = Decoder::new();
            let len = (rng.next() % 200) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Half the time, a plausible header so that payload parsing is reached too.
            if rng.next().is_multiple_of(2) && bytes.len() >= HEADER_LEN {
                let plen = (bytes.len() - HEADER_LEN) as u32;
                bytes[12..16].copy_from_slice(&plen.to_le_bytes());
            }
            let mut pos = 0;
            while pos < bytes.len() {
                let step = 1 + (rng.next() % 17) as usize;
                let end = (pos + step).min(bytes.len());
                d.feed(&bytes[pos..end]);
                pos = end;
                while let Ok(Some(m)) = d.next_message() {
                    let _ = split_strings(&m.payload);
                    let _ = single_string(&m.payload);
                    let _ = WatchEvent::from_payload(&m.payload);
                    let _ = Perm::parse_list(&m.payload);
                    assert!(m.payload.len() <= XENSTORE_PAYLOAD_MAX);
                }
            }
            assert!(d.buffered() <= HEADER_LEN + XENSTORE_PAYLOAD_MAX + 17);
        }
    }
}
