//! Netlink link events (rtnetlink(7), `RTMGRP_LINK`): a vif appearing when a qube starts,
//! going away when it stops, an uplink losing carrier, an MTU change.
//!
//! Messages are decoded with netlink-packet-route rather than by hand; the socket is
//! netlink-sys's, non-blocking, so the service's `poll(2)` loop waits on it with the devices.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `RTMGRP_LINK` (linux/rtnetlink.h).
const RTMGRP_LINK: u32 = 1;

/// What happened to a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A link appeared or changed (`RTM_NEWLINK`).
    Changed(LinkState),
    /// A link went away (`RTM_DELLINK`).
    Gone { name: String },
    /// Events were lost (the socket's buffer overflowed): the caller must rescan every link.
    Overrun,
}

/// A link as an `RTM_NEWLINK` message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub index: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Carrier present (`IFF_LOWER_UP`).
    pub carrier: bool,
    pub mtu: Option<u32>,
}

/// A netlink route socket subscribed to link events.
#[derive(Debug)]
pub struct LinkMonitor {
    socket: Socket,
    buf: Vec<u8>,
}

impl LinkMonitor {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, RTMGRP_LINK))?;
        socket.set_non_blocking(true)?;
        Ok(LinkMonitor {
            socket,
            buf: vec![0u8; 32 * 1024],
        })
    }

    /// The link events waiting on the socket (none when nothing is waiting).
    pub fn events(&mut self) -> io::Result<Vec<LinkEvent>> {
        let mut out = Vec::new();
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    out.push(LinkEvent::Overrun);
                    continue;
                }
                Err(e) => return Err(e),
            };
            parse_link_messages(&self.buf[..n], &mut out);
        }
    }
}

impl AsRawFd for LinkMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

/// Renames the link with index `index` to `name` (when given) and sets it up or down
/// (`RTM_SETLINK`, rtnetlink(7)), waiting for the kernel's acknowledgement. A service image's
/// PID 1 uses it: nothing else there brings its NICs up, and `ifname=<name>:<mac>` on the
/// kernel command line names them. The kernel refuses to rename a link that is up (`EBUSY`),
/// so a rename is sent with the link down, and bringing it up is a second request.
pub fn set_link(index: u32, name: Option<&str>, up: bool) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    if let Some(name) = name {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        request(&mut socket, msg)?;
    }
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    if up {
        msg.header.flags = LinkFlags::Up;
    }
    msg.header.change_mask = LinkFlags::Up;
    request(&mut socket, msg)
}

/// Sets the link named `name` up or down (`RTM_SETLINK` with `ifi_index` 0 and `IFLA_IFNAME`:
/// the kernel's `rtnl_setlink` then finds the link by name). By name rather than by a sysfs
/// index because sysfs shows the network namespace it was mounted in, while the netlink socket
/// is the calling thread's: this acts where the caller is, as `ip link set NAME up` does. A
/// missing link is `ENODEV`.
pub fn set_link_up(name: &str, up: bool) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    if up {
        msg.header.flags = LinkFlags::Up;
    }
    msg.header.change_mask = LinkFlags::Up;
    request(&mut socket, msg)
}

/// Whether a link named `name` exists in the calling thread's network namespace
/// (`RTM_GETLINK` by `IFLA_IFNAME`; the kernel answers `ENODEV` for none). Only the reply's
/// netlink header is looked at, so a link attribute this crate's decoder does not know cannot
/// turn "it exists" into an error.
pub fn link_exists(name: &str) -> io::Result<bool> {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
    /// `NLMSG_ERROR` and `RTM_NEWLINK` (linux/netlink.h, linux/rtnetlink.h).
    const NLMSG_ERROR: u16 = 2;
    const RTM_NEWLINK: u16 = 16;
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(name.to_string()));
    let mut msg = NetlinkMessage::from(RouteNetlinkMessage::GetLink(link));
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    // A link's full description (statistics, VF tables) can be tens of kilobytes.
    let mut reply = vec![0u8; 64 * 1024];
    let mut found = false;
    loop {
        let n = socket.recv(&mut &mut reply[..], 0)?;
        let mut b = &reply[..n];
        while b.len() >= 16 {
            let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
            let kind = u16::from_ne_bytes([b[4], b[5]]);
            if len < 16 || len > b.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink reply to RTM_GETLINK",
                ));
            }
            match kind {
                RTM_NEWLINK => found = true,
                NLMSG_ERROR if len >= 20 => {
                    let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
                    return match code {
                        0 => Ok(found),
                        c if c == -libc::ENODEV => Ok(false),
                        c => Err(io::Error::from_raw_os_error(-c)),
                    };
                }
                _ => {}
            }
            let step = (len + 3) & !3;
            b = b.get(step..).unwrap_or(&[]);
        }
    }
}

