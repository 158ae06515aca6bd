//! What a browser could be tricked into sending is refused before any handler runs.
//!
//! With no `serve.token` (the default) the API trusts whoever can reach it, so it must make
//! sure that "whoever" is not a web page the operator happens to have open:
//!
//! - **DNS rebinding**: a page on `evil.example` re-points its name at 127.0.0.1 and reads the
//!   API as its own origin. Its requests carry `Host: evil.example`. Without a token only
//!   loopback names (`localhost`, `*.localhost`) and IP address literals are accepted as
//!   `Host`: rebinding needs a name the attacker controls, and a page served from an IP
//!   address is not at one (a name → 403; set a token to serve by name).
//! - **CSRF**: a page elsewhere POSTs to the API (a form, or `fetch` in `no-cors` mode).
//!   Browsers send `Origin` with every such request: one naming another origin than the
//!   request's `Host` is refused, token or not; so are unsafe methods marked
//!   `Sec-Fetch-Site: cross-site`/`same-site`. And a POST must say it carries JSON, NDJSON or
//!   CSV ([`events_content_type`], [`trigger_content_type`]) — types a page cannot send to
//!   another origin without a CORS preflight, which this server never grants.
//!
//! Scripts and `lambda-ctl` send no `Origin` and the content types above; the dashboard is
//! same-origin. Nothing here replaces the token for a server reachable from elsewhere.

use std::net::{Ipv4Addr, Ipv6Addr};

use axum::http::{HeaderMap, Method, header};

/// Media types `POST /v1/pipelines/{p}/events` accepts (parameters like `charset` aside).
pub const EVENT_TYPES: &[&str] = &[
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/jsonlines",
    "application/json",
    "text/csv",
    "application/csv",
];

/// Refuses what a browser page on another origin could make happen; `Err` is the message of
/// a 403. `token_set`: the server requires a bearer token (then any `Host` is accepted).
pub fn check(method: &Method, headers: &HeaderMap, token_set: bool) -> Result<(), String> {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    if !token_set && let Some(h) = host.filter(|h| !host_allowed(h)) {
        return Err(format!(
            "Host `{h}` refused: without `serve.token` this server answers only to loopback names and IP addresses (protection against DNS rebinding); set `serve.token` to serve it by name"
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        if !host.is_some_and(|h| same_origin(origin, h)) {
            return Err(format!(
                "cross-origin request from `{origin}` refused (only the server's own pages, scripts and lambda-ctl may call it)"
            ));
        }
    }
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let site = headers
        .get("sec-fetch-site")
        .and_then(|s| s.to_str().ok())
        .unwrap_or("");
    if !safe && matches!(site, "cross-site" | "same-site") {
        return Err(format!(
            "{method} from another site (Sec-Fetch-Site: {site}) refused"
        ));
    }
    Ok(())
}

/// `Host` without a token: a loopback name or an IP literal, with an optional port.
fn host_allowed(host: &str) -> bool {
    let Some((name, _port)) = split_host(host) else {
        return false;
    };
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok();
    }
    if name.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost")
}

/// `host[:port]` → (host, port); `None` when the port is not a number.
fn split_host(authority: &str) -> Option<(&str, Option<u16>)> {
    let authority = authority.trim();
    let (name, port) = match authority.rfind(':') {
        // `[::1]` has colons but no port after its bracket.
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    };
    if name.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => Some(p.parse().ok()?),
        None => None,
    };
    Some((name, port))
}

/// `Origin` (`scheme://host[:port]`) names the same host and port as `Host`.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // `null` (sandboxed frames, file: pages) and anything malformed
    };
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    let (Some((o_name, o_port)), Some((h_name, h_port))) =
        (split_host(authority), split_host(host))
    else {
        return false;
    };
    o_name.eq_ignore_ascii_case(h_name) && o_port.unwrap_or(default) == h_port.unwrap_or(default)
}

