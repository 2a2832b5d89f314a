//! CQL types of the stand-in node: parsing declared types, protocol type options, literal
//! encoding, type-aware comparison and an order-preserving key encoding for clustering order.

use std::cmp::Ordering;
use std::net::IpAddr;

use crate::cql::frame::Writer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CqlType {
    Ascii,
    Text,
    Int,
    BigInt,
    SmallInt,
    TinyInt,
    Double,
    Float,
    Boolean,
    Uuid,
    TimeUuid,
    Timestamp,
    Date,
    Blob,
    Inet,
    List(Box<CqlType>),
    Set(Box<CqlType>),
    Map(Box<CqlType>, Box<CqlType>),
}

impl CqlType {
    /// Parses a declared type such as `text`, `map<text, text>` or `frozen<set<text>>`.
    pub fn parse(s: &str) -> Result<CqlType, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(inner) = s.strip_prefix("frozen<").and_then(|r| r.strip_suffix('>')) {
            return CqlType::parse(inner);
        }
        if let Some(inner) = s.strip_prefix("list<").and_then(|r| r.strip_suffix('>')) {
            return Ok(CqlType::List(Box::new(CqlType::parse(inner)?)));
        }
        if let Some(inner) = s.strip_prefix("set<").and_then(|r| r.strip_suffix('>')) {
            return Ok(CqlType::Set(Box::new(CqlType::parse(inner)?)));
        }
        if let Some(inner) = s.strip_prefix("map<").and_then(|r| r.strip_suffix('>')) {
            let (k, v) = split_top_level_comma(inner).ok_or_else(|| format!("bad map type {s}"))?;
            return Ok(CqlType::Map(
                Box::new(CqlType::parse(k)?),
                Box::new(CqlType::parse(v)?),
            ));
        }
        Ok(match s.as_str() {
            "ascii" => CqlType::Ascii,
            "text" | "varchar" => CqlType::Text,
            "int" => CqlType::Int,
            "bigint" | "counter" => CqlType::BigInt,
            "smallint" => CqlType::SmallInt,
            "tinyint" => CqlType::TinyInt,
            "double" => CqlType::Double,
            "float" => CqlType::Float,
            "boolean" => CqlType::Boolean,
            "uuid" => CqlType::Uuid,
            "timeuuid" => CqlType::TimeUuid,
            "timestamp" => CqlType::Timestamp,
            "date" => CqlType::Date,
            "blob" => CqlType::Blob,
            "inet" => CqlType::Inet,
            other => return Err(format!("unsupported type '{other}' (the stand-in node supports text, ascii, int, bigint, smallint, tinyint, double, float, boolean, uuid, timeuuid, timestamp, date, blob, inet, and list/set/map of them)")),
        })
    }

    /// The CQL name, as stored in system_schema.columns.
    pub fn cql_name(&self) -> String {
        match self {
            CqlType::Ascii => "ascii".into(),
            CqlType::Text => "text".into(),
            CqlType::Int => "int".into(),
            CqlType::BigInt => "bigint".into(),
            CqlType::SmallInt => "smallint".into(),
            CqlType::TinyInt => "tinyint".into(),
            CqlType::Double => "double".into(),
            CqlType::Float => "float".into(),
            CqlType::Boolean => "boolean".into(),
            CqlType::Uuid => "uuid".into(),
            CqlType::TimeUuid => "timeuuid".into(),
            CqlType::Timestamp => "timestamp".into(),
            CqlType::Date => "date".into(),
            CqlType::Blob => "blob".into(),
            CqlType::Inet => "inet".into(),
            CqlType::List(t) => format!("list<{}>", t.cql_name()),
            CqlType::Set(t) => format!("set<{}>", t.cql_name()),
            CqlType::Map(k, v) => format!("map<{}, {}>", k.cql_name(), v.cql_name()),
        }
    }

    /// Writes the protocol `[option]` of this type.
    pub fn write_option(&self, out: &mut Vec<u8>) {
        let id: u16 = match self {
            CqlType::Ascii => 0x0001,
            CqlType::BigInt => 0x0002,
            CqlType::Blob => 0x0003,
            CqlType::Boolean => 0x0004,
            CqlType::Double => 0x0007,
            CqlType::Float => 0x0008,
            CqlType::Int => 0x0009,
            CqlType::Timestamp => 0x000B,
            CqlType::Uuid => 0x000C,
            CqlType::Text => 0x000D,
            CqlType::TimeUuid => 0x000F,
            CqlType::Inet => 0x0010,
            CqlType::Date => 0x0011,
            CqlType::SmallInt => 0x0013,
            CqlType::TinyInt => 0x0014,
            CqlType::List(_) => 0x0020,
            CqlType::Map(_, _) => 0x0021,
            CqlType::Set(_) => 0x0022,
        };
        out.short(id);
        match self {
            CqlType::List(t) | CqlType::Set(t) => t.write_option(out),
            CqlType::Map(k, v) => {
                k.write_option(out);
                v.write_option(out);
            }
            _ => {}
        }
    }

    /// Checks that a bound value has the shape of this type.
    pub fn validate(&self, v: &[u8]) -> Result<(), String> {
        let fixed = match self {
            CqlType::Int | CqlType::Float | CqlType::Date => Some(4),
            CqlType::BigInt | CqlType::Timestamp | CqlType::Double => Some(8),
            CqlType::SmallInt => Some(2),
            CqlType::TinyInt | CqlType::Boolean => Some(1),
            CqlType::Uuid | CqlType::TimeUuid => Some(16),
            CqlType::Text | CqlType::Ascii => {
                return std::str::from_utf8(v)
                    .map(|_| ())
                    .map_err(|_| "text value is not valid UTF-8".into())
            }
            CqlType::Inet => {
                return if v.len() == 4 || v.len() == 16 {
                    Ok(())
                } else {
                    Err("inet value must be 4 or 16 bytes".into())
                }
            }
            _ => None,
        };
        match fixed {
            Some(n) if v.len() != n => Err(format!(
                "expected {n} bytes for {}, got {}",
                self.cql_name(),
                v.len()
            )),
            _ => Ok(()),
        }
    }

    /// Compares two serialized values of this type in CQL order.
    pub fn compare(&self, a: &[u8], b: &[u8]) -> Ordering {
        fn int(v: &[u8]) -> i64 {
            let mut x: i64 = if v.first().is_some_and(|b| b & 0x80 != 0) {
                -1
            } else {
                0
            };
            for byte in v {
                x = (x << 8) | i64::from(*byte);
            }
            x
        }
        match self {
            CqlType::Int
            | CqlType::BigInt
            | CqlType::SmallInt
            | CqlType::TinyInt
            | CqlType::Timestamp => int(a).cmp(&int(b)),
            CqlType::Double if a.len() == 8 && b.len() == 8 => {
                let x = f64::from_be_bytes(a.try_into().expect("8 bytes"));
                let y = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                x.total_cmp(&y)
            }
            CqlType::Float if a.len() == 4 && b.len() == 4 => {
                let x = f32::from_be_bytes(a.try_into().expect("4 bytes"));
                let y = f32::from_be_bytes(b.try_into().expect("4 bytes"));
                x.total_cmp(&y)
            }
            CqlType::Boolean => a.cmp(b),
            // Version first, then (for time-based UUIDs) the timestamp, then the bytes.
            CqlType::Uuid | CqlType::TimeUuid if a.len() == 16 && b.len() == 16 => {
                let va = a[6] >> 4;
                let vb = b[6] >> 4;
                va.cmp(&vb).then_with(|| {
                    if va == 1 {
                        uuid_time(a).cmp(&uuid_time(b)).then_with(|| a.cmp(b))
                    } else {
                        a.cmp(b)
                    }
                })
            }
            _ => a.cmp(b),
        }
    }

    /// Appends an order-preserving encoding of `v` (bytewise order == CQL order).
    pub fn sort_key(&self, v: Option<&[u8]>, descending: bool, out: &mut Vec<u8>) {
        let start = out.len();
        match v {
            None => out.push(0),
            Some(v) => {
                out.push(1);
                match self {
                    CqlType::Int
                    | CqlType::BigInt
                    | CqlType::SmallInt
                    | CqlType::TinyInt
                    | CqlType::Timestamp => {
                        let mut b = v.to_vec();
                        if let Some(first) = b.first_mut() {
                            *first ^= 0x80;
                        }
                        out.extend_from_slice(&b);
                    }
                    CqlType::Uuid | CqlType::TimeUuid if v.len() == 16 => {
                        out.push(v[6] >> 4);
                        if v[6] >> 4 == 1 {
                            out.extend_from_slice(&uuid_time(v).to_be_bytes());
                        }
                        out.extend_from_slice(v);
                    }
                    _ => {
                        for &b in v {
                            out.push(b);
                            if b == 0 {
                                out.push(0xFF);
                            }
                        }
                        out.extend_from_slice(&[0, 0]);
                    }
                }
            }
        }
        if descending {
            for b in &mut out[start..] {
                *b = !*b;
            }
        }
    }

    /// Encodes a literal from query text as a value of this type.
    pub fn encode_literal(&self, lit: &Literal) -> Result<Option<Vec<u8>>, String> {
        let bad = || format!("cannot use {lit:?} as a {} value", self.cql_name());
        Ok(Some(match (self, lit) {
            (_, Literal::Null) => return Ok(None),
            (CqlType::Text | CqlType::Ascii, Literal::Str(s)) => s.as_bytes().to_vec(),
            (CqlType::Int, Literal::Int(i)) => {
                i32::try_from(*i).map_err(|_| bad())?.to_be_bytes().to_vec()
            }
            (CqlType::BigInt, Literal::Int(i)) => i.to_be_bytes().to_vec(),
            (CqlType::SmallInt, Literal::Int(i)) => {
                i16::try_from(*i).map_err(|_| bad())?.to_be_bytes().to_vec()
            }
            (CqlType::TinyInt, Literal::Int(i)) => {
                i8::try_from(*i).map_err(|_| bad())?.to_be_bytes().to_vec()
            }
            (CqlType::Double, Literal::Int(i)) => (*i as f64).to_be_bytes().to_vec(),
            (CqlType::Double, Literal::Float(f)) => f.to_be_bytes().to_vec(),
            (CqlType::Float, Literal::Int(i)) => (*i as f32).to_be_bytes().to_vec(),
            (CqlType::Float, Literal::Float(f)) => (*f as f32).to_be_bytes().to_vec(),
            (CqlType::Boolean, Literal::Bool(b)) => vec![u8::from(*b)],
            (CqlType::Uuid | CqlType::TimeUuid, Literal::Uuid(u)) => u.to_vec(),
            (CqlType::Uuid | CqlType::TimeUuid, Literal::Str(s)) => uuid::Uuid::parse_str(s)
                .map_err(|_| bad())?
                .as_bytes()
                .to_vec(),
            (CqlType::Timestamp, Literal::Int(i)) => i.to_be_bytes().to_vec(),
            (CqlType::Timestamp, Literal::Str(s)) => {
                parse_timestamp(s).ok_or_else(bad)?.to_be_bytes().to_vec()
            }
            (CqlType::Date, Literal::Str(s)) => {
                let days = parse_date(s).ok_or_else(bad)?;
                ((days + (1i64 << 31)) as u32).to_be_bytes().to_vec()
            }
            (CqlType::Date, Literal::Int(i)) => (*i as u32).to_be_bytes().to_vec(),
            (CqlType::Blob, Literal::Blob(b)) => b.clone(),
            (CqlType::Inet, Literal::Str(s)) => match s.parse::<IpAddr>().map_err(|_| bad())? {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            },
            (CqlType::List(t) | CqlType::Set(t), Literal::List(items)) => {
                let mut out = Vec::new();
                out.int(items.len() as i32);
                for item in items {
                    let v = t.encode_literal(item)?;
                    out.bytes(v.as_deref());
                }
                out
            }
            (CqlType::Map(k, v), Literal::Map(entries)) => {
                let mut out = Vec::new();
                out.int(entries.len() as i32);
                for (key, val) in entries {
                    out.bytes(k.encode_literal(key)?.as_deref());
                    out.bytes(v.encode_literal(val)?.as_deref());
                }
                out
            }
            _ => return Err(bad()),
        }))
    }
}

