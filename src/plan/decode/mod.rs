//! Bytes → events typed by the pipeline's schema, one rejection per bad line.
//!
//! Hand-written rather than polars' readers because it runs on every micro-batch and must
//! judge each line on its own: a line is parsed into per-column slots, and only a line that
//! passes every check is appended to the column builders, so a bad line never leaves half a
//! row behind. Nothing here panics on any input (the proptests feed it arbitrary bytes).

mod csv;
mod json;
mod path;
#[cfg(test)]
mod tests;
pub(crate) mod timestamp;

pub(crate) use csv::whole_records as csv_whole_records;

use std::ops::Range;

use polars::prelude::*;

use crate::spec::{ColumnType, Format, Pipeline};

use json::{MAX_TEXT, Scanner, Text};

/// The result of decoding one input.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// Exactly the schema columns, in schema order, typed by `spec::expr::dtype`.
    pub events: DataFrame,
    /// In input order.
    pub rejected: Vec<Rejection>,
    /// Per event, where its record lies in the input, line break included (a line of NDJSON;
    /// a CSV record, which may span lines). Decoding the header (for CSV) and these records,
    /// each ended by a line break, yields `events` again.
    pub records: Vec<Range<usize>>,
    /// For CSV, where the header record lies in the input (after a byte order mark).
    pub header: Option<Range<usize>>,
}

/// A line that could not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 1-based line of the input (for CSV, the line the record starts on).
    pub line: usize,
    pub reason: String,
    /// The line as received (invalid UTF-8 replaced by U+FFFD).
    pub raw: String,
}

/// One parsed cell of the row being assembled.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Missing,
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(Text),
}

#[derive(Debug, Clone)]
pub(crate) struct Decoder {
    format: Format,
    columns: Vec<(String, ColumnType)>,
    /// The event-time column, which every event must have (None for a lookup table's rows).
    event_time: Option<usize>,
    /// The `event_id` column: an event without a usable id (missing, null or `""`) cannot be
    /// de-duplicated, so it is rejected rather than counted unchecked or all deduplicated as one.
    event_id: Option<usize>,
    /// Columns at nested paths (`path:`, `from: meta.KEY`); None when all are top-level keys.
    tree: Option<path::Tree>,
    /// Per column, whether its name needs no escape in JSON: then a key written exactly as
    /// the name is recognised without decoding it.
    plain: Vec<bool>,
}

/// Per column, whether its name can be matched byte for byte against an unescaped JSON key.
fn plain_names(columns: &[(String, ColumnType)]) -> Vec<bool> {
    columns
        .iter()
        .map(|(n, _)| n.bytes().all(|c| c != b'"' && c != b'\\' && c >= 0x20))
        .collect()
}

impl Decoder {
    pub fn new(p: &Pipeline) -> Decoder {
        Decoder {
            format: p.format,
            columns: p.schema.clone(),
            event_time: Some(
                p.schema
                    .iter()
                    .position(|(n, _)| *n == p.event_time)
                    .unwrap_or(0),
            ),
            event_id: p
                .event_id
                .as_ref()
                .and_then(|id| p.schema.iter().position(|(n, _)| n == id)),
            tree: path::Tree::build(&p.schema, &p.paths),
            plain: plain_names(&p.schema),
        }
    }

    /// A decoder of rows of a table (a lookup's CSV file, or its PostgreSQL query's rows as
    /// NDJSON): `columns` typed as for events, no column required.
    pub fn table(format: Format, columns: &[(String, ColumnType)]) -> Decoder {
        Decoder {
            format,
            columns: columns.to_vec(),
            event_time: None,
            event_id: None,
            tree: None,
            plain: plain_names(columns),
        }
    }

    /// This decoder without the `event_id` requirement: for write-ahead log records, which
    /// were accepted (perhaps before the requirement existed) and must decode as they were.
    pub fn without_event_id(&self) -> Decoder {
        Decoder {
            event_id: None,
            ..self.clone()
        }
    }

