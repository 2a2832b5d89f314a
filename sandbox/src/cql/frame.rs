//! CQL native protocol v4 framing and primitive encodings (the subset a stand-in node needs).

use bytes::{Buf, BufMut, BytesMut};

pub const RESPONSE_VERSION: u8 = 0x84;
pub const HEADER_LEN: usize = 9;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Opcode {
    Error = 0x00,
    Startup = 0x01,
    Ready = 0x02,
    Options = 0x05,
    Supported = 0x06,
    Query = 0x07,
    Result = 0x08,
    Prepare = 0x09,
    Execute = 0x0A,
    Register = 0x0B,
    Batch = 0x0D,
    AuthResponse = 0x0F,
}

impl Opcode {
    pub fn from_u8(v: u8) -> Option<Opcode> {
        Some(match v {
            0x00 => Opcode::Error,
            0x01 => Opcode::Startup,
            0x02 => Opcode::Ready,
            0x05 => Opcode::Options,
            0x06 => Opcode::Supported,
            0x07 => Opcode::Query,
            0x08 => Opcode::Result,
            0x09 => Opcode::Prepare,
            0x0A => Opcode::Execute,
            0x0B => Opcode::Register,
            0x0D => Opcode::Batch,
            0x0F => Opcode::AuthResponse,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Opcode::Error => "ERROR",
            Opcode::Startup => "STARTUP",
            Opcode::Ready => "READY",
            Opcode::Options => "OPTIONS",
            Opcode::Supported => "SUPPORTED",
            Opcode::Query => "QUERY",
            Opcode::Result => "RESULT",
            Opcode::Prepare => "PREPARE",
            Opcode::Execute => "EXECUTE",
            Opcode::Register => "REGISTER",
            Opcode::Batch => "BATCH",
            Opcode::AuthResponse => "AUTH_RESPONSE",
        }
    }
}

/// A request frame's header fields and body.
#[derive(Debug)]
pub struct Frame {
    pub version: u8,
    pub flags: u8,
    pub stream: i16,
    pub opcode: u8,
    pub body: BytesMut,
}

/// Tries to cut one frame off the front of `buf`.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]);
    if !(0..=256 * 1024 * 1024).contains(&len) {
        return Err(format!("invalid frame length {len}"));
    }
    if buf.len() < HEADER_LEN + len as usize {
        return Ok(None);
    }
    let mut head = buf.split_to(HEADER_LEN);
    let version = head.get_u8();
    let flags = head.get_u8();
    let stream = head.get_i16();
    let opcode = head.get_u8();
    let body = buf.split_to(len as usize);
    Ok(Some(Frame {
        version,
        flags,
        stream,
        opcode,
        body,
    }))
}

/// The header flag of a response whose body starts with a custom payload.
pub const FLAG_CUSTOM_PAYLOAD: u8 = 0x04;

/// Serializes a response frame.
pub fn encode(stream: i16, opcode: Opcode, body: &[u8]) -> Vec<u8> {
    encode_with_payload(stream, opcode, &[], body)
}

