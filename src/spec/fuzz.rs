//! Fuzz target of the spec reader: pipelines, workflows and `lambda.yaml` (the harness and
//! corpus: [`crate::fuzz`]).

use std::path::Path;

use super::diag::{Diagnostic, Diagnostics};
use super::{pipeline, settings, workflow, yaml};
use crate::fuzz::{DEFAULT_CASES, fuzz};

/// The diagnostics reading `text` as each kind of spec file gives.
fn spec_diagnostics(text: &str) -> Vec<Diagnostic> {
    let node = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            let mut d = Diagnostics::new(Path::new("x.yaml"));
            d.error(e.loc, e.message);
            return d.into_vec();
        }
    };
    let env = |name: &str| (name == "HOME").then(|| "/root".to_string());
    let mut interpolated = node;
    let mut d = Diagnostics::new(Path::new("x.yaml"));
    for (loc, message) in interpolated.interpolate(&env) {
        d.error(loc, message);
    }
    pipeline::build(&mut d, &interpolated, Path::new("pipelines/x.yaml"));
    workflow::build(
        &mut d,
        &interpolated,
        Path::new("workflows/x.yaml"),
        chrono_tz::UTC,
    );
    settings::build(&mut d, Some(&interpolated), Path::new("/project"));
    d.into_vec()
}

#[test]
fn fuzz_spec_reader() {
    fuzz("spec", DEFAULT_CASES, |input| {
        let text = String::from_utf8_lossy(input);
        let lines = text.split('\n').count();
        for diag in spec_diagnostics(&text) {
            assert!(
                diag.loc.line >= 1 && diag.loc.col >= 1 && diag.loc.line <= lines + 1,
                "not located: {diag}"
            );
            assert!(!diag.message.trim().is_empty(), "{diag}");
        }
    });
}
