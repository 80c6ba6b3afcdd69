//! What reaches the operator's terminal: every byte devfence writes to standard
//! output passes through [`SafeOut`], and every error message through
//! [`escape_controls`], so that a value read from the host (a sysfs attribute, a
//! domain name, a label) cannot carry terminal control sequences — a colour
//! change, a cursor move, a window-title write, a carriage return that hides the
//! line before it. Control characters other than newline and tab (C0, DEL and the
//! C1 range U+0080–U+009F) are written as `\u00XX`, which reads clearly in text and
//! is also the JSON escape of the same character, so JSON output stays valid and
//! lossless. [`SafeOut`] also notices a closed pipe (`devfence audit show | head`),
//! so that the command can end quietly.

use std::borrow::Cow;
use std::io::{self, Write};

/// Whether `c` is escaped.
fn is_unsafe(c: char) -> bool {
    c.is_control() && c != '\n' && c != '\t'
}

/// `s` with every control character but newline and tab written as `\u00XX`.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unsafe(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A writer that escapes control characters (see the module docs) and records
/// whether the reader went away.
pub struct SafeOut<W: Write> {
    inner: W,
    /// The last byte written was 0xC2, the lead byte of a C1 control or of a
    /// harmless character; the next byte decides.
    pending_c2: bool,
    pipe_closed: bool,
}

impl<W: Write> SafeOut<W> {
    /// Wraps `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            pending_c2: false,
            pipe_closed: false,
        }
    }

    /// Whether a write failed because the reader closed the pipe.
    pub fn pipe_closed(&self) -> bool {
        self.pipe_closed
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        let r = self.inner.write_all(b);
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::BrokenPipe
        {
            self.pipe_closed = true;
        }
        r
    }
}

impl<W: Write> Write for SafeOut<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The common case, nothing to escape: straight through, no copy.
        if !self.pending_c2
            && !buf
                .iter()
                .any(|&b| (b < 0x20 && b != b'\n' && b != b'\t') || b == 0x7f || b == 0xc2)
        {
            self.put(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 8);
        for &b in buf {
            if std::mem::take(&mut self.pending_c2) {
                if (0x80..=0x9f).contains(&b) {
                    out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                    continue;
                }
                out.push(0xc2);
            }
            match b {
                b'\n' | b'\t' => out.push(b),
                0x00..=0x1f | 0x7f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
                0xc2 => self.pending_c2 = true,
                _ => out.push(b),
            }
        }
        self.put(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.pending_c2) {
            self.put(&[0xc2])?;
        }
        let r = self.inner.flush();
        if let Err(e) = &r
            && e.kind() == io::ErrorKind::BrokenPipe
        {
            self.pipe_closed = true;
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_escaped_text_is_not() {
        let mut o = SafeOut::new(Vec::new());
        write!(o, "a\x1b[31mred\x07 ok\ttab é \u{9b}2J\r\nnext\x7f").unwrap();
        // A C1 control split across two writes.
        o.write_all(&[b'x', 0xc2]).unwrap();
        o.write_all(&[0x9b, b'y', 0xc2]).unwrap();
        o.write_all(&[0xa9]).unwrap();
        o.flush().unwrap();
        assert_eq!(
            String::from_utf8(o.inner).unwrap(),
            "a\\u001b[31mred\\u0007 ok\ttab é \\u009b2J\\u000d\nnext\\u007fx\\u009by©"
        );
        assert_eq!(escape_controls("plain"), "plain");
        assert_eq!(escape_controls("a\x1b]0;t\x07"), "a\\u001b]0;t\\u0007");
    }

    #[test]
    fn escaped_json_stays_json() {
        let v = serde_json::json!({ "v": "x\u{9b}y\u{1b}" });
        let mut o = SafeOut::new(Vec::new());
        serde_json::to_writer(&mut o, &v).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&o.inner).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn a_closed_pipe_is_noticed() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut o = SafeOut::new(Closed);
        assert!(o.write_all(b"x").is_err());
        assert!(o.pipe_closed());
    }
}
