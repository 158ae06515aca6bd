use std::time::Duration;

use polars::prelude::*;
use proptest::prelude::*;

use super::{Decoded, Decoder};
use crate::spec::{Archive, ColumnType, Format, Pipeline, Source};

fn pipeline(format: Format) -> Pipeline {
    Pipeline {
        name: "clicks".into(),
        description: None,
        file: "pipelines/clicks.yaml".into(),
        source: Source::Http,
        format,
        schema: [
            ("ts", ColumnType::Timestamp),
            ("page", ColumnType::String),
            ("latency_ms", ColumnType::Float),
            ("n", ColumnType::Int),
            ("ok", ColumnType::Bool),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect(),
        paths: Default::default(),
        event_time: "ts".into(),
        event_id: None,
        dedupe_window: Duration::from_secs(60),
        partitions: 1,
        partition_key: None,
        buffer: None,
        filter: None,
        columns: vec![],
        lookups: vec![],
        archive: Archive {
            segment_rows: 10,
            segment_age: Duration::from_secs(1),
        },
        views: vec![],
    }
}

fn decode(format: Format, input: &str) -> Decoded {
    Decoder::new(&pipeline(format)).decode(input.as_bytes())
}

fn reasons(d: &Decoded) -> Vec<(usize, &str)> {
    d.rejected
        .iter()
        .map(|r| (r.line, r.reason.as_str()))
        .collect()
}

fn strings(df: &DataFrame, c: &str) -> Vec<Option<String>> {
    df.column(c)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|s| s.map(String::from))
        .collect()
}

fn ints(df: &DataFrame, c: &str) -> Vec<Option<i64>> {
    let s = df.column(c).unwrap().as_materialized_series().clone();
    let s = s.to_physical_repr();
    s.i64().unwrap().iter().collect()
}

fn floats(df: &DataFrame, c: &str) -> Vec<Option<f64>> {
    df.column(c).unwrap().f64().unwrap().iter().collect()
}

#[test]
fn ndjson_good_lines_pass_and_bad_lines_say_why() {
    let input = concat!(
        r#"{"ts":"2024-05-01T12:00:00Z","page":"/a","latency_ms":12.5,"n":3,"ok":true,"extra":{"deep":[1,2,{"x":null}]}}"#,
        "\n",
        "not json\n",
        "{\"page\":\"/b\"}\n",
        "{\"ts\":\"yesterday\"}\n",
        "{\"ts\":1714564800000,\"latency_ms\":\"fast\"}\n",
        "{\"ts\":1714564800000,\"n\":1.5}\n",
        "[1,2]\n",
        "   \r\n",
        r#"{"page":"caf\u00e9 \"q\" \ud83d\ude00","n":2.0,"latency_ms":1e2,"ts":1714564800001}"#,
        "\r\n",
        "{\"ts\":null}\n",
        "{\"ts\":1,\"page\":\"x\"} trailing\n",
        "{\"ts\":1,\"n\":99999999999999999999}\n",
        "{\"ts\":1,\"page\":\"a\",\"page\":\"b\",\"ok\":null}\n",
        "{\"ts\":1,\"page\":\"\\x\"}\n",
        "{\"ts\":1,\n",
        "{\"ts\":-99999999999999}\n",
        "{\"ts\":\"253402300800000\"}",
    );
    let d = decode(Format::Json, input);
    assert_eq!(
        reasons(&d),
        [
            (2, "not JSON: expected an object like {\"field\": value}"),
            (3, "missing event time `ts`"),
            (
                4,
                "`ts`: cannot parse timestamp \"yesterday\" (expected RFC 3339 like 2024-05-01T12:00:00Z, or epoch milliseconds)"
            ),
            (5, "`latency_ms`: expected a number, found a string"),
            (6, "`n`: expected an integer, found 1.5"),
            (7, "expected a JSON object, found an array"),
            (10, "event time `ts` is null"),
            (
                11,
                "invalid JSON at column 21: unexpected text after the object"
            ),
            (12, "`n`: integer 99999999999999999999 is out of range"),
            (14, "invalid JSON at column 18: invalid escape in a string"),
            (15, "invalid JSON: expected `\"`, found the end of the line"),
            (
                16,
                "`ts`: epoch milliseconds -99999999999999 are outside years 0000–9999"
            ),
            (
                17,
                "`ts`: epoch milliseconds 253402300800000 are outside years 0000–9999"
            ),
        ]
    );
    assert_eq!(d.rejected[0].raw, "not json");
    let e = &d.events;
    assert_eq!(
        e.get_column_names(),
        ["ts", "page", "latency_ms", "n", "ok"]
    );
    assert_eq!(
        e.column("ts").unwrap().dtype(),
        &DataType::Datetime(TimeUnit::Milliseconds, None)
    );
    assert_eq!(
        ints(e, "ts"),
        [Some(1_714_564_800_000), Some(1_714_564_800_001), Some(1)]
    );
    assert_eq!(
        strings(e, "page"),
        [
            Some("/a".into()),
            Some("café \"q\" 😀".into()),
            Some("b".into())
        ]
    );
    assert_eq!(floats(e, "latency_ms"), [Some(12.5), Some(100.0), None]);
    assert_eq!(ints(e, "n"), [Some(3), Some(2), None]);
    let ok: Vec<Option<bool>> = e.column("ok").unwrap().bool().unwrap().iter().collect();
    assert_eq!(ok, [Some(true), None, None]);
}

