//! Fuzz target of the view query's URL parameters (the harness and corpus: [`crate::fuzz`]).

use super::query::ViewQuery;
use crate::fuzz::{DEFAULT_CASES, fuzz};

#[test]
fn fuzz_view_query_parameters() {
    const NOW: i64 = 1_763_719_200_000;
    fuzz("query", DEFAULT_CASES * 2, |input| {
        let (query, accept) = match input.iter().position(|b| *b == b'\n') {
            Some(i) => (&input[..i], Some(String::from_utf8_lossy(&input[i + 1..]))),
            None => (input, None),
        };
        let params: Vec<(String, String)> = url::form_urlencoded::parse(query)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let has = |key: &str| params.iter().any(|(k, _)| k == key);
        let (from, to) = (has("from"), has("to"));
        let reserved = ["from", "to", "format", "origin"];
        let filters = params
            .iter()
            .filter(|(k, _)| !reserved.contains(&k.as_str()))
            .count();
        match ViewQuery::from_params(params, NOW, accept.as_deref()) {
            Ok((q, _csv)) => {
                assert_eq!((q.from.is_some(), q.to.is_some()), (from, to));
                assert_eq!(q.filters.len(), filters);
            }
            Err(message) => assert!(!message.is_empty()),
        }
    });
}