/// Gives the link with index `index` the IPv4 address `addr/prefix_len`, a host route to
/// `gateway` on it and the default route through `gateway` (`RTM_NEWADDR`, `RTM_NEWROUTE`),
/// which is what Qubes' `setup-ip` does on a Linux qube's uplink. Existing entries are
/// replaced, so running it twice is harmless.
pub fn set_uplink_ipv4(
    index: u32,
    addr: std::net::Ipv4Addr,
    prefix_len: u8,
    gateway: std::net::Ipv4Addr,
) -> io::Result<()> {
    use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
    use netlink_packet_route::address::{AddressAttribute, AddressMessage};
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol,
        RouteScope, RouteType,
    };
    use netlink_packet_route::AddressFamily;
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    let mut a = AddressMessage::default();
    a.header.family = AddressFamily::Inet;
    a.header.prefix_len = prefix_len;
    a.header.index = index;
    a.attributes.push(AddressAttribute::Local(addr.into()));
    a.attributes.push(AddressAttribute::Address(addr.into()));
    send(
        &mut socket,
        RouteNetlinkMessage::NewAddress(a),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?;
    let route = |dst: Option<std::net::Ipv4Addr>| {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.protocol = RouteProtocol::Boot;
        r.header.kind = RouteType::Unicast;
        r.attributes.push(RouteAttribute::Oif(index));
        match dst {
            Some(d) => {
                r.header.destination_prefix_length = 32;
                r.header.scope = RouteScope::Link;
                r.attributes
                    .push(RouteAttribute::Destination(RouteAddress::Inet(d)));
            }
            None => {
                r.header.scope = RouteScope::Universe;
                r.header.flags = RouteFlags::Onlink;
                r.attributes
                    .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
            }
        }
        r
    };
    send(
        &mut socket,
        RouteNetlinkMessage::NewRoute(route(Some(gateway))),
        NLM_F_CREATE | NLM_F_REPLACE,
    )?;
    send(
        &mut socket,
        RouteNetlinkMessage::NewRoute(route(None)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
}

/// Sets the MTU of the link with index `index` (`RTM_SETLINK` with `IFLA_MTU`).
pub fn set_mtu(index: u32, mtu: u32) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    request(&mut socket, msg)
}

fn request(socket: &mut Socket, link: LinkMessage) -> io::Result<()> {
    send(socket, RouteNetlinkMessage::SetLink(link), 0)
}

fn send(socket: &mut Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};
    let mut msg = NetlinkMessage::from(message);
    msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    msg.header.sequence_number = 1;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut reply = vec![0u8; 8192];
    loop {
        let n = socket.recv(&mut &mut reply[..], 0)?;
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if let NetlinkPayload::Error(e) = msg.payload {
            return match e.code {
                None => Ok(()),
                Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
            };
        }
    }
}

fn state(msg: &LinkMessage) -> Option<LinkState> {
    let mut name = None;
    let mut mtu = None;
    for a in &msg.attributes {
        match a {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    Some(LinkState {
        name: name?,
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        carrier: msg.header.flags.contains(LinkFlags::LowerUp),
        mtu,
    })
}

/// Decodes the netlink messages in one datagram (several may share it, netlink(7)). A
/// message that does not decode ends the datagram: what follows it cannot be framed.
pub fn parse_link_messages(mut b: &[u8], out: &mut Vec<LinkEvent>) {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            return;
        }
        if let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&b[..len]) {
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                match m {
                    RouteNetlinkMessage::NewLink(l) => {
                        if let Some(s) = state(&l) {
                            out.push(LinkEvent::Changed(s));
                        }
                    }
                    RouteNetlinkMessage::DelLink(l) => {
                        if let Some(s) = state(&l) {
                            out.push(LinkEvent::Gone { name: s.name });
                        }
                    }
                    _ => {}
                }
            }
        }
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        let step = (len + 3) & !3;
        b = b.get(step..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An rtnetlink message as the kernel lays it out (netlink(7), rtnetlink(7)): nlmsghdr,
    /// ifinfomsg, then IFLA_IFNAME and IFLA_MTU attributes; written by hand from the
    /// headers, not with the crate under test.
    fn link_msg(ty: u16, index: u32, flags: u32, name: &str, mtu: u32) -> Vec<u8> {
        let mut attrs = Vec::new();
        let mut attr = |ty: u16, v: &[u8]| {
            attrs.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            attrs.extend_from_slice(&ty.to_ne_bytes());
            attrs.extend_from_slice(v);
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        };
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        attr(3, &n); // IFLA_IFNAME
        attr(4, &mtu.to_ne_bytes()); // IFLA_MTU
        let total = 16 + 16 + attrs.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]); // flags, seq, pid
        m.push(0); // ifi_family AF_UNSPEC
        m.push(0);
        m.extend_from_slice(&1u16.to_ne_bytes()); // ARPHRD_ETHER
        m.extend_from_slice(&index.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // ifi_change
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn decodes_newlink_and_dellink_with_mtu_and_carrier() {
        const IFF_UP: u32 = 1;
        const IFF_LOWER_UP: u32 = 1 << 16;
        let mut dgram = link_msg(16, 7, IFF_UP | IFF_LOWER_UP, "vif3.0", 1400);
        dgram.extend(link_msg(16, 8, IFF_UP, "eth0", 1500));
        dgram.extend(link_msg(17, 9, 0, "vif4.0", 1500));
        let mut out = Vec::new();
        parse_link_messages(&dgram, &mut out);
        assert_eq!(
            out,
            vec![
                LinkEvent::Changed(LinkState {
                    name: "vif3.0".into(),
                    index: 7,
                    up: true,
                    carrier: true,
                    mtu: Some(1400),
                }),
                LinkEvent::Changed(LinkState {
                    name: "eth0".into(),
                    index: 8,
                    up: true,
                    carrier: false,
                    mtu: Some(1500),
                }),
                LinkEvent::Gone {
                    name: "vif4.0".into()
                },
            ]
        );
        // Truncated input never panics and yields only whole messages.
        for cut in 0..dgram.len() {
            let mut o = Vec::new();
            parse_link_messages(&dgram[..cut], &mut o);
            assert!(o.len() <= 3);
        }
    }
}