#[test]
fn invalid_utf8_and_empty_input() {
    let d =
        Decoder::new(&pipeline(Format::Json)).decode(b"{\"ts\":1,\"page\":\"\xff\"}\n{\"ts\":2}");
    assert_eq!(reasons(&d), [(1, "not valid UTF-8")]);
    assert_eq!(d.events.height(), 1);
    let empty = decode(Format::Json, "");
    assert_eq!(empty.events.height(), 0);
    assert_eq!(empty.events.width(), 5);
    assert!(empty.rejected.is_empty());
}

#[test]
fn csv_header_in_any_order_quotes_and_line_numbers() {
    let input = concat!(
        "page,ts,\"latency_ms\",extra,n\r\n",
        "/a,2024-05-01T12:00:00Z,12.5,zzz,3\r\n",
        "\"/b,c\",1714564800000,,x,\r\n",
        "\"multi\n",
        "line \"\"quoted\"\"\",5,1,,\n",
        "\n",
        "bad,notatime,1,,\n",
        "short,5\n",
        "x\"y,5,1,,\n",
        "\"\",6,,,\n",
        "\"a\"b,7,,,\n",
        "\"unterminated,5,1,,\n",
        // An unterminated quote rejects its own line only.
        "after,9,,,\n",
    );
    let d = decode(Format::Csv, input);
    assert_eq!(
        reasons(&d),
        [
            (
                7,
                "`ts`: cannot parse timestamp \"notatime\" (expected RFC 3339 like 2024-05-01T12:00:00Z, or epoch milliseconds)"
            ),
            (8, "expected 5 fields as in the header, found 2"),
            (
                9,
                "a quote inside an unquoted field (quote the whole field)"
            ),
            (11, "text after a closing quote"),
            (12, "unterminated quoted field"),
        ]
    );
    let e = &d.events;
    assert_eq!(
        strings(e, "page"),
        [
            Some("/a".into()),
            Some("/b,c".into()),
            Some("multi\nline \"quoted\"".into()),
            Some(String::new()),
            Some("after".into()),
        ]
    );
    assert_eq!(
        ints(e, "ts"),
        [
            Some(1_714_564_800_000),
            Some(1_714_564_800_000),
            Some(5),
            Some(6),
            Some(9)
        ]
    );
    assert_eq!(
        floats(e, "latency_ms"),
        [Some(12.5), None, Some(1.0), None, None]
    );
    assert_eq!(ints(e, "n"), [Some(3), None, None, None, None]);
    // `ok` is not in the header: null throughout.
    assert_eq!(e.column("ok").unwrap().null_count(), 5);
    // Each event's record, as the input holds it (line break included).
    let records: Vec<&str> = d.records.iter().map(|r| &input[r.clone()]).collect();
    assert_eq!(
        records,
        [
            "/a,2024-05-01T12:00:00Z,12.5,zzz,3\r\n",
            "\"/b,c\",1714564800000,,x,\r\n",
            "\"multi\nline \"\"quoted\"\"\",5,1,,\n",
            "\"\",6,,,\n",
            "after,9,,,\n"
        ]
    );
    assert_eq!(
        &input[d.header.clone().unwrap()],
        "page,ts,\"latency_ms\",extra,n"
    );
}

