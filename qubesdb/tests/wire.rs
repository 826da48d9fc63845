//! The wire format byte for byte (qubes-core-qubesdb `include/qubesdb.h`): encoding against
//! hand-written bytes, and every malformed input against the error it must give.

use qubesdb::wire::{
    decode_prefix, encode, salvage_path, Decoder, Header, Message, MsgType, WireError,
};

/// A header written out field by field, the way `struct qdb_hdr` lays it out on x86-64:
/// type, 64 path bytes NUL-padded, 3 padding bytes, data_len little-endian.
fn raw(msg_type: u8, path: &[u8], padding: [u8; 3], data_len: [u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = vec![msg_type];
    let mut field = [0u8; 64];
    field[..path.len()].copy_from_slice(path);
    out.extend_from_slice(&field);
    out.extend_from_slice(&padding);
    out.extend_from_slice(&data_len);
    out.extend_from_slice(data);
    out
}

#[test]
fn write_of_qubes_ip_is_exactly_these_bytes() {
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        1,                                                     // CMD_WRITE
        b'/', b'q', b'u', b'b', b'e', b's', b'-', b'i', b'p',  // path, 9 bytes
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,        // NUL padding to 64 bytes
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,                                               // padding (bytes 65..68)
        10, 0, 0, 0,                                           // data_len = 10, LE
        b'1', b'0', b'.', b'1', b'3', b'7', b'.', b'0', b'.', b'6',
    ];
    assert_eq!(expected.len(), 72 + 10);
    let got = encode(MsgType::CmdWrite, "/qubes-ip", b"10.137.0.6").expect("encode");
    assert_eq!(got, expected);
    let back = Message::decode(&expected).expect("decode");
    assert_eq!(
        back,
        Message::new(MsgType::CmdWrite, "/qubes-ip", b"10.137.0.6".to_vec())
    );
}

#[test]
fn every_message_type_encodes_as_written_by_hand() {
    let none = [0u8; 4];
    let cases: Vec<(MsgType, &str, &[u8], Vec<u8>)> = vec![
        (
            MsgType::CmdRead,
            "/qubes-ip",
            b"",
            raw(0, b"/qubes-ip", [0; 3], none, b""),
        ),
        (
            MsgType::CmdWrite,
            "/a",
            b"xyz",
            raw(1, b"/a", [0; 3], [3, 0, 0, 0], b"xyz"),
        ),
        (
            MsgType::CmdMultiread,
            "",
            b"",
            raw(2, b"", [0; 3], none, b""),
        ),
        (
            MsgType::CmdList,
            "/qubes-firewall/",
            b"",
            raw(3, b"/qubes-firewall/", [0; 3], none, b""),
        ),
        (
            MsgType::CmdRm,
            "/qubes-firewall/10.137.0.10/",
            b"",
            raw(4, b"/qubes-firewall/10.137.0.10/", [0; 3], none, b""),
        ),
        (
            MsgType::CmdWatch,
            "/qubes-firewall/",
            b"",
            raw(5, b"/qubes-firewall/", [0; 3], none, b""),
        ),
        (
            MsgType::CmdUnwatch,
            "/x",
            b"",
            raw(6, b"/x", [0; 3], none, b""),
        ),
        (MsgType::RespOk, "/x", b"", raw(7, b"/x", [0; 3], none, b"")),
        (
            MsgType::RespErrorNoent,
            "/missing",
            b"",
            raw(8, b"/missing", [0; 3], none, b""),
        ),
        (MsgType::RespError, "", b"", raw(9, b"", [0; 3], none, b"")),
        (
            MsgType::RespRead,
            "/name",
            b"sys-firewall",
            raw(10, b"/name", [0; 3], [12, 0, 0, 0], b"sys-firewall"),
        ),
        (
            MsgType::RespMultiread,
            "/qubes-firewall/10.137.0.10/policy",
            b"drop",
            raw(
                11,
                b"/qubes-firewall/10.137.0.10/policy",
                [0; 3],
                [4, 0, 0, 0],
                b"drop",
            ),
        ),
        (
            MsgType::RespList,
            "/qubes-ip",
            b"",
            raw(12, b"/qubes-ip", [0; 3], none, b""),
        ),
        (
            MsgType::RespWatch,
            "/qubes-firewall/10.137.0.10",
            b"",
            raw(13, b"/qubes-firewall/10.137.0.10", [0; 3], none, b""),
        ),
    ];
    assert_eq!(cases.len(), 14, "one case per type");
    for (t, path, data, expected) in cases {
        let got = encode(t, path, data).expect("encode");
        assert_eq!(got, expected, "{t} {path:?}");
        assert_eq!(got[0], t.as_u8());
        let back = Message::decode(&expected).expect("decode");
        assert_eq!(back, Message::new(t, path, data.to_vec()), "{t}");
    }
}