    pub fn decode(&self, input: &[u8]) -> Decoded {
        let bytes = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
        let mut out = Output::new(&self.columns, bytes.len() / 96 + 1);
        match self.format {
            Format::Json => self.decode_json(bytes, &mut out),
            Format::Csv => self.decode_csv(bytes, &mut out),
        }
        let mut decoded = out.finish(&self.columns);
        // Ranges into `input`, byte order mark included.
        let bom = input.len() - bytes.len();
        if bom > 0 {
            let shift = |r: &mut Range<usize>| *r = r.start + bom..r.end + bom;
            decoded.records.iter_mut().for_each(shift);
            decoded.header.iter_mut().for_each(shift);
        }
        decoded
    }

    fn decode_json(&self, bytes: &[u8], out: &mut Output) {
        let mut slots = vec![Slot::Missing; self.columns.len()];
        let mut buf = String::new();
        let mut key_buf = String::new();
        let mut start = 0;
        let mut line_no = 0;
        while start <= bytes.len() {
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            let line = &bytes[start..end];
            start = end + 1;
            line_no += 1;
            if line
                .iter()
                .all(|c| matches!(c, b' ' | b'\t' | b'\r' | b'\n'))
            {
                continue;
            }
            let Ok(text) = std::str::from_utf8(line) else {
                out.reject(line_no, "not valid UTF-8".into(), line);
                continue;
            };
            if text.len() > MAX_TEXT {
                out.reject(line_no, "line longer than 2 GiB".into(), line);
                continue;
            }
            slots.fill(Slot::Missing);
            buf.clear();
            match self
                .json_line(text, &mut slots, &mut buf, &mut key_buf)
                .and_then(|()| self.check_required(&slots))
            {
                Ok(()) => out.commit(
                    &slots,
                    text,
                    &buf,
                    end - line.len()..(end + 1).min(bytes.len()),
                ),
                Err(reason) => out.reject(line_no, reason, line),
            }
        }
    }

    fn json_line(
        &self,
        line: &str,
        slots: &mut [Slot],
        buf: &mut String,
        key_buf: &mut String,
    ) -> Result<(), String> {
        let mut s = Scanner::new(line);
        s.ws();
        if s.peek() != Some(b'{') {
            // Say "found an array" only for lines that are JSON at all.
            let found = s.describe();
            let mut probe = Scanner::new(line);
            probe.ws();
            let is_json = probe.skip_value(buf, 0).is_ok() && {
                probe.ws();
                probe.at_end()
            };
            return Err(if is_json {
                format!("expected a JSON object, found {found}")
            } else {
                "not JSON: expected an object like {\"field\": value}".into()
            });
        }
        if let Some(tree) = &self.tree {
            self.object(tree, &mut s, line, slots, buf, key_buf, 0)?;
            s.ws();
            if !s.at_end() {
                return Err(s.err("unexpected text after the object"));
            }
            return Ok(());
        }
        s.pos += 1;
        s.ws();
        // Fields usually come in schema order: try the next column before searching.
        let mut guess = 0;
        if s.peek() == Some(b'}') {
            s.pos += 1;
        } else {
            loop {
                s.ws();
                let column = match self.columns.get(guess) {
                    Some((name, _)) if self.plain[guess] && s.plain_key(name) => Some(guess),
                    _ => {
                        key_buf.clear();
                        let key = s.string(key_buf)?.resolve(line, key_buf);
                        self.lookup(key, guess)
                    }
                };
                s.ws();
                s.expect(b':', "`:`")?;
                s.ws();
                match column {
                    Some(i) => {
                        self.json_value(i, &mut s, line, buf, &mut slots[i])?;
                        guess = i + 1;
                    }
                    None => s.skip_value(buf, 0)?,
                }
                s.ws();
                match s.peek() {
                    Some(b',') => s.pos += 1,
                    Some(b'}') => {
                        s.pos += 1;
                        break;
                    }
                    _ => return Err(s.err("expected `,` or `}`")),
                }
            }
        }
        s.ws();
        if !s.at_end() {
            return Err(s.err("unexpected text after the object"));
        }
        Ok(())
    }

