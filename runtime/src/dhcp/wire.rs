//! DHCPv4 messages on the wire (RFC 2131 section 2, options RFC 2132): a checked view over
//! received bytes ([`Message`]) and an owned form that parses and emits ([`Repr`]).
//!
//! The fixed BOOTP part is 236 bytes, then the magic cookie 99.130.83.99, then options as
//! code/length/value with pad (0) and end (255) (RFC 2131 section 3 and 4.1, RFC 2132
//! section 2). Every malformed message is a [`WireError`] naming what is wrong; nothing here
//! panics on input.

use std::fmt;
use std::net::Ipv4Addr;

/// Bytes of the fixed header (op through file, RFC 2131 figure 1).
pub const HEADER_LEN: usize = 236;
/// The magic cookie starting the options field (RFC 2131 section 3, RFC 2132 section 2).
pub const COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The smallest BOOTP message relays must pass (RFC 1542, from RFC 951's 64-byte
/// vend field): what we send is padded to it.
pub const MIN_MESSAGE_LEN: usize = 300;

/// `op` values (RFC 2131 section 2).
pub const BOOTREQUEST: u8 = 1;
pub const BOOTREPLY: u8 = 2;
/// `htype` for Ethernet (RFC 1700 "Hardware Type"), with `hlen` 6.
pub const HTYPE_ETHERNET: u8 = 1;
/// The BROADCAST bit of `flags` (RFC 2131 section 2, figure 2).
pub const FLAG_BROADCAST: u16 = 0x8000;

/// Header field offsets (RFC 2131 figure 1).
pub mod offset {
    pub const OP: usize = 0;
    pub const HTYPE: usize = 1;
    pub const HLEN: usize = 2;
    pub const HOPS: usize = 3;
    pub const XID: usize = 4;
    pub const SECS: usize = 8;
    pub const FLAGS: usize = 10;
    pub const CIADDR: usize = 12;
    pub const YIADDR: usize = 16;
    pub const SIADDR: usize = 20;
    pub const GIADDR: usize = 24;
    pub const CHADDR: usize = 28;
    pub const SNAME: usize = 44;
    pub const FILE: usize = 108;
    pub const COOKIE: usize = 236;
    pub const OPTIONS: usize = 240;
}

/// Option codes used here (RFC 2132).
pub mod opt {
    pub const PAD: u8 = 0;
    pub const SUBNET_MASK: u8 = 1;
    pub const ROUTER: u8 = 3;
    pub const DNS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const REQUESTED_ADDRESS: u8 = 50;
    pub const LEASE_TIME: u8 = 51;
    pub const OVERLOAD: u8 = 52;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const PARAMETER_REQUEST_LIST: u8 = 55;
    pub const RENEWAL_TIME: u8 = 58;
    pub const REBINDING_TIME: u8 = 59;
    pub const CLIENT_ID: u8 = 61;
    pub const END: u8 = 255;
}

/// DHCP message types, option 53 (RFC 2132 section 9.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    pub fn code(self) -> u8 {
        match self {
            MessageType::Discover => 1,
            MessageType::Offer => 2,
            MessageType::Request => 3,
            MessageType::Decline => 4,
            MessageType::Ack => 5,
            MessageType::Nak => 6,
            MessageType::Release => 7,
            MessageType::Inform => 8,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => MessageType::Discover,
            2 => MessageType::Offer,
            3 => MessageType::Request,
            4 => MessageType::Decline,
            5 => MessageType::Ack,
            6 => MessageType::Nak,
            7 => MessageType::Release,
            8 => MessageType::Inform,
            _ => return None,
        })
    }
}

/// What is wrong with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the fixed header and the cookie.
    Truncated { len: usize },
    /// The four bytes after the header are not 99.130.83.99.
    BadCookie([u8; 4]),
    /// An option's length byte is missing or its value runs past the end of the message.
    OptionOverrun { code: u8, at: usize },
    /// The options stop without the end option (RFC 2131 section 4.1: it must be last).
    NoEnd,
    /// An option whose value has the wrong length for its meaning (RFC 2132).
    BadOptionLength { code: u8, len: usize },
    /// Option 53 missing or with an unknown type.
    BadMessageType(Option<u8>),
    /// A subnet mask whose one bits are not contiguous (RFC 950).
    BadSubnetMask(Ipv4Addr),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated { len } => write!(
                f,
                "DHCP message of {len} bytes is shorter than the {} of header and cookie",
                offset::OPTIONS
            ),
            WireError::BadCookie(c) => write!(
                f,
                "DHCP magic cookie is {}.{}.{}.{}, not 99.130.83.99",
                c[0], c[1], c[2], c[3]
            ),
            WireError::OptionOverrun { code, at } => write!(
                f,
                "DHCP option {code} at byte {at} runs past the end of the message"
            ),
            WireError::NoEnd => write!(f, "DHCP options end without the end option (255)"),
            WireError::BadOptionLength { code, len } => {
                write!(f, "DHCP option {code} has a value of {len} bytes")
            }
            WireError::BadMessageType(None) => {
                write!(f, "DHCP message without a message type (option 53)")
            }
            WireError::BadMessageType(Some(t)) => write!(f, "DHCP message type {t} is unknown"),
            WireError::BadSubnetMask(m) => write!(f, "subnet mask {m} is not contiguous"),
        }
    }
}