/// The media type of a `Content-Type` value, lowercased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::CONTENT_TYPE)?.to_str().unwrap_or("?");
    Some(
        v.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Events must be declared NDJSON, JSON or CSV; `Err` is the message of a 415.
pub fn events_content_type(headers: &HeaderMap) -> Result<(), String> {
    match media_type(headers) {
        Some(t) if EVENT_TYPES.contains(&t.as_str()) => Ok(()),
        found => Err(format!(
            "events must be sent as `Content-Type: application/x-ndjson` (or application/json, text/csv), {}",
            found.map_or("found none".to_string(), |t| format!("found `{t}`"))
        )),
    }
}

/// Starting a run takes no body; one that is sent must be JSON. No `Content-Type` is
/// accepted only with an empty body (a page on another origin is refused by its `Origin`).
pub fn trigger_content_type(headers: &HeaderMap, body_is_empty: bool) -> Result<(), String> {
    match media_type(headers) {
        None if body_is_empty => Ok(()),
        Some(t) if t == "application/json" => Ok(()),
        found => Err(format!(
            "send no body, or `Content-Type: application/json`; {}",
            found.map_or("found a body without a Content-Type".to_string(), |t| {
                format!("found `{t}`")
            })
        )),
    }
}

/// The token of an `Authorization` value in the `Bearer` scheme (any case, RFC 9110 §11.1).
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_without_a_token() {
        for ok in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST",
            "localhost.",
            "app.localhost:1",
            "[::1]:8080",
            "[::1]",
            "10.1.2.3:8080",
        ] {
            assert!(host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "",
            ":8080",
            "127.0.0.1:x",
            "[::1",
        ] {
            assert!(!host_allowed(bad), "{bad}");
        }
        let get = Method::GET;
        assert!(check(&get, &headers(&[("host", "evil.example")]), false).is_err());
        assert!(check(&get, &headers(&[("host", "evil.example")]), true).is_ok());
        // HTTP/1.0 without Host: not a browser.
        assert!(check(&get, &headers(&[]), false).is_ok());
    }

    #[test]
    fn origins() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin("http://LocalHost:8080", "localhost:8080"));
        assert!(same_origin("http://a.example", "a.example:80"));
        assert!(same_origin("https://a.example", "a.example:443"));
        assert!(!same_origin("http://127.0.0.1:3000", "127.0.0.1:8080"));
        assert!(!same_origin("http://evil.example", "127.0.0.1:8080"));
        assert!(!same_origin("null", "127.0.0.1:8080"));
        assert!(!same_origin("file://", "127.0.0.1:8080"));
        let post = Method::POST;
        let h = |origin: &str| headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
        assert!(check(&post, &h("http://127.0.0.1:8080"), false).is_ok());
        assert!(check(&post, &h("http://evil.example"), false).is_err());
        assert!(check(&post, &h("http://evil.example"), true).is_err());
        let site = headers(&[("host", "127.0.0.1:8080"), ("sec-fetch-site", "cross-site")]);
        assert!(check(&post, &site, true).is_err());
        assert!(check(&Method::GET, &site, false).is_ok());
    }

    #[test]
    fn content_types() {
        let ct = |t: &str| headers(&[("content-type", t)]);
        assert!(events_content_type(&ct("application/x-ndjson")).is_ok());
        assert!(events_content_type(&ct("Text/CSV; charset=utf-8")).is_ok());
        assert!(events_content_type(&ct("application/json")).is_ok());
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ] {
            assert!(events_content_type(&ct(bad)).is_err(), "{bad}");
        }
        assert!(events_content_type(&headers(&[])).is_err());
        assert!(trigger_content_type(&headers(&[]), true).is_ok());
        assert!(trigger_content_type(&headers(&[]), false).is_err());
        assert!(trigger_content_type(&ct("application/json"), false).is_ok());
        assert!(trigger_content_type(&ct("text/plain"), true).is_err());
    }

    #[test]
    fn bearer_scheme_in_any_case() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER   abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