    fn lookup(&self, key: &str, guess: usize) -> Option<usize> {
        if self.columns.get(guess).is_some_and(|(n, _)| n == key) {
            return Some(guess);
        }
        self.columns.iter().position(|(n, _)| n == key)
    }

    /// The value at the scanner for column `i`, into `slot`. Written in place rather than
    /// returned: a returned slot travels through memory, and copying it stalls the decoder.
    fn json_value(
        &self,
        i: usize,
        s: &mut Scanner,
        line: &str,
        buf: &mut String,
        slot: &mut Slot,
    ) -> Result<(), String> {
        *slot = self.json_slot(i, s, line, buf)?;
        Ok(())
    }

    #[inline(always)]
    fn json_slot(
        &self,
        i: usize,
        s: &mut Scanner,
        line: &str,
        buf: &mut String,
    ) -> Result<Slot, String> {
        let (name, t) = &self.columns[i];
        let wrong = |s: &Scanner| {
            format!(
                "`{name}`: expected {}, found {}",
                expected(*t),
                s.describe()
            )
        };
        match s.peek() {
            Some(b'n') => {
                s.literal("null")?;
                return Ok(Slot::Null);
            }
            Some(b'"') => {
                let text = s.string(buf)?;
                return match t {
                    ColumnType::String => Ok(Slot::Str(text)),
                    ColumnType::Timestamp => timestamp(name, text.resolve(line, buf)),
                    _ => Err(format!(
                        "`{name}`: expected {}, found a string",
                        expected(*t)
                    )),
                };
            }
            Some(b'-' | b'0'..=b'9') => {}
            Some(b't') if *t == ColumnType::Bool => {
                s.literal("true")?;
                return Ok(Slot::Bool(true));
            }
            Some(b'f') if *t == ColumnType::Bool => {
                s.literal("false")?;
                return Ok(Slot::Bool(false));
            }
            _ => return Err(wrong(s)),
        }
        if !t.is_numeric() && *t != ColumnType::Timestamp {
            return Err(wrong(s));
        }
        let (text, integer) = s.number()?;
        match t {
            ColumnType::Float => float(name, text),
            ColumnType::Int => int(name, text, integer),
            _ if integer => match text.parse() {
                Ok(ms) if timestamp::in_range(ms) => Ok(Slot::Int(ms)),
                _ => Err(out_of_years(name, text)),
            },
            _ => Err(format!(
                "`{name}`: epoch milliseconds must be an integer, found {}",
                clip(text)
            )),
        }
    }

    /// The event time, and the event id when the pipeline declares one.
    fn check_required(&self, slots: &[Slot]) -> Result<(), String> {
        if let Some(et) = self.event_time {
            let name = &self.columns[et].0;
            match slots[et] {
                Slot::Missing => return Err(format!("missing event time `{name}`")),
                Slot::Null => return Err(format!("event time `{name}` is null")),
                _ => {}
            }
        }
        let Some(id) = self.event_id else {
            return Ok(());
        };
        let name = &self.columns[id].0;
        match slots[id] {
            Slot::Missing => Err(format!("missing event_id `{name}`")),
            Slot::Null => Err(format!("missing event_id: `{name}` is null")),
            Slot::Str(t) if t.is_empty() => Err(format!("missing event_id: `{name}` is empty")),
            _ => Ok(()),
        }
    }