impl std::error::Error for WireError {}

/// A checked view of a DHCP message: the header and cookie are there and the options walk
/// to an end option within the bytes, so the accessors cannot fail.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    bytes: &'a [u8],
}

impl<'a> Message<'a> {
    /// Checks `bytes` and gives the view, or says what is wrong.
    pub fn new_checked(bytes: &'a [u8]) -> Result<Self, WireError> {
        if bytes.len() < offset::OPTIONS {
            return Err(WireError::Truncated { len: bytes.len() });
        }
        let mut cookie = [0u8; 4];
        cookie.copy_from_slice(&bytes[offset::COOKIE..offset::OPTIONS]);
        if cookie != COOKIE {
            return Err(WireError::BadCookie(cookie));
        }
        let m = Message { bytes };
        // Walk once so that every later walk is known to end cleanly.
        for o in m.walk() {
            o?;
        }
        Ok(m)
    }

    fn u8_at(&self, at: usize) -> u8 {
        self.bytes[at]
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn addr_at(&self, at: usize) -> Ipv4Addr {
        Ipv4Addr::new(
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        )
    }

    pub fn op(&self) -> u8 {
        self.u8_at(offset::OP)
    }
    pub fn htype(&self) -> u8 {
        self.u8_at(offset::HTYPE)
    }
    pub fn hlen(&self) -> u8 {
        self.u8_at(offset::HLEN)
    }
    pub fn hops(&self) -> u8 {
        self.u8_at(offset::HOPS)
    }
    pub fn xid(&self) -> u32 {
        let b = &self.bytes[offset::XID..offset::XID + 4];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }
    pub fn secs(&self) -> u16 {
        self.u16_at(offset::SECS)
    }
    pub fn flags(&self) -> u16 {
        self.u16_at(offset::FLAGS)
    }
    pub fn ciaddr(&self) -> Ipv4Addr {
        self.addr_at(offset::CIADDR)
    }
    pub fn yiaddr(&self) -> Ipv4Addr {
        self.addr_at(offset::YIADDR)
    }
    pub fn siaddr(&self) -> Ipv4Addr {
        self.addr_at(offset::SIADDR)
    }
    pub fn giaddr(&self) -> Ipv4Addr {
        self.addr_at(offset::GIADDR)
    }
    /// The 16-byte client hardware address field.
    pub fn chaddr(&self) -> &'a [u8] {
        &self.bytes[offset::CHADDR..offset::SNAME]
    }

    /// The options in order (pad and end left out).
    pub fn options(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        // `new_checked` walked them all without error.
        self.walk().map_while(Result::ok)
    }

    /// An option's value; an option given several times is the concatenation of its parts
    /// (RFC 3396). Options in `sname`/`file` under option overload (52) are not
    /// read: the servers we meet do not overload, and ignoring it loses nothing we require.
    pub fn option(&self, code: u8) -> Option<Vec<u8>> {
        let mut found: Option<Vec<u8>> = None;
        for (c, v) in self.options() {
            if c == code {
                found.get_or_insert_with(Vec::new).extend_from_slice(v);
            }
        }
        found
    }

    fn walk(&self) -> OptionWalk<'a> {
        OptionWalk {
            bytes: self.bytes,
            at: offset::OPTIONS,
            done: false,
        }
    }
}

struct OptionWalk<'a> {
    bytes: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> Iterator for OptionWalk<'a> {
    type Item = Result<(u8, &'a [u8]), WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(&code) = self.bytes.get(self.at) else {
                self.done = true;
                return Some(Err(WireError::NoEnd));
            };
            match code {
                // RFC 2132 section 3.1: one byte, no length.
                opt::PAD => self.at += 1,
                // RFC 2132 section 3.2: the end; what follows is padding.
                opt::END => self.done = true,
                _ => {
                    let start = self.at;
                    let value = self
                        .bytes
                        .get(start + 1)
                        .map(|&len| start + 2..start + 2 + usize::from(len))
                        .and_then(|r| self.bytes.get(r));
                    let Some(value) = value else {
                        self.done = true;
                        return Some(Err(WireError::OptionOverrun { code, at: start }));
                    };
                    self.at = start + 2 + value.len();
                    return Some(Ok((code, value)));
                }
            }
        }
        None
    }
}

/// A DHCP message as owned fields: what the client builds and what tests parse back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repr {
    pub op: u8,
    pub xid: u32,
    pub secs: u16,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    /// Ethernet only: `htype` 1, `hlen` 6.
    pub chaddr: [u8; 6],
    /// Options in order, each code once (values longer than 255 bytes are split on emit
    /// and joined on parse, RFC 3396).
    pub options: Vec<(u8, Vec<u8>)>,
}