/// Serializes a response frame with a custom payload (a `[bytes map]` before the body, and the
/// [`FLAG_CUSTOM_PAYLOAD`] flag), unless `custom_payload` is empty.
pub fn encode_with_payload(
    stream: i16,
    opcode: Opcode,
    custom_payload: &[(&str, &[u8])],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(RESPONSE_VERSION);
    out.push(0);
    out.extend_from_slice(&stream.to_be_bytes());
    out.push(opcode as u8);
    out.extend_from_slice(&[0; 4]);
    if !custom_payload.is_empty() {
        out[1] = FLAG_CUSTOM_PAYLOAD;
        out.short(custom_payload.len() as u16);
        for (key, value) in custom_payload {
            out.string(key);
            out.bytes(Some(value));
        }
    }
    out.extend_from_slice(body);
    let len = (out.len() - HEADER_LEN) as i32;
    out[5..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    out
}

/// Reading primitives from a request body; every read is bounds-checked.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!(
                "truncated body: wanted {n} bytes, {} left",
                self.0.len()
            ));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn short(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn int(&mut self) -> Result<i32, String> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn long(&mut self) -> Result<i64, String> {
        let b = self.take(8)?;
        Ok(i64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    pub fn string(&mut self) -> Result<String, String> {
        let n = self.short()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
    pub fn long_string(&mut self) -> Result<String, String> {
        let n = self.int()?;
        if n < 0 {
            return Err("negative long string length".into());
        }
        Ok(String::from_utf8_lossy(self.take(n as usize)?).into_owned())
    }
    pub fn short_bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.short()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    /// `[bytes]`: `None` for null (negative length).
    pub fn bytes(&mut self) -> Result<Option<Vec<u8>>, String> {
        let n = self.int()?;
        if n < 0 {
            return Ok(None);
        }
        Ok(Some(self.take(n as usize)?.to_vec()))
    }
    pub fn string_map(&mut self) -> Result<Vec<(String, String)>, String> {
        let n = self.short()?;
        (0..n)
            .map(|_| Ok((self.string()?, self.string()?)))
            .collect()
    }
    pub fn string_list(&mut self) -> Result<Vec<String>, String> {
        let n = self.short()?;
        (0..n).map(|_| self.string()).collect()
    }
}

/// Writing primitives into a response body.
pub trait Writer {
    fn short(&mut self, v: u16);
    fn int(&mut self, v: i32);
    fn string(&mut self, s: &str);
    fn short_bytes(&mut self, b: &[u8]);
    fn bytes(&mut self, b: Option<&[u8]>);
    fn string_multimap(&mut self, m: &[(&str, &[&str])]);
}

impl Writer for Vec<u8> {
    fn short(&mut self, v: u16) {
        self.put_u16(v);
    }
    fn int(&mut self, v: i32) {
        self.put_i32(v);
    }
    fn string(&mut self, s: &str) {
        self.put_u16(s.len() as u16);
        self.extend_from_slice(s.as_bytes());
    }
    fn short_bytes(&mut self, b: &[u8]) {
        self.put_u16(b.len() as u16);
        self.extend_from_slice(b);
    }
    fn bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.put_i32(b.len() as i32);
                self.extend_from_slice(b);
            }
            None => self.put_i32(-1),
        }
    }
    fn string_multimap(&mut self, m: &[(&str, &[&str])]) {
        self.put_u16(m.len() as u16);
        for (k, vs) in m {
            self.string(k);
            self.put_u16(vs.len() as u16);
            for v in *vs {
                self.string(v);
            }
        }
    }
}

/// CQL error codes used by the node.
pub mod error_code {
    pub const SERVER_ERROR: i32 = 0x0000;
    pub const PROTOCOL_ERROR: i32 = 0x000A;
    pub const UNAVAILABLE: i32 = 0x1000;
    pub const OVERLOADED: i32 = 0x1001;
    pub const WRITE_TIMEOUT: i32 = 0x1100;
    pub const READ_TIMEOUT: i32 = 0x1200;
    pub const SYNTAX_ERROR: i32 = 0x2000;
    pub const INVALID: i32 = 0x2200;
    pub const ALREADY_EXISTS: i32 = 0x2400;
    pub const UNPREPARED: i32 = 0x2500;
}

/// Consistency levels by protocol code.
pub fn consistency_name(c: u16) -> &'static str {
    match c {
        0x0000 => "ANY",
        0x0001 => "ONE",
        0x0002 => "TWO",
        0x0003 => "THREE",
        0x0004 => "QUORUM",
        0x0005 => "ALL",
        0x0006 => "LOCAL_QUORUM",
        0x0007 => "EACH_QUORUM",
        0x0008 => "SERIAL",
        0x0009 => "LOCAL_SERIAL",
        0x000A => "LOCAL_ONE",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_custom_payload_comes_before_the_body_under_its_flag() {
        let plain = encode(7, Opcode::Result, &[0, 0, 0, 1]);
        assert_eq!(plain[1], 0);
        assert_eq!(plain[HEADER_LEN..], [0, 0, 0, 1]);
        let framed = encode_with_payload(7, Opcode::Result, &[("k", &[9, 9])], &[0, 0, 0, 1]);
        assert_eq!(framed[1], FLAG_CUSTOM_PAYLOAD);
        let mut r = Reader(&framed[HEADER_LEN..]);
        assert_eq!(r.short().unwrap(), 1, "one entry");
        assert_eq!(r.string().unwrap(), "k");
        assert_eq!(r.bytes().unwrap(), Some(vec![9, 9]));
        assert_eq!(r.int().unwrap(), 1, "then the body");
        let len = i32::from_be_bytes(framed[5..HEADER_LEN].try_into().unwrap());
        assert_eq!(len as usize, framed.len() - HEADER_LEN);
    }
}