#[test]
fn data_len_is_little_endian_and_3072_is_the_largest() {
    let value = vec![b'v'; 3072];
    let got = encode(MsgType::CmdWrite, "/big", &value).expect("3072 bytes fit");
    assert_eq!(&got[68..72], &[0x00, 0x0c, 0x00, 0x00]);
    let got = encode(MsgType::CmdWrite, "/k", &[b'v'; 258]).expect("encode");
    assert_eq!(&got[68..72], &[2, 1, 0, 0]);
    assert_eq!(
        encode(MsgType::CmdWrite, "/big", &[b'v'; 3073]),
        Err(WireError::DataTooLong { len: 3073 })
    );
}

#[test]
fn longest_path_is_63_bytes() {
    let path = format!("/{}", "a".repeat(62));
    let got = encode(MsgType::CmdRead, &path, b"").expect("63 bytes fit");
    assert_eq!(got[64], 0, "the NUL is the last byte of the field");
    assert_eq!(Message::decode(&got).expect("decode").path, path);
    let too_long = format!("/{}", "a".repeat(63));
    assert_eq!(
        encode(MsgType::CmdRead, &too_long, b""),
        Err(WireError::PathTooLong { len: 64 })
    );
}

#[test]
fn encoding_refuses_bad_paths() {
    assert_eq!(
        encode(MsgType::CmdRead, "/foo*", b""),
        Err(WireError::PathBadChar { byte: b'*', at: 4 })
    );
    assert_eq!(
        encode(MsgType::CmdRead, "-foo", b""),
        Err(WireError::PathLeadingDash)
    );
    assert_eq!(
        encode(MsgType::CmdRead, "/é", b""),
        Err(WireError::PathBadChar { byte: 0xc3, at: 1 })
    );
}

/// Decodes `bytes` as one whole message and returns the error's text.
fn decode_error(bytes: &[u8]) -> (WireError, String) {
    let err = Message::decode(bytes).expect_err("must not decode");
    let text = err.to_string();
    (err, text)
}

#[test]
fn short_header() {
    let whole = raw(0, b"/a", [0; 3], [0; 4], b"");
    let (err, text) = decode_error(&whole[..71]);
    assert_eq!(err, WireError::ShortHeader { got: 71 });
    assert_eq!(text, "short header: 71 of 72 bytes");
    assert_eq!(Header::parse(&[]), Err(WireError::ShortHeader { got: 0 }));
    // In a stream, a short header only means "wait".
    assert_eq!(decode_prefix(&whole[..71]), Ok(None));
}

#[test]
fn unknown_type() {
    for t in [14u8, 42, 255] {
        let (err, text) = decode_error(&raw(t, b"/a", [0; 3], [0; 4], b""));
        assert_eq!(err, WireError::UnknownType(t));
        assert_eq!(text, format!("unknown message type {t}"));
    }
}

#[test]
fn path_without_nul() {
    let mut bytes = raw(0, b"", [0; 3], [0; 4], b"");
    bytes[1..65].fill(b'a');
    let (err, text) = decode_error(&bytes);
    assert_eq!(err, WireError::PathNotTerminated);
    assert_eq!(text, "path is not NUL-terminated within 64 bytes");
}

#[test]
fn bad_path_characters() {
    let (err, text) = decode_error(&raw(0, b"/qubes*ip", [0; 3], [0; 4], b""));
    assert_eq!(err, WireError::PathBadChar { byte: b'*', at: 6 });
    assert_eq!(text, "path contains '*' at byte 6");
    let (_, text) = decode_error(&raw(0, b"/a b", [0; 3], [0; 4], b""));
    assert_eq!(text, "path contains ' ' at byte 2");
    let (_, text) = decode_error(&raw(0, b"/\x01", [0; 3], [0; 4], b""));
    assert_eq!(text, "path contains byte 0x01 at byte 1");
    let (_, text) = decode_error(&raw(0, b"/\xff", [0; 3], [0; 4], b""));
    assert_eq!(text, "path contains byte 0xff at byte 1");
}