#[test]
fn records_are_located_in_the_input_byte_order_mark_and_all() {
    let input = "\u{feff}{\"ts\": 1}\r\n\n  \nnot json\n{\"ts\": 2}";
    let d = decode(Format::Json, input);
    let records: Vec<&str> = d.records.iter().map(|r| &input[r.clone()]).collect();
    assert_eq!(records, ["{\"ts\": 1}\r\n", "{\"ts\": 2}"]);
    assert_eq!(d.header, None);
    let input = "\u{feff}ts,page\n1,\"a\nb\"\n2,\"open\n3,c";
    let d = decode(Format::Csv, input);
    assert_eq!(reasons(&d), [(4, "unterminated quoted field")]);
    let records: Vec<&str> = d.records.iter().map(|r| &input[r.clone()]).collect();
    assert_eq!(records, ["1,\"a\nb\"\n", "3,c"]);
    assert_eq!(&input[d.header.clone().unwrap()], "ts,page");
}

#[test]
fn csv_without_the_event_time_column_rejects_every_record() {
    let d = decode(Format::Csv, "page,n\n/a,1\n/b,2\n");
    assert_eq!(
        reasons(&d),
        [
            (2, "missing event time `ts`"),
            (3, "missing event time `ts`")
        ]
    );
    let d = decode(Format::Csv, "\"page,ts\n/a,1\n");
    assert_eq!(
        reasons(&d),
        [
            (1, "invalid CSV header: unterminated quoted field"),
            (2, "no usable CSV header (see line 1)")
        ]
    );
}

#[test]
fn csv_types() {
    let d = decode(
        Format::Csv,
        "ts,ok,n,latency_ms\n1,TRUE,-4,1e3\n2,false,+5,.5\n3,yes,1,1\n4,true,1,NaN\n5,true,1.0,1\n6,true,1.5,1\n7,true,abc,1\n",
    );
    assert_eq!(
        reasons(&d),
        [
            (4, "`ok`: expected true or false, found \"yes\""),
            (5, "`latency_ms`: NaN is not a finite number"),
            (7, "`n`: expected an integer, found 1.5"),
            (8, "`n`: expected an integer, found \"abc\""),
        ]
    );
    assert_eq!(ints(&d.events, "n"), [Some(-4), Some(5), Some(1)]);
    assert_eq!(
        floats(&d.events, "latency_ms"),
        [Some(1000.0), Some(0.5), Some(1.0)]
    );
}

/// Lines that are not blank, i.e. lines that must become an event or a rejection.
fn content_lines(bytes: &[u8]) -> usize {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r')))
        .count()
}

fn check_invariants(format: Format, bytes: &[u8]) -> Result<(), TestCaseError> {
    let d = Decoder::new(&pipeline(format)).decode(bytes);
    prop_assert_eq!(d.events.width(), 5);
    prop_assert_eq!(d.events.column("ts").unwrap().null_count(), 0);
    if format == Format::Json {
        prop_assert_eq!(d.events.height() + d.rejected.len(), content_lines(bytes));
    }
    let mut last = 0;
    for r in &d.rejected {
        prop_assert!(r.line > last, "line numbers increase: {:?}", d.rejected);
        prop_assert!(!r.reason.is_empty());
        last = r.line;
    }
    Ok(())
}