impl Repr {
    /// A message with all addresses zero and no options.
    pub fn new(op: u8, xid: u32, chaddr: [u8; 6]) -> Self {
        Repr {
            op,
            xid,
            secs: 0,
            flags: 0,
            ciaddr: Ipv4Addr::UNSPECIFIED,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            siaddr: Ipv4Addr::UNSPECIFIED,
            giaddr: Ipv4Addr::UNSPECIFIED,
            chaddr,
            options: Vec::new(),
        }
    }

    /// Parses a message with an Ethernet `chaddr` (other hardware types are not ours).
    pub fn parse(bytes: &[u8]) -> Result<Self, WireError> {
        let m = Message::new_checked(bytes)?;
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&m.chaddr()[..6]);
        let mut options: Vec<(u8, Vec<u8>)> = Vec::new();
        for (c, v) in m.options() {
            match options.iter_mut().find(|(oc, _)| *oc == c) {
                Some((_, ov)) => ov.extend_from_slice(v),
                None => options.push((c, v.to_vec())),
            }
        }
        Ok(Repr {
            op: m.op(),
            xid: m.xid(),
            secs: m.secs(),
            flags: m.flags(),
            ciaddr: m.ciaddr(),
            yiaddr: m.yiaddr(),
            siaddr: m.siaddr(),
            giaddr: m.giaddr(),
            chaddr,
            options,
        })
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    }

    pub fn push(&mut self, code: u8, value: &[u8]) {
        self.options.push((code, value.to_vec()));
    }

    /// The message type (option 53).
    pub fn message_type(&self) -> Result<MessageType, WireError> {
        match self.option(opt::MESSAGE_TYPE) {
            Some(&[t]) => MessageType::from_code(t).ok_or(WireError::BadMessageType(Some(t))),
            Some(v) => Err(WireError::BadOptionLength {
                code: opt::MESSAGE_TYPE,
                len: v.len(),
            }),
            None => Err(WireError::BadMessageType(None)),
        }
    }

    /// The bytes, padded to [`MIN_MESSAGE_LEN`].
    pub fn emit(&self) -> Vec<u8> {
        let mut b = vec![0u8; offset::OPTIONS];
        b[offset::OP] = self.op;
        b[offset::HTYPE] = HTYPE_ETHERNET;
        b[offset::HLEN] = 6;
        b[offset::XID..offset::XID + 4].copy_from_slice(&self.xid.to_be_bytes());
        b[offset::SECS..offset::SECS + 2].copy_from_slice(&self.secs.to_be_bytes());
        b[offset::FLAGS..offset::FLAGS + 2].copy_from_slice(&self.flags.to_be_bytes());
        for (at, a) in [
            (offset::CIADDR, self.ciaddr),
            (offset::YIADDR, self.yiaddr),
            (offset::SIADDR, self.siaddr),
            (offset::GIADDR, self.giaddr),
        ] {
            b[at..at + 4].copy_from_slice(&a.octets());
        }
        b[offset::CHADDR..offset::CHADDR + 6].copy_from_slice(&self.chaddr);
        b[offset::COOKIE..offset::OPTIONS].copy_from_slice(&COOKIE);
        for (code, value) in &self.options {
            // RFC 3396: a long value goes out as several options of one code.
            let mut parts = value.chunks(255).peekable();
            if parts.peek().is_none() {
                b.extend_from_slice(&[*code, 0]);
            }
            for part in parts {
                b.push(*code);
                b.push(part.len() as u8);
                b.extend_from_slice(part);
            }
        }
        b.push(opt::END);
        if b.len() < MIN_MESSAGE_LEN {
            b.resize(MIN_MESSAGE_LEN, opt::PAD);
        }
        b
    }
}

/// A four-byte option value as a u32 (lease and renewal times, RFC 2132 9.2, 9.11, 9.12).
pub fn u32_option(code: u8, v: &[u8]) -> Result<u32, WireError> {
    match v {
        &[a, b, c, d] => Ok(u32::from_be_bytes([a, b, c, d])),
        _ => Err(WireError::BadOptionLength { code, len: v.len() }),
    }
}

/// A four-byte option value as an address (subnet mask, server id, requested address).
pub fn addr_option(code: u8, v: &[u8]) -> Result<Ipv4Addr, WireError> {
    u32_option(code, v).map(Ipv4Addr::from)
}

/// A list of addresses, at least one (routers, DNS servers: RFC 2132 3.5, 3.8).
pub fn addrs_option(code: u8, v: &[u8]) -> Result<Vec<Ipv4Addr>, WireError> {
    if v.is_empty() || !v.len().is_multiple_of(4) {
        return Err(WireError::BadOptionLength { code, len: v.len() });
    }
    Ok(v.chunks_exact(4)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect())
}

/// The prefix length of a contiguous subnet mask.
pub fn prefix_of_mask(mask: Ipv4Addr) -> Result<u8, WireError> {
    let m = u32::from(mask);
    let ones = m.leading_ones();
    if m.checked_shl(ones).unwrap_or(0) != 0 {
        return Err(WireError::BadSubnetMask(mask));
    }
    Ok(ones as u8)
}