    /// A CSV cell of column `i`: unquoted empty is null, everything else parses by type.
    fn text_value(&self, i: usize, text: &str, quoted: bool, at: Text) -> Result<Slot, String> {
        let (name, t) = &self.columns[i];
        if text.is_empty() && (!quoted || *t != ColumnType::String) {
            return Ok(Slot::Null);
        }
        match t {
            ColumnType::String => Ok(Slot::Str(at)),
            ColumnType::Int => int(name, text, !text.contains(['.', 'e', 'E'])),
            ColumnType::Float => float(name, text),
            ColumnType::Bool => {
                if text.eq_ignore_ascii_case("true") {
                    Ok(Slot::Bool(true))
                } else if text.eq_ignore_ascii_case("false") {
                    Ok(Slot::Bool(false))
                } else {
                    Err(format!(
                        "`{name}`: expected true or false, found {:?}",
                        clip(text)
                    ))
                }
            }
            ColumnType::Timestamp => timestamp(name, text),
        }
    }
}

fn expected(t: ColumnType) -> &'static str {
    match t {
        ColumnType::String => "a string",
        ColumnType::Int => "an integer",
        ColumnType::Float => "a number",
        ColumnType::Bool => "true or false",
        ColumnType::Timestamp => "a timestamp (RFC 3339 string or epoch milliseconds)",
    }
}

fn int(name: &str, text: &str, integer: bool) -> Result<Slot, String> {
    if integer {
        if let Ok(v) = text.parse() {
            return Ok(Slot::Int(v));
        }
        let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
        return Err(
            if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
                format!("`{name}`: integer {} is out of range", clip(text))
            } else {
                format!("`{name}`: expected an integer, found {:?}", clip(text))
            },
        );
    }
    // `3.0` and `1e3` are integers written as numbers (pandas writes nullable ints so);
    // accept them when exact.
    match text.parse::<f64>() {
        Ok(f) if f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 => Ok(Slot::Int(f as i64)),
        _ => Err(format!(
            "`{name}`: expected an integer, found {}",
            clip(text)
        )),
    }
}

#[inline(always)]
fn float(name: &str, text: &str) -> Result<Slot, String> {
    match plain_decimal(text) {
        Some(f) => Ok(Slot::Float(f)),
        None => parsed_float(name, text),
    }
}

#[inline(never)]
fn parsed_float(name: &str, text: &str) -> Result<Slot, String> {
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(Slot::Float(f)),
        Ok(_) => Err(format!("`{name}`: {} is not a finite number", clip(text))),
        Err(_) => Err(format!(
            "`{name}`: expected a number, found {:?}",
            clip(text)
        )),
    }
}

/// A decimal without exponent and of at most 15 digits (`-1234.56`), exactly as
/// `str::parse::<f64>` reads it: its digits as an integer are exact in an f64 (< 2^53), so is
/// the power of ten (≤ 10^15), and IEEE division rounds their quotient correctly — the fast
/// path of every correct parser, without the general parser's setup. None for anything else.
#[inline(always)]
pub(super) fn plain_decimal(text: &str) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut mantissa = 0u64;
    let mut count = 0;
    let mut point = None;
    for (i, c) in digits.bytes().enumerate() {
        match c {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + (c - b'0') as u64;
                count += 1;
            }
            b'.' if point.is_none() && i > 0 => point = Some(i),
            _ => return None,
        }
    }
    let fraction = match point {
        Some(p) if p + 1 == digits.len() => return None,
        Some(p) => digits.len() - p - 1,
        None => 0,
    };
    if count > 15 {
        return None;
    }
    let v = mantissa as f64 / POW10[fraction];
    Some(if negative { -v } else { v })
}

fn out_of_years(name: &str, text: &str) -> String {
    format!(
        "`{name}`: epoch milliseconds {} are outside years 0000–9999",
        clip(text)
    )
}

fn timestamp(name: &str, text: &str) -> Result<Slot, String> {
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    if !unsigned.is_empty() && unsigned.bytes().all(|c| c.is_ascii_digit()) {
        return timestamp::parse(text)
            .map(Slot::Int)
            .ok_or_else(|| out_of_years(name, text));
    }
    timestamp::parse(text).map(Slot::Int).ok_or_else(|| {
        format!(
            "`{name}`: cannot parse timestamp {:?} (expected RFC 3339 like \
             2024-05-01T12:00:00Z, or epoch milliseconds)",
            clip(text)
        )
    })
}

