//! TCP flag validity and window tracking, as Linux conntrack does them
//! (net/netfilter/nf_conntrack_proto_tcp.c: `tcp_valid_flags`, `tcp_new`, `tcp_in_window`,
//! and the RST check of `nf_conntrack_tcp_packet`), after "Real Stateful TCP Packet Filtering
//! in IP Filter" (Rooij, 2001).
//!
//! A packet that fails these checks is what the Qubes forward chain drops as
//! `ct state invalid`: a segment an attacker on the uplink injects into a client's connection
//! without knowing its sequence numbers, a RST that does not land where the other side has
//! acknowledged, a flag combination no TCP sends. A flow picked up mid-stream (loose pickup,
//! no SYN seen) has unknown window scaling; as in Linux it is tracked liberally (no window
//! checks) for its whole life.
//!
//! Per direction the state is Linux's `ip_ct_tcp_state`: `end` (highest sequence sent + 1),
//! `maxend` (highest sequence the receiver's window allows), `maxwin` (largest window seen),
//! `maxack` (highest ack sent), the window scale and flags.

use crate::conntrack::{Dir, TcpState, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// TCP URG flag.
pub const TCP_URG: u8 = 0x20;

/// `MAXACKWINCONST`: the least ack window, for stacks that ack far behind.
const MAX_ACK_WINDOW: u32 = 66_000;

const F_WSCALE: u8 = 1;
const F_MAXACK_SET: u8 = 2;
const F_LIBERAL: u8 = 4;

/// One direction's window state (`struct ip_ct_tcp_state`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct TcpDirState {
    end: u32,
    maxend: u32,
    maxwin: u32,
    maxack: u32,
    scale: u8,
    flags: u8,
}

/// Both directions: `[original, reply]`.
pub type TcpWindows = [TcpDirState; 2];

/// What window tracking needs of one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub seq: u32,
    pub ack: u32,
    /// The raw window field (unscaled).
    pub win: u16,
    /// Payload bytes (after the TCP header).
    pub len: u32,
    pub flags: u8,
    /// The window scale option's shift, if the segment carries one (SYN only matters).
    pub wscale: Option<u8>,
}

impl Segment {
    /// Reads a segment from the TCP header `t` (at least 20 bytes, data offset already
    /// checked by the transport parser) carrying `payload` bytes of data.
    pub fn parse(t: &[u8], payload: usize) -> Option<Segment> {
        if t.len() < 20 {
            return None;
        }
        let be32 = |i: usize| u32::from_be_bytes([t[i], t[i + 1], t[i + 2], t[i + 3]]);
        let flags = t[13];
        let doff = (usize::from(t[12] >> 4) * 4).min(t.len());
        let wscale = if flags & TCP_SYN != 0 {
            window_scale_option(t.get(20..doff).unwrap_or(&[]))
        } else {
            None
        };
        Some(Segment {
            seq: be32(4),
            ack: be32(8),
            win: u16::from_be_bytes([t[14], t[15]]),
            len: u32::try_from(payload).unwrap_or(u32::MAX),
            flags,
            wscale,
        })
    }

    fn syn(&self) -> bool {
        self.flags & TCP_SYN != 0
    }
    fn ack_set(&self) -> bool {
        self.flags & TCP_ACK != 0
    }
    fn rst(&self) -> bool {
        self.flags & TCP_RST != 0
    }

    /// `segment_seq_plus_len`: SYN and FIN each take one sequence number.
    fn end(&self) -> u32 {
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(u32::from(self.syn()))
            .wrapping_add(u32::from(self.flags & TCP_FIN != 0))
    }
}

/// The window scale option (RFC 7323 2.2) among TCP options; shifts above 14 count as 14.
fn window_scale_option(mut opts: &[u8]) -> Option<u8> {
    while let Some(&kind) = opts.first() {
        match kind {
            0 => return None,
            1 => opts = &opts[1..],
            _ => {
                let len = usize::from(*opts.get(1)?);
                if len < 2 || len > opts.len() {
                    return None;
                }
                if kind == 3 && len == 3 {
                    return Some(opts[2].min(14));
                }
                opts = &opts[len..];
            }
        }
    }
    None
}

