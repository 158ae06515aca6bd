//! Where a pipeline names an object to read or write — a files sink's `path`, a lookup's
//! `from`: a path relative to the lake, outside the areas lambda-ctl manages, or a `file://`,
//! `s3://`, `az://` or `gs://` URL naming an object.

use crate::spec::diag::Diagnostics;
use crate::spec::yaml::Loc;

/// Where lambda-ctl keeps each version of a lookup table in the lake.
pub const LOOKUPS_AREA: &str = "lookups";
/// Lake areas lambda-ctl writes itself: no user path reads or writes inside them.
const LAKE_AREAS: &[&str] = &["archive", "views", "dead_letters", "runs", LOOKUPS_AREA];
/// Object stores a URL may name (those the lake supports, but `memory://`).
const URL_SCHEMES: &[&str] = &["file", "s3", "s3a", "az", "azure", "abfs", "abfss", "gs"];

/// How messages about a path name it.
pub struct Named<'a> {
    /// The setting, e.g. "files sink `path`" or "lookup `stores` `from`".
    pub what: &'a str,
    /// A lake-relative path to give as an example, e.g. "exports/revenue.parquet".
    pub example: &'a str,
}

/// `path` is a URL (`scheme://…`) rather than a lake-relative path.
pub fn is_url(path: &str) -> bool {
    path.contains("://")
}

/// Checks `path`, a URL or a lake-relative path; false (with an error at `loc`) if unusable.
pub fn check(d: &mut Diagnostics, path: &str, loc: Loc, named: &Named) -> bool {
    if is_url(path) {
        url_path(d, path, loc, named)
    } else {
        lake_path(d, path, loc, named)
    }
}

/// A `file://`, `s3://`, `az://` or `gs://` URL with a bucket (or a local path).
fn url_path(d: &mut Diagnostics, path: &str, loc: Loc, named: &Named) -> bool {
    let what = named.what;
    let parsed = match url::Url::parse(path) {
        Ok(u) => u,
        Err(e) => {
            d.error(loc, format!("{what} `{path}` is not a valid URL: {e}"));
            return false;
        }
    };
    let scheme = parsed.scheme();
    let problem = if !URL_SCHEMES.contains(&scheme) {
        format!(
            "{what} `{path}`: unsupported scheme `{scheme}://` (use a path relative to the lake, file:///ABSOLUTE/PATH, s3://, az:// or gs://)"
        )
    } else if scheme != "file" && parsed.host_str().is_none_or(str::is_empty) {
        format!("{what} `{path}` has no bucket or container")
    } else if scheme == "file" && parsed.host_str().is_some_and(|h| !h.is_empty()) {
        format!("{what} `{path}`: write a local file as file:///ABSOLUTE/PATH (three slashes)")
    } else {
        return true;
    };
    d.error(loc, problem);
    false
}

/// A path inside the lake: relative, without empty, `.` or `..` steps, outside lambda-ctl's
/// own areas.
fn lake_path(d: &mut Diagnostics, path: &str, loc: Loc, named: &Named) -> bool {
    let (what, example) = (named.what, named.example);
    let steps: Vec<&str> = path.split('/').collect();
    let problem = if path.starts_with('/') {
        format!(
            "{what} `{path}` is absolute: write file://{path} for a local file, or a path relative to the lake"
        )
    } else if path.contains('\\')
        || steps
            .iter()
            .any(|s| s.is_empty() || *s == "." || *s == "..")
    {
        format!(
            "{what} `{path}`: write a path relative to the lake like {example} (no empty, `.` or `..` steps)"
        )
    } else if steps.len() > 1 && LAKE_AREAS.contains(&steps[0]) {
        let area = example.split('/').next().unwrap_or(example);
        format!(
            "{what} `{path}` is inside the lake's `{}/` area, which lambda-ctl manages; use another, e.g. {area}/…",
            steps[0]
        )
    } else {
        return true;
    };
    d.error(loc, problem);
    false
}