/// Keeps reasons readable when a value is huge.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

enum ColBuilder {
    Str(StringChunkedBuilder),
    Int(PrimitiveChunkedBuilder<Int64Type>),
    Float(PrimitiveChunkedBuilder<Float64Type>),
    Bool(BooleanChunkedBuilder),
}

/// Column builders plus the rejections, filled line by line.
struct Output {
    builders: Vec<ColBuilder>,
    rows: usize,
    rejected: Vec<Rejection>,
    records: Vec<Range<usize>>,
    header: Option<Range<usize>>,
}

impl Output {
    fn new(columns: &[(String, ColumnType)], capacity: usize) -> Output {
        let builders = columns
            .iter()
            .map(|(n, t)| {
                let n = PlSmallStr::from(n.as_str());
                match t {
                    ColumnType::String => ColBuilder::Str(StringChunkedBuilder::new(n, capacity)),
                    ColumnType::Int | ColumnType::Timestamp => {
                        ColBuilder::Int(PrimitiveChunkedBuilder::new(n, capacity))
                    }
                    ColumnType::Float => {
                        ColBuilder::Float(PrimitiveChunkedBuilder::new(n, capacity))
                    }
                    ColumnType::Bool => ColBuilder::Bool(BooleanChunkedBuilder::new(n, capacity)),
                }
            })
            .collect();
        Output {
            builders,
            rows: 0,
            rejected: Vec::new(),
            records: Vec::with_capacity(capacity),
            header: None,
        }
    }

    fn reject(&mut self, line: usize, reason: String, raw: &[u8]) {
        let raw = String::from_utf8_lossy(raw);
        self.rejected.push(Rejection {
            line,
            reason,
            raw: raw.trim_end_matches('\r').to_string(),
        });
    }

    /// Appends one row, decoded from the record at `range` of the input. Slots were
    /// type-checked against their column, so a mismatch cannot occur; it would be written as
    /// null rather than panic.
    fn commit(&mut self, slots: &[Slot], line: &str, buf: &str, range: Range<usize>) {
        self.records.push(range);
        for (b, slot) in self.builders.iter_mut().zip(slots) {
            match (b, slot) {
                (ColBuilder::Str(b), Slot::Str(t)) => b.append_value(t.resolve(line, buf)),
                (ColBuilder::Int(b), Slot::Int(v)) => b.append_value(*v),
                (ColBuilder::Float(b), Slot::Float(v)) => b.append_value(*v),
                (ColBuilder::Bool(b), Slot::Bool(v)) => b.append_value(*v),
                (ColBuilder::Str(b), _) => b.append_null(),
                (ColBuilder::Int(b), _) => b.append_null(),
                (ColBuilder::Float(b), _) => b.append_null(),
                (ColBuilder::Bool(b), _) => b.append_null(),
            }
        }
        self.rows += 1;
    }

    fn finish(self, columns: &[(String, ColumnType)]) -> Decoded {
        let cols = self
            .builders
            .into_iter()
            .zip(columns)
            .map(|(b, (_, t))| match b {
                ColBuilder::Str(b) => b.finish().into_column(),
                ColBuilder::Int(b) if *t == ColumnType::Timestamp => b
                    .finish()
                    .into_datetime(TimeUnit::Milliseconds, None)
                    .into_column(),
                ColBuilder::Int(b) => b.finish().into_column(),
                ColBuilder::Float(b) => b.finish().into_column(),
                ColBuilder::Bool(b) => b.finish().into_column(),
            })
            .collect();
        let events = DataFrame::new(self.rows, cols).unwrap_or_else(|_| {
            // Every builder received exactly one value per committed row.
            DataFrame::empty_with_schema(&crate::spec::expr::schema_of(columns))
        });
        Decoded {
            events,
            rejected: self.rejected,
            records: self.records,
            header: self.header,
        }
    }
}