/// `tcp_valid_flags`: the combinations a TCP sends (PSH, ECE and CWR aside). NULL, XMAS,
/// SYN+FIN, SYN+RST, FIN without ACK and the like are invalid in any state.
pub fn valid_flags(flags: u8) -> bool {
    const SYN: u8 = TCP_SYN;
    const ACK: u8 = TCP_ACK;
    matches!(
        flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | TCP_URG),
        SYN | 0x22 // SYN|URG
            | 0x12 // SYN|ACK
            | TCP_RST
            | 0x14 // RST|ACK
            | 0x11 // FIN|ACK
            | 0x31 // FIN|ACK|URG
            | ACK
            | 0x30 // ACK|URG
    )
}

/// Whether a packet with these flags may open a flow (`tcp_new` from state NONE): a SYN, or
/// an ACK of a connection that was open before we saw it (loose pickup,
/// `nf_conntrack_tcp_loose=1`, Linux's default). SYN+ACK, FIN, RST and the rest are invalid.
pub fn may_open(flags: u8) -> bool {
    let f = flags & (TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK);
    valid_flags(flags) && (f == TCP_SYN || f == TCP_ACK)
}

/// `after(a, b)`: `a` is later than `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) < 0
}

/// `before(a, b)`.
fn before(a: u32, b: u32) -> bool {
    after(b, a)
}

/// Initial state for a flow opened by `seg` in the original direction (`tcp_new`).
pub fn open(seg: &Segment) -> TcpWindows {
    let mut w = TcpWindows::default();
    let s = &mut w[0];
    s.end = seg.end();
    s.maxwin = u32::from(seg.win).max(1);
    if seg.syn() {
        s.maxend = s.end;
        if let Some(sc) = seg.wscale {
            s.scale = sc;
            s.flags |= F_WSCALE;
        }
    } else {
        // Picked up mid-stream: the window scale is unknown, so Linux tracks it liberally.
        s.maxend = s.end.wrapping_add(s.maxwin);
        w[0].flags |= F_LIBERAL;
        w[1].flags |= F_LIBERAL;
    }
    w
}

