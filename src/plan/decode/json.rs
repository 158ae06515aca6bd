//! A validating scanner over one NDJSON line (already known to be UTF-8). Values of schema
//! columns are parsed in place; every other value is checked and skipped, so a line is
//! accepted only if it is JSON, and no tree is ever built.

/// A decoded string: a range of the line when it had no escapes, else of the scratch buffer.
/// One word, so that it travels in a register: a wider value returned through memory and
/// copied with wider loads than it was stored with stalled the decoder (store forwarding).
/// Positions are below 2^31: longer lines (and CSV records) are rejected first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Text(u64);

/// The longest line (or CSV record) decoded; longer ones are rejected.
pub(super) const MAX_TEXT: usize = (1 << 31) - 1;

const IN_BUF: u64 = 1 << 63;

impl Text {
    pub fn line(start: usize, end: usize) -> Text {
        Text((start as u64 & 0xFFFF_FFFF) | (end as u64 & 0x7FFF_FFFF) << 32)
    }

    pub fn buf(start: usize, end: usize) -> Text {
        Text(Text::line(start, end).0 | IN_BUF)
    }

    fn range(self) -> (usize, usize) {
        (
            (self.0 & 0xFFFF_FFFF) as usize,
            ((self.0 >> 32) & 0x7FFF_FFFF) as usize,
        )
    }

    pub fn is_empty(self) -> bool {
        let (a, b) = self.range();
        a >= b
    }

    /// Ranges always sit on ASCII delimiters of valid UTF-8; `get` only guards the invariant.
    pub fn resolve<'a>(self, line: &'a str, buf: &'a str) -> &'a str {
        let (a, b) = self.range();
        let text = if self.0 & IN_BUF == 0 { line } else { buf };
        text.get(a..b).unwrap_or_default()
    }
}

/// The position of the first `"`, `\\` or control character at or after `from` (the end of
/// `b` if none): what ends the plain run of a string. Eight bytes at a time (SWAR): a flag
/// marks each such byte; borrows may also flag bytes after a true one, never before it, so the
/// lowest flag is exact.
#[inline(always)]
pub(super) fn special(b: &[u8], from: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = from;
    while let Some(chunk) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_le_bytes(w);
        let flags = zero(w ^ (ONES * b'"' as u64))
            | zero(w ^ (ONES * b'\\' as u64))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if flags != 0 {
            return i + (flags.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            return i;
        }
        i += 1;
    }
    i
}

/// Deeper nesting than this in skipped values is rejected rather than recursed into.
const MAX_DEPTH: usize = 128;

pub(super) struct Scanner<'a> {
    b: &'a [u8],
    pub pos: usize,
}

