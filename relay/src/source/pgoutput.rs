//! Decoding of the pgoutput messages the wal source needs: Relation and Insert (protocol
//! version 1, text format). Begin, Commit and logical decoding messages arrive already parsed
//! by the replication client.
//!
//! Format: <https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html>.
//! Every other message type (Update, Delete, Truncate, Type, Origin) is ignored: the relay only
//! publishes inserts.

/// A column of a relation, as announced by a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One column value of a tuple, in text format: a slice of the message it was decoded from
/// (the event copies what it keeps, once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value (only in updates; never in an insert).
    Unchanged,
    Text(&'a [u8]),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Relation(Relation),
    Insert {
        relation: u32,
        values: Vec<Value<'a>>,
    },
    /// Anything the relay does not act on.
    Other(u8),
}

/// The oid of `bytea`, whose text form is `\x<hex>`.
pub const BYTEA_OID: u32 = 17;
pub const JSON_OID: u32 = 114;
pub const JSONB_OID: u32 = 3802;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("pgoutput message truncated at byte {}", self.pos))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let rest = &self.buf[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("pgoutput string without terminator")?;
        let s = String::from_utf8_lossy(&rest[..len]).into_owned();
        self.pos += len + 1;
        Ok(s)
    }
}

pub fn decode(data: &[u8]) -> Result<Message<'_>, String> {
    let mut r = Reader { buf: data, pos: 0 };
    let tag = r.u8()?;
    match tag {
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.cstr()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column { name, type_oid });
            }
            Ok(Message::Relation(Relation {
                id,
                // pgoutput sends an empty namespace for pg_catalog only; tables are qualified.
                namespace,
                name,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32()?;
            let marker = r.u8()?;
            if marker != b'N' {
                return Err(format!("unexpected tuple marker {marker:#x} in Insert"));
            }
            let n = r.u16()?;
            let mut values = Vec::with_capacity(n as usize);
            for _ in 0..n {
                values.push(match r.u8()? {
                    b'n' => Value::Null,
                    b'u' => Value::Unchanged,
                    b't' | b'b' => {
                        let len = r.u32()? as usize;
                        Value::Text(r.take(len)?)
                    }
                    other => return Err(format!("unknown tuple column kind {other:#x}")),
                });
            }
            Ok(Message::Insert { relation, values })
        }
        other => Ok(Message::Other(other)),
    }
}

/// Decodes the text form of a bytea (`\x48656c6c6f`).
pub fn bytea_from_text(text: &[u8]) -> Result<Vec<u8>, String> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or("bytea value is not in hex format")?;
    if hex.len() % 2 != 0 {
        return Err("bytea hex value has an odd length".into());
    }
    hex.chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| "bytea value has a non-hex digit".to_string())
        })
        .collect()
}

/// Milliseconds since the Unix epoch of a timestamptz in ISO text form, as the walsender prints
/// it with `DateStyle=ISO`: `2026-11-24 13:14:30.123456+00` (offset `+HH`, `+HH:MM` or
/// `+HH:MM:SS`). `None` for anything else (including `infinity`).
pub fn timestamptz_millis(text: &str) -> Option<i64> {
    let (date, rest) = text.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let sign_at = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(sign_at);
    let mut t = time.splitn(3, ':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let seconds: f64 = t.next()?.parse().ok()?;
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let mut o = offset[1..].split(':');
    let off_h: i64 = o.next()?.parse().ok()?;
    let off_m: i64 = o.next().map(|s| s.parse().ok()).unwrap_or(Some(0))?;
    let off_s: i64 = o.next().map(|s| s.parse().ok()).unwrap_or(Some(0))?;
    // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let local_ms = ((days * 86_400 + hh * 3600 + mm * 60) as f64 + seconds) * 1000.0;
    let offset_ms = sign * (off_h * 3600 + off_m * 60 + off_s) * 1000;
    Some(local_ms.round() as i64 - offset_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn decodes_relation_and_insert() {
        let mut rel = vec![b'R'];
        rel.extend(16385u32.to_be_bytes());
        rel.extend(cstr("public"));
        rel.extend(cstr("outbox"));
        rel.push(b'd');
        rel.extend(2u16.to_be_bytes());
        for (name, oid) in [("id", 2950u32), ("payload", 3802)] {
            rel.push(1);
            rel.extend(cstr(name));
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation(r) = decode(&rel).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("public", "outbox")
        );
        assert_eq!(
            r.columns[1],
            Column {
                name: "payload".into(),
                type_oid: 3802
            }
        );

        let mut ins = vec![b'I'];
        ins.extend(16385u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(2u16.to_be_bytes());
        ins.push(b't');
        ins.extend(3u32.to_be_bytes());
        ins.extend(b"abc");
        ins.push(b'n');
        assert_eq!(
            decode(&ins).unwrap(),
            Message::Insert {
                relation: 16385,
                values: vec![Value::Text(b"abc"), Value::Null]
            }
        );
        assert!(
            decode(&ins[..ins.len() - 3]).is_err(),
            "truncated input is an error"
        );
        assert_eq!(decode(b"T\0\0").unwrap(), Message::Other(b'T'));
    }

    #[test]
    fn parses_timestamptz_text() {
        assert_eq!(timestamptz_millis("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(
            timestamptz_millis("2026-11-24 13:14:30.123456+00"),
            Some(1_795_526_070_123)
        );
        assert_eq!(
            timestamptz_millis("2026-11-24 15:14:30.123456+02"),
            Some(1_795_526_070_123)
        );
        assert_eq!(timestamptz_millis("1969-12-31 23:30:00-00:30"), Some(0));
        assert_eq!(timestamptz_millis("infinity"), None);
    }

    #[test]
    fn decodes_bytea_hex() {
        assert_eq!(bytea_from_text(b"\\x7b7d").unwrap(), b"{}");
        assert!(bytea_from_text(b"{}").is_err());
    }
}
