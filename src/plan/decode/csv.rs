//! CSV (RFC 4180): a header line naming the columns in any order, then one record per line;
//! quoted fields may hold commas, `""` and newlines. Header columns outside the schema are
//! ignored; schema columns absent from the header are null.
//!
//! A quote that is never closed rejects its own record only: that record is taken to end at
//! the first line break after the quote, and decoding goes on with the next line.

use super::json::{MAX_TEXT, Text};
use super::{Decoder, Output, Slot};

/// A field's content as a range of the input (inside the quotes when quoted).
#[derive(Debug, Clone, Copy)]
struct Field {
    start: usize,
    end: usize,
    quoted: bool,
    /// Holds `""`, so the content needs unescaping.
    escaped: bool,
}

/// Where one record lies and what was wrong with it.
struct Record {
    start: usize,
    /// End of the record's text, before its line break.
    end: usize,
    /// Start of the next record.
    next: usize,
    /// Line breaks consumed, including those inside quoted fields.
    newlines: usize,
    error: Option<&'static str>,
    /// A quoted field was still open at the end of the input (the record was cut at the first
    /// line break after its quote, if any).
    unterminated: bool,
    /// The record ended with a line break (not at the end of the input).
    at_newline: bool,
}

enum State {
    FieldStart,
    Unquoted(usize),
    Quoted { start: usize, escaped: bool },
    AfterQuote,
}

/// Splits the record at `pos` into `fields`.
fn record(b: &[u8], pos: usize, fields: &mut Vec<Field>) -> Record {
    fields.clear();
    let mut state = State::FieldStart;
    let mut error = None;
    let mut newlines = 0;
    let mut unterminated = false;
    // Where the last quoted field opened, and the line breaks consumed before it.
    let mut opened = (pos, 0);
    let mut i = pos;
    let end_at = |i: usize| {
        if i > pos && b[i - 1] == b'\r' {
            i - 1
        } else {
            i
        }
    };
    loop {
        let c = b.get(i).copied();
        match state {
            State::FieldStart => {
                if c == Some(b'"') {
                    opened = (i, newlines);
                    state = State::Quoted {
                        start: i + 1,
                        escaped: false,
                    };
                    i += 1;
                } else {
                    state = State::Unquoted(i);
                }
            }
            State::Unquoted(start) => match c {
                None | Some(b'\n') => {
                    let end = end_at(i).max(start);
                    fields.push(Field {
                        start,
                        end,
                        quoted: false,
                        escaped: false,
                    });
                    break;
                }
                Some(b',') => {
                    fields.push(Field {
                        start,
                        end: i,
                        quoted: false,
                        escaped: false,
                    });
                    state = State::FieldStart;
                    i += 1;
                }
                Some(b'"') => {
                    error.get_or_insert("a quote inside an unquoted field (quote the whole field)");
                    i += 1;
                }
                Some(_) => i += 1,
            },
            State::Quoted { start, escaped } => match c {
                None => {
                    error.get_or_insert("unterminated quoted field");
                    unterminated = true;
                    // Only this record is rejected: it ends at the quote's line break.
                    let (quote, before) = opened;
                    if let Some(k) = memchr::memchr(b'\n', &b[quote..]) {
                        i = quote + k;
                        newlines = before;
                    }
                    break;
                }
                Some(b'"') if b.get(i + 1) == Some(&b'"') => {
                    state = State::Quoted {
                        start,
                        escaped: true,
                    };
                    i += 2;
                }
                Some(b'"') => {
                    fields.push(Field {
                        start,
                        end: i,
                        quoted: true,
                        escaped,
                    });
                    state = State::AfterQuote;
                    i += 1;
                }
                Some(b'\n') => {
                    newlines += 1;
                    i += 1;
                }
                Some(_) => i += 1,
            },
            State::AfterQuote => match c {
                None | Some(b'\n') => break,
                Some(b',') => {
                    state = State::FieldStart;
                    i += 1;
                }
                Some(b'\r') if matches!(b.get(i + 1), None | Some(b'\n')) => i += 1,
                Some(_) => {
                    error.get_or_insert("text after a closing quote");
                    state = State::Unquoted(i);
                }
            },
        }
    }
    let at_newline = b.get(i) == Some(&b'\n');
    Record {
        start: pos,
        end: end_at(i),
        next: if at_newline { i + 1 } else { b.len() },
        newlines: newlines + at_newline as usize,
        error,
        unterminated,
        at_newline,
    }
}