impl<'a> Scanner<'a> {
    pub fn new(line: &'a str) -> Scanner<'a> {
        Scanner {
            b: line.as_bytes(),
            pos: 0,
        }
    }

    pub fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    pub fn at_end(&self) -> bool {
        self.pos >= self.b.len()
    }

    pub fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\r' | b'\n') = self.peek() {
            self.pos += 1;
        }
    }

    pub fn err(&self, what: &str) -> String {
        if self.at_end() {
            format!("invalid JSON: {what}, found the end of the line")
        } else {
            format!("invalid JSON at column {}: {what}", self.pos + 1)
        }
    }

    /// Consumes `c` or fails with "expected `what`".
    #[inline]
    pub fn expect(&mut self, c: u8, what: &str) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.expected(what))
        }
    }

    #[cold]
    fn expected(&self, what: &str) -> String {
        self.err(&format!("expected {what}"))
    }

    /// A string starting at the current `"`; escapes are decoded into `buf`.
    #[inline(always)]
    pub fn string(&mut self, buf: &mut String) -> Result<Text, String> {
        self.expect(b'"', "`\"`")?;
        let start = self.pos;
        self.pos = special(self.b, self.pos);
        if self.peek() == Some(b'"') {
            self.pos += 1;
            return Ok(Text::line(start, self.pos - 1));
        }
        self.escaped_string(start, buf)
    }

    /// The rest of a string from `start` whose plain run ended at the current position, at a
    /// `\\` (decoded into `buf`), a control character or the end of the line.
    #[inline(never)]
    fn escaped_string(&mut self, start: usize, buf: &mut String) -> Result<Text, String> {
        match self.peek() {
            None => return Err(self.err("unterminated string")),
            Some(b'\\') => {}
            Some(_) => return Err(self.err("control character in a string")),
        }
        // Slow path: copy what was scanned, then decode escapes.
        let from = buf.len();
        buf.push_str(self.slice(start, self.pos));
        loop {
            let run = self.pos;
            self.pos = special(self.b, self.pos);
            buf.push_str(self.slice(run, self.pos));
            match self.peek() {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(Text::buf(from, buf.len()));
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let c = match self.peek() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let c = self.unicode_escape()?;
                            buf.push(c);
                            continue;
                        }
                        _ => return Err(self.err("invalid escape in a string")),
                    };
                    self.pos += 1;
                    buf.push(c);
                }
                Some(_) => return Err(self.err("control character in a string")),
            }
        }
    }

    /// Consumes the string `"name"` if it comes next, written without escapes. `name` must
    /// need none (no `"`, `\\` or control character), else a match could be wrong.
    pub fn plain_key(&mut self, name: &str) -> bool {
        let name = name.as_bytes();
        let at = self.pos;
        let matched = self.b.get(at) == Some(&b'"')
            && self.b.get(at + 1..at + 1 + name.len()) == Some(name)
            && self.b.get(at + 1 + name.len()) == Some(&b'"');
        if matched {
            self.pos = at + name.len() + 2;
        }
        matched
    }

    /// The part of the line between two ASCII positions of it.
    fn slice(&self, a: usize, b: usize) -> &'a str {
        // Both ends sit next to ASCII bytes of a valid UTF-8 line, so this never fails.
        std::str::from_utf8(&self.b[a..b]).unwrap_or_default()
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = match self.peek() {
                Some(c @ b'0'..=b'9') => c - b'0',
                Some(c @ b'a'..=b'f') => c - b'a' + 10,
                Some(c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.err("invalid \\u escape")),
            };
            v = v * 16 + d as u32;
            self.pos += 1;
        }
        Ok(v)
    }

    /// After `\u`: one code point, combining a surrogate pair.
    fn unicode_escape(&mut self) -> Result<char, String> {
        let hi = self.hex4()?;
        let cp = match hi {
            0xD800..=0xDBFF => {
                if self.b.get(self.pos..self.pos + 2) != Some(b"\\u") {
                    return Err(self.err("unpaired surrogate in \\u escape"));
                }
                self.pos += 2;
                let lo = self.hex4()?;
                if !(0xDC00..=0xDFFF).contains(&lo) {
                    return Err(self.err("unpaired surrogate in \\u escape"));
                }
                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
            }
            0xDC00..=0xDFFF => return Err(self.err("unpaired surrogate in \\u escape")),
            cp => cp,
        };
        char::from_u32(cp).ok_or_else(|| self.err("invalid \\u escape"))
    }

    /// A number; returns its text and whether it is written as an integer.
    pub fn number(&mut self) -> Result<(&'a str, bool), String> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.err("invalid number")),
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.err("expected a digit after `.`"));
            }
            self.digits();
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err(self.err("expected a digit in the exponent"));
            }
            self.digits();
            integer = false;
        }
        Ok((self.slice(start, self.pos), integer))
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
    }

    /// `true`, `false` or `null` at the current position.
    pub fn literal(&mut self, word: &str) -> Result<(), String> {
        if self.b[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.err("invalid literal"))
        }
    }

    /// Checks and steps over any value. `buf` receives (and may keep) decoded escapes.
    pub fn skip_value(&mut self, buf: &mut String, depth: usize) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(self.err("nested too deeply"));
        }
        match self.peek() {
            Some(b'"') => {
                let mark = buf.len();
                self.string(buf)?;
                buf.truncate(mark);
            }
            Some(b'{') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(b'}') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    let mark = buf.len();
                    self.string(buf)?;
                    buf.truncate(mark);
                    self.ws();
                    self.expect(b':', "`:`")?;
                    self.ws();
                    self.skip_value(buf, depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b'}') => {
                            self.pos += 1;
                            return Ok(());
                        }
                        _ => return Err(self.err("expected `,` or `}`")),
                    }
                }
            }
            Some(b'[') => {
                self.pos += 1;
                self.ws();
                if self.peek() == Some(b']') {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    self.skip_value(buf, depth + 1)?;
                    self.ws();
                    match self.peek() {
                        Some(b',') => self.pos += 1,
                        Some(b']') => {
                            self.pos += 1;
                            return Ok(());
                        }
                        _ => return Err(self.err("expected `,` or `]`")),
                    }
                }
            }
            Some(b't') => self.literal("true")?,
            Some(b'f') => self.literal("false")?,
            Some(b'n') => self.literal("null")?,
            Some(b'-' | b'0'..=b'9') => {
                self.number()?;
            }
            _ => return Err(self.err("expected a value")),
        }
        Ok(())
    }

    /// What the value at the current position is, for "expected X, found Y".
    pub fn describe(&self) -> &'static str {
        match self.peek() {
            Some(b'"') => "a string",
            Some(b'{') => "an object",
            Some(b'[') => "an array",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            Some(b'-' | b'0'..=b'9') => "a number",
            _ => "something else",
        }
    }
}