const VALID: &[&str] = &[
    r#"{"ts":"2024-05-01T12:00:00.123+02:00","page":"/a\n\u00e9","latency_ms":-1.5e-3,"n":-42,"ok":false,"x":[{"y":"z"},null,true]}"#,
    r#"{ "n" : 7 , "ts" : 1714564800000 }"#,
    "ts,page,n\n2024-05-01T12:00:00Z,\"a,\"\"b\"\"\",3",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_string_run_ends_where_the_first_quote_backslash_or_control_character_is(
        bytes in prop::collection::vec(
            prop_oneof![Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..0x7f, 0x80u8..=0xff],
            0..40,
        ),
        from in 0usize..40,
    ) {
        let from = from.min(bytes.len());
        let expected = bytes[from..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
            .map_or(bytes.len(), |i| from + i);
        prop_assert_eq!(super::json::special(&bytes, from), expected);
    }

    #[test]
    fn a_plain_decimal_reads_as_the_standard_parser_reads_it(
        s in r"-?[0-9]{1,9}(\.[0-9]{1,9})?|-?0\.0{0,6}[0-9]{1,8}|[0-9.\-]{0,17}"
    ) {
        if let Some(f) = super::plain_decimal(&s) {
            let parsed: f64 = s.parse().expect("what the fast path reads is a number");
            prop_assert_eq!(f.to_bits(), parsed.to_bits(), "{}", s);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_invariants(Format::Json, &bytes)?;
        check_invariants(Format::Csv, &bytes)?;
    }

    #[test]
    fn json_like_text_never_panics(s in r#"[{}\[\]":,\\ a-z0-9.eE+\-\n\ttrufalsn]{0,120}"#) {
        check_invariants(Format::Json, s.as_bytes())?;
        check_invariants(Format::Csv, s.as_bytes())?;
    }

    #[test]
    fn mutated_valid_lines_never_panic(
        which in 0..VALID.len(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), 0..3u8), 1..6),
    ) {
        let mut bytes = VALID[which].as_bytes().to_vec();
        for (at, byte, op) in edits {
            let at = at % (bytes.len() + 1);
            match op {
                0 => bytes.insert(at, byte),
                1 if at < bytes.len() => { bytes.remove(at); }
                _ if at < bytes.len() => bytes[at] = byte,
                _ => bytes.push(byte),
            }
        }
        check_invariants(Format::Json, &bytes)?;
        check_invariants(Format::Csv, &bytes)?;
    }
}

#[test]
fn the_valid_samples_are_valid() {
    for (i, s) in VALID.iter().enumerate() {
        let format = if i == 2 { Format::Csv } else { Format::Json };
        let d = decode(format, s);
        assert!(d.rejected.is_empty(), "{s}: {:?}", d.rejected);
        assert_eq!(d.events.height(), 1);
    }
}

#[test]
fn deep_nesting_is_rejected_not_recursed() {
    let deep = format!(
        "{{\"ts\":1,\"x\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let d = decode(Format::Json, &deep);
    assert_eq!(d.rejected.len(), 1);
    assert!(
        d.rejected[0].reason.contains("nested too deeply"),
        "{:?}",
        d.rejected
    );
}

#[test]
fn events_without_a_usable_event_id_are_rejected_with_a_reason() {
    let mut p = pipeline(Format::Json);
    p.event_id = Some("page".into());
    let d = Decoder::new(&p).decode(
        concat!(
            "{\"ts\":1,\"page\":\"a\"}\n",
            "{\"ts\":1}\n",
            "{\"ts\":1,\"page\":null}\n",
            "{\"ts\":1,\"page\":\"\"}\n",
            "{\"ts\":1,\"page\":\" \"}\n",
        )
        .as_bytes(),
    );
    assert_eq!(
        strings(&d.events, "page"),
        [Some("a".into()), Some(" ".into())]
    );
    assert_eq!(
        reasons(&d),
        [
            (2, "missing event_id `page`"),
            (3, "missing event_id: `page` is null"),
            (4, "missing event_id: `page` is empty"),
        ]
    );
    // CSV: an empty cell, quoted or not, is no id; an integer id of 0 is one.
    let mut p = pipeline(Format::Csv);
    p.event_id = Some("n".into());
    let d = Decoder::new(&p).decode(b"ts,page,n\n1,a,0\n1,b,\n1,c,\"\"\n");
    assert_eq!(ints(&d.events, "n"), [Some(0)]);
    assert_eq!(d.rejected.len(), 2, "{:?}", d.rejected);
    assert!(
        d.rejected
            .iter()
            .all(|r| r.reason.starts_with("missing event_id"))
    );
    p.event_id = Some("page".into());
    let d = Decoder::new(&p).decode(b"ts,page\n1,\"\"\n1,\n1,x\n");
    assert_eq!(strings(&d.events, "page"), [Some("x".into())]);
    assert_eq!(
        reasons(&d),
        [
            (2, "missing event_id: `page` is empty"),
            (3, "missing event_id: `page` is null"),
        ]
    );
    // Log records were accepted already: they decode without the requirement.
    let d = Decoder::new(&p).without_event_id().decode(b"ts,page\n1,\n");
    assert_eq!((d.events.height(), d.rejected.len()), (1, 0));
}