fn uuid_time(v: &[u8]) -> u64 {
    let low = u64::from(u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
    let mid = u64::from(u16::from_be_bytes([v[4], v[5]]));
    let high = u64::from(u16::from_be_bytes([v[6], v[7]]) & 0x0FFF);
    (high << 48) | (mid << 32) | low
}

fn split_top_level_comma(s: &str) -> Option<(&str, &str)> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '<' => depth += 1,
            '>' => depth -= 1,
            ',' if depth == 0 => return Some((&s[..i], &s[i + 1..])),
            _ => {}
        }
    }
    None
}

/// A literal in query text.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Uuid([u8; 16]),
    Blob(Vec<u8>),
    List(Vec<Literal>),
    Map(Vec<(Literal, Literal)>),
}

/// Days since 1970-01-01 of a `YYYY-MM-DD` date.
pub fn parse_date(s: &str) -> Option<i64> {
    let mut it = s.trim().splitn(3, '-');
    let y: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let d: i64 = it.next()?.get(..2)?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Milliseconds since the epoch of `YYYY-MM-DD[( |T)HH:MM[:SS[.fff]]][Z|+HHMM|+HH:MM]`.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let days = parse_date(s.get(..10)?)?;
    let mut rest = s.get(10..)?.trim_start_matches(['T', ' ']);
    let mut ms = 0i64;
    if rest.len() >= 5 && rest.as_bytes()[2] == b':' {
        let h: i64 = rest.get(..2)?.parse().ok()?;
        let mi: i64 = rest.get(3..5)?.parse().ok()?;
        ms += (h * 3600 + mi * 60) * 1000;
        rest = &rest[5..];
        if let Some(r) = rest.strip_prefix(':') {
            let sec: i64 = r.get(..2)?.parse().ok()?;
            ms += sec * 1000;
            rest = &r[2..];
            if let Some(r) = rest.strip_prefix('.') {
                let digits: String = r.chars().take_while(char::is_ascii_digit).collect();
                let frac = format!("{:0<3}", &digits[..digits.len().min(3)]);
                ms += frac.parse::<i64>().ok()?;
                rest = &r[digits.len()..];
            }
        }
    }
    let offset_min = match rest.trim() {
        "" | "Z" | "z" => 0,
        tz => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let digits: String = tz[1..].chars().filter(char::is_ascii_digit).collect();
            let h: i64 = digits.get(..2)?.parse().ok()?;
            let m: i64 = digits.get(2..4).unwrap_or("0").parse().ok()?;
            sign * (h * 60 + m)
        }
    };
    Some(days * 86_400_000 + ms - offset_min * 60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_declared_types() {
        assert_eq!(
            CqlType::parse("map<text, text>").unwrap(),
            CqlType::Map(Box::new(CqlType::Text), Box::new(CqlType::Text))
        );
        assert_eq!(
            CqlType::parse("frozen<set<text>>").unwrap(),
            CqlType::Set(Box::new(CqlType::Text))
        );
        assert!(CqlType::parse("decimal")
            .unwrap_err()
            .contains("unsupported"));
    }

    #[test]
    fn sort_keys_follow_type_and_direction() {
        let key = |t: &CqlType, v: &[u8], desc: bool| {
            let mut out = Vec::new();
            t.sort_key(Some(v), desc, &mut out);
            out
        };
        let t = CqlType::BigInt;
        let (neg, pos) = ((-5i64).to_be_bytes(), 7i64.to_be_bytes());
        assert!(key(&t, &neg, false) < key(&t, &pos, false));
        assert!(key(&t, &neg, true) > key(&t, &pos, true));
        let s = CqlType::Text;
        assert!(key(&s, b"ab", false) < key(&s, b"abc", false));
        assert!(key(&s, b"ab", true) > key(&s, b"abc", true));
    }

    #[test]
    fn parses_timestamps_and_dates() {
        assert_eq!(
            parse_timestamp("2025-11-24T10:00:00.123Z"),
            Some(1_763_978_400_123)
        );
        assert_eq!(
            parse_timestamp("2025-11-24 12:00:00+0200"),
            Some(1_763_978_400_000)
        );
        assert_eq!(parse_date("1970-01-02"), Some(1));
    }
}