#[test]
fn leading_dash() {
    let (err, text) = decode_error(&raw(0, b"-rf", [0; 3], [0; 4], b""));
    assert_eq!(err, WireError::PathLeadingDash);
    assert_eq!(text, "path starts with '-'");
}

#[test]
fn oversize_data_len() {
    let (err, text) = decode_error(&raw(1, b"/a", [0; 3], 5000u32.to_le_bytes(), b""));
    assert_eq!(err, WireError::DataTooLong { len: 5000 });
    assert_eq!(text, "data_len 5000 exceeds QDB_MAX_DATA (3072)");
    let (err, _) = decode_error(&raw(1, b"/a", [0; 3], 3073u32.to_le_bytes(), b""));
    assert_eq!(err, WireError::DataTooLong { len: 3073 });
    let (_, text) = decode_error(&raw(1, b"/a", [0; 3], [0xff; 4], b""));
    assert_eq!(text, "data_len 4294967295 exceeds QDB_MAX_DATA (3072)");
    // A stream decoder reports it as soon as the header is there, without waiting for data.
    let mut d = Decoder::new();
    d.feed(&raw(1, b"/a", [0; 3], 5000u32.to_le_bytes(), b""));
    assert_eq!(d.next_message(), Err(WireError::DataTooLong { len: 5000 }));
}

#[test]
fn truncated_and_trailing_data() {
    let whole = raw(1, b"/a", [0; 3], [10, 0, 0, 0], b"0123456789");
    let (err, text) = decode_error(&whole[..76]);
    assert_eq!(
        err,
        WireError::TruncatedData {
            data_len: 10,
            got: 4
        }
    );
    assert_eq!(
        text,
        "truncated data: data_len is 10 but only 4 data bytes follow the header"
    );
    assert_eq!(decode_prefix(&whole[..76]), Ok(None));
    let mut longer = whole.clone();
    longer.push(b'!');
    let (err, text) = decode_error(&longer);
    assert_eq!(err, WireError::TrailingBytes { extra: 1 });
    assert_eq!(text, "1 unexpected bytes follow the message");
}

#[test]
fn padding_and_bytes_after_the_nul_are_ignored() {
    // Upstream sends its stack header as is: garbage padding, garbage after the path's NUL.
    let mut bytes = raw(7, b"/a", [0xde, 0xad, 0xbe], [0; 4], b"");
    bytes[4..65].fill(0x5a);
    let m = Message::decode(&bytes).expect("decode");
    assert_eq!(m, Message::bare(MsgType::RespOk, "/a"));
}

#[test]
fn the_empty_path_decodes() {
    let m = Message::decode(&raw(11, b"", [0; 3], [0; 4], b"")).expect("decode");
    assert_eq!(m, Message::bare(MsgType::RespMultiread, ""));
}

#[test]
fn stream_decoding_across_and_within_reads() {
    let mut stream = Vec::new();
    stream.extend(encode(MsgType::RespMultiread, "/a", b"1").expect("encode"));
    stream.extend(encode(MsgType::RespWatch, "/w", b"").expect("encode"));
    stream.extend(encode(MsgType::RespMultiread, "", b"").expect("encode"));
    for chunk in [1, 7, 72, 73, 100, stream.len()] {
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            d.feed(piece);
            while let Some(m) = d.next_message().expect("valid stream") {
                got.push((m.msg_type, m.path));
            }
        }
        assert_eq!(
            got,
            [
                (MsgType::RespMultiread, "/a".to_string()),
                (MsgType::RespWatch, "/w".to_string()),
                (MsgType::RespMultiread, String::new()),
            ],
            "chunks of {chunk}"
        );
        assert!(d.pending().is_empty());
    }
    let (m, used) = decode_prefix(&stream).expect("valid").expect("whole");
    assert_eq!((m.path.as_str(), used), ("/a", 73));
}

#[test]
fn salvaged_path_is_empty_when_the_path_is_bad() {
    assert_eq!(salvage_path(&raw(42, b"/ok", [0; 3], [0; 4], b"")), "/ok");
    assert_eq!(salvage_path(&raw(0, b"/no*", [0; 3], [0; 4], b"")), "");
    assert_eq!(salvage_path(&[0u8; 10]), "");
}