/// The length of the longest prefix of `b` made of whole records, each ended by its line
/// break: a record still inside a quoted field, or without its line break yet, may be
/// completed by more input (a file being written).
pub(crate) fn whole_records(b: &[u8]) -> usize {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let rec = record(b, pos, &mut fields);
        if rec.unterminated || !rec.at_newline {
            break;
        }
        pos = rec.next;
    }
    pos
}

impl Decoder {
    pub(super) fn decode_csv(&self, bytes: &[u8], out: &mut Output) {
        let mut fields = Vec::new();
        let mut slots = vec![Slot::Missing; self.columns.len()];
        let mut buf = String::new();
        // Header position → schema column; `Err` holds why the header is unusable.
        let mut header: Option<Result<Vec<Option<usize>>, String>> = None;
        let (mut pos, mut line) = (0, 1);
        while pos < bytes.len() {
            let rec = record(bytes, pos, &mut fields);
            let this_line = line;
            line += rec.newlines;
            pos = rec.next;
            let raw = &bytes[rec.start..rec.end];
            if raw.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r')) {
                continue;
            }
            let text = match std::str::from_utf8(raw) {
                Ok(_) if raw.len() > MAX_TEXT => Err("record longer than 2 GiB"),
                Ok(text) => Ok(text),
                Err(_) => Err("not valid UTF-8"),
            };
            let Some(map) = &header else {
                let parsed = match (text, rec.error) {
                    (Ok(text), None) => Ok(fields
                        .iter()
                        .map(|f| {
                            let name = cell(text, rec.start, f, &mut buf);
                            let name = name.resolve(text, &buf).trim();
                            self.columns.iter().position(|(n, _)| n == name)
                        })
                        .collect()),
                    (Err(e), _) | (_, Some(e)) => {
                        out.reject(this_line, format!("invalid CSV header: {e}"), raw);
                        Err(format!("no usable CSV header (see line {this_line})"))
                    }
                };
                buf.clear();
                if parsed.is_ok() {
                    out.header = Some(rec.start..rec.end);
                }
                header = Some(parsed);
                continue;
            };
            let map = match map {
                Ok(map) => map,
                Err(reason) => {
                    out.reject(this_line, reason.clone(), raw);
                    continue;
                }
            };
            let text = match (text, rec.error) {
                (Ok(text), None) => text,
                (Err(e), _) | (_, Some(e)) => {
                    out.reject(this_line, e.to_string(), raw);
                    continue;
                }
            };
            if fields.len() != map.len() {
                out.reject(
                    this_line,
                    format!(
                        "expected {} fields as in the header, found {}",
                        map.len(),
                        fields.len()
                    ),
                    raw,
                );
                continue;
            }
            slots.fill(Slot::Missing);
            buf.clear();
            let mut result = Ok(());
            for (f, col) in fields.iter().zip(map) {
                let Some(col) = *col else { continue };
                let at = cell(text, rec.start, f, &mut buf);
                match self.text_value(col, at.resolve(text, &buf), f.quoted, at) {
                    Ok(slot) => slots[col] = slot,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            match result.and_then(|()| self.check_required(&slots)) {
                Ok(()) => out.commit(&slots, text, &buf, rec.start..rec.next),
                Err(reason) => out.reject(this_line, reason, raw),
            }
        }
    }
}

/// The field's text, unescaping `""` into `buf` when needed.
fn cell(text: &str, offset: usize, f: &Field, buf: &mut String) -> Text {
    let (a, b) = (f.start - offset, f.end - offset);
    if !f.escaped {
        return Text::line(a, b);
    }
    let from = buf.len();
    buf.push_str(&text.get(a..b).unwrap_or_default().replace("\"\"", "\""));
    Text::buf(from, buf.len())
}