/// Checks `seg`, sent in direction `dir` of a flow in TCP state `state`, against the windows
/// and updates them if it passes (`tcp_in_window` plus the RST check). False: invalid.
pub fn in_window(w: &mut TcpWindows, state: TcpState, dir: Dir, seg: &Segment) -> bool {
    let (si, ri) = match dir {
        Dir::Original => (0, 1),
        Dir::Reply => (1, 0),
    };
    if w[si].flags & F_LIBERAL != 0 {
        return true;
    }
    // A SYN reopening a closed connection starts it over (Linux kills the old entry and
    // makes a new one).
    if dir == Dir::Original
        && seg.syn()
        && !seg.ack_set()
        && matches!(state, TcpState::TimeWait | TcpState::Close)
    {
        *w = open(seg);
        return true;
    }
    let (mut sender, mut receiver) = (w[si], w[ri]);
    let mut seq = seg.seq;
    let mut end = seg.end();
    let mut ack = seg.ack;
    let mut win = u32::from(seg.win);

    if sender.maxwin == 0 {
        // The first segment in this direction.
        if seg.syn() {
            // The SYN+ACK answering the SYN (or a simultaneous open).
            sender.end = end;
            sender.maxend = end;
            sender.maxwin = win.max(1);
            if let Some(sc) = seg.wscale {
                sender.scale = sc;
                sender.flags |= F_WSCALE;
            }
            // RFC 7323 2.2: scaling is on only if both sides offered it.
            if sender.flags & receiver.flags & F_WSCALE == 0 {
                sender.scale = 0;
                receiver.scale = 0;
            }
            if !seg.ack_set() {
                w[si] = sender;
                w[ri] = receiver;
                return true;
            }
        } else {
            sender.end = end;
            let swin = win << sender.scale;
            sender.maxwin = swin.max(1);
            sender.maxend = end.wrapping_add(sender.maxwin);
            if receiver.maxwin == 0 {
                receiver.end = ack;
                receiver.maxend = ack;
            } else if ack == receiver.end.wrapping_add(1) {
                // Likely the answer to a keepalive.
                receiver.end = receiver.end.wrapping_add(1);
            }
        }
    } else if seg.syn()
        && after(end, sender.end)
        && matches!(state, TcpState::SynSent | TcpState::SynRecv)
    {
        // A SYN retransmitted with a new sequence number.
        sender.end = end;
        sender.maxend = end;
        sender.maxwin = win.max(1);
        if let Some(sc) = seg.wscale {
            sender.scale = sc;
            sender.flags |= F_WSCALE;
        }
    }

    if !seg.ack_set() || (seg.rst() && ack == 0) {
        // No ACK (or a broken stack's RST+ACK with ack 0): pretend it acks what it may.
        ack = receiver.end;
    }
    if seg.rst() && seq == 0 && state == TcpState::SynSent {
        // A RST answering our SYN.
        seq = sender.end;
        end = sender.end;
    }

    let max_ack_window = sender.maxwin.max(MAX_ACK_WINDOW);
    let ok = before(seq, sender.maxend.wrapping_add(1))
        && (receiver.maxwin == 0
            || after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            ))
        && before(ack, receiver.end.wrapping_add(1))
        && after(
            ack,
            receiver.end.wrapping_sub(max_ack_window).wrapping_sub(1),
        );
    if !ok {
        return false;
    }
    // A RST must not fall before what the other side has acknowledged (the RST check in
    // `nf_conntrack_tcp_packet`): a blind reset needs to guess the exact sequence.
    if seg.rst() && receiver.flags & F_MAXACK_SET != 0 && before(seg.seq, receiver.maxack) {
        return false;
    }

    if !seg.syn() {
        win <<= sender.scale;
    }
    sender.maxwin = sender.maxwin.max(win);
    if after(end, sender.end) {
        sender.end = end;
    }
    if seg.ack_set() {
        if sender.flags & F_MAXACK_SET == 0 {
            sender.maxack = ack;
            sender.flags |= F_MAXACK_SET;
        } else if after(ack, sender.maxack) {
            sender.maxack = ack;
        }
    }
    if receiver.maxwin != 0 && after(end, sender.maxend) {
        receiver.maxwin = receiver
            .maxwin
            .wrapping_add(end.wrapping_sub(sender.maxend));
    }
    if after(ack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
        receiver.maxend = ack.wrapping_add(win);
        if win == 0 {
            receiver.maxend = receiver.maxend.wrapping_add(1);
        }
    }
    w[si] = sender;
    w[ri] = receiver;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u8 = TCP_SYN;
    const ACK: u8 = TCP_ACK;
    const FIN: u8 = TCP_FIN;
    const RST: u8 = TCP_RST;
    const PSH: u8 = 0x08;

    fn seg(seq: u32, ack: u32, flags: u8, len: u32) -> Segment {
        Segment {
            seq,
            ack,
            win: 64240,
            len,
            flags,
            wscale: None,
        }
    }

    #[test]
    fn flag_combinations_follow_linux() {
        for ok in [
            SYN,
            SYN | ACK,
            RST,
            RST | ACK,
            FIN | ACK,
            ACK,
            ACK | PSH,
            FIN | ACK | PSH,
        ] {
            assert!(valid_flags(ok), "{ok:#x} is valid");
        }
        // NULL, XMAS (FIN|PSH|URG), SYN+FIN, SYN+RST, FIN alone, SYN+FIN+RST+ACK.
        for bad in [0, FIN | PSH | TCP_URG, SYN | FIN, SYN | RST, FIN, 0x17] {
            assert!(!valid_flags(bad), "{bad:#x} is invalid");
        }
        assert!(may_open(SYN) && may_open(ACK) && may_open(ACK | PSH));
        for no in [SYN | ACK, FIN | ACK, RST, RST | ACK, FIN, 0, SYN | FIN] {
            assert!(!may_open(no), "{no:#x} does not open a flow");
        }
    }

    #[test]
    fn window_scale_is_read_from_the_options() {
        // MSS, SACK-permitted, timestamps, NOP, window scale 7 (a Linux SYN's options).
        let mut t = vec![0u8; 20];
        t[12] = 10 << 4;
        t[13] = SYN;
        t.extend_from_slice(&[
            2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ]);
        let s = Segment::parse(&t, 0).expect("segment");
        assert_eq!(s.wscale, Some(7));
        // A malformed option length ends the scan without a value.
        t[21] = 40;
        assert_eq!(Segment::parse(&t, 0).expect("segment").wscale, None);
    }

    /// A handshake and some data, then what a blind attacker on the uplink might send.
    #[test]
    fn injected_segments_outside_the_window_are_invalid() {
        let c_isn = 1_000_000u32;
        let s_isn = 7_000_000u32;
        let mut w = open(&seg(c_isn, 0, SYN, 0));
        assert!(in_window(
            &mut w,
            TcpState::SynSent,
            Dir::Reply,
            &seg(s_isn, c_isn + 1, SYN | ACK, 0)
        ));
        assert!(in_window(
            &mut w,
            TcpState::SynRecv,
            Dir::Original,
            &seg(c_isn + 1, s_isn + 1, ACK, 0)
        ));
        // The server sends 1000 bytes, the client acks them.
        assert!(in_window(
            &mut w,
            TcpState::Established,
            Dir::Reply,
            &seg(s_isn + 1, c_isn + 1, ACK | PSH, 1000)
        ));
        assert!(in_window(
            &mut w,
            TcpState::Established,
            Dir::Original,
            &seg(c_isn + 1, s_isn + 1001, ACK, 0)
        ));
        let est = TcpState::Established;
        // Data far beyond the client's window.
        assert!(!in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 10_000_000, c_isn + 1, ACK, 100)
        ));
        // Data long ago acknowledged (far below the window).
        assert!(!in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn - 5_000_000, c_isn + 1, ACK, 100)
        ));
        // An ACK for client data that was never sent.
        assert!(!in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 1001, c_isn + 500_000, ACK, 0)
        ));
        // A RST before what the client has acknowledged.
        assert!(!in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 1, 0, RST, 0)
        ));
        // A RST beyond the window.
        assert!(!in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 50_000_000, 0, RST, 0)
        ));
        // The server's next segment and an exact RST pass.
        assert!(in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 1001, c_isn + 1, ACK, 500)
        ));
        assert!(in_window(
            &mut w,
            est,
            Dir::Reply,
            &seg(s_isn + 1501, 0, RST, 0)
        ));
    }

    #[test]
    fn window_scaling_needs_both_sides_and_then_widens_the_window() {
        let c = 10u32;
        let s = 90_000u32;
        let syn = |seq, ack, flags, sc| Segment {
            wscale: sc,
            ..seg(seq, ack, flags, 0)
        };
        let mut w = open(&syn(c, 0, SYN, Some(7)));
        assert!(in_window(
            &mut w,
            TcpState::SynSent,
            Dir::Reply,
            &syn(s, c + 1, SYN | ACK, Some(7))
        ));
        assert!(in_window(
            &mut w,
            TcpState::SynRecv,
            Dir::Original,
            &seg(c + 1, s + 1, ACK, 0)
        ));
        // With a 64240 << 7 window the server may send 4 MB ahead of what was acked.
        let big = seg(s + 1 + 4_000_000, c + 1, ACK, 1000);
        assert!(in_window(
            &mut w.clone(),
            TcpState::Established,
            Dir::Reply,
            &big
        ));
        // Without scaling on the server's side, both scales are off: 4 MB ahead is invalid.
        let mut w2 = open(&syn(c, 0, SYN, Some(7)));
        assert!(in_window(
            &mut w2,
            TcpState::SynSent,
            Dir::Reply,
            &syn(s, c + 1, SYN | ACK, None)
        ));
        assert!(in_window(
            &mut w2,
            TcpState::SynRecv,
            Dir::Original,
            &seg(c + 1, s + 1, ACK, 0)
        ));
        assert!(!in_window(&mut w2, TcpState::Established, Dir::Reply, &big));
    }

    #[test]
    fn picked_up_flows_are_tracked_liberally_and_syns_reopen_closed_ones() {
        let mut w = open(&seg(5000, 9000, ACK, 100));
        assert!(in_window(
            &mut w,
            TcpState::Established,
            Dir::Reply,
            &seg(1, 2, ACK, 10)
        ));
        let mut w = open(&seg(1, 0, SYN, 0));
        assert!(in_window(
            &mut w,
            TcpState::SynSent,
            Dir::Reply,
            &seg(100, 2, SYN | ACK, 0)
        ));
        // After a close, the client reuses the port with a far-off sequence number.
        assert!(in_window(
            &mut w,
            TcpState::TimeWait,
            Dir::Original,
            &seg(3_000_000_000, 0, SYN, 0)
        ));
        assert!(in_window(
            &mut w,
            TcpState::SynSent,
            Dir::Reply,
            &seg(55, 3_000_000_001, SYN | ACK, 0)
        ));
    }
}
