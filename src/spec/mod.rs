//! The spec: `lambda.yaml`, `pipelines/*.yaml`, `workflows/*.yaml` → a validated [`Project`].
//!
//! Reading never stops at the first problem: every file is parsed into a located tree
//! ([`yaml`]), checked field by field ([`pipeline`], [`workflow`], [`settings`]), then checked
//! across files (duplicate names, tasks naming pipelines and views). The result is either a
//! `Project` or every problem as `FILE:LINE:COL: message`.

pub mod diag;
pub mod duration;
pub mod expr;
#[cfg(test)]
mod fuzz;
pub mod model;
pub mod pipeline;
mod read;
pub mod schedule;
pub mod settings;
pub mod workflow;
pub mod yaml;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, SpecErrors};
pub use model::*;

use diag::{Diagnostics, did_you_mean};
use yaml::{Loc, Node};

/// Variables a `command` task gets at run time; left as `${…}` when the spec is loaded.
pub const RUNTIME_VARS: &[&str] = &["LAMBDA_RUN_ID", "LAMBDA_WORKFLOW", "LAMBDA_SCHEDULED_AT"];

/// Loads and validates the project in `root`, interpolating from the process environment.
pub fn load(root: &Path) -> Result<Project, SpecErrors> {
    load_with_env(root, &|name| std::env::var(name).ok())
}

pub fn load_with_env(
    root: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Project, SpecErrors> {
    let env = |name: &str| {
        if RUNTIME_VARS.contains(&name) {
            Some(format!("${{{name}}}"))
        } else {
            env(name)
        }
    };
    let mut all = Vec::new();

    let settings_path = root.join("lambda.yaml");
    let mut d = Diagnostics::new(&shown(&settings_path));
    let settings_node = if settings_path.exists() {
        read_node(&mut d, &settings_path, &env)
    } else {
        None
    };
    let settings = if d.is_empty() {
        settings::build(&mut d, settings_node.as_ref(), root)
    } else {
        None
    };
    all.extend(d.into_vec());

    let mut pipelines: Vec<Pipeline> = Vec::new();
    // Names of every pipeline file, valid or not, so a workflow naming a broken pipeline is not
    // also reported as naming an unknown one.
    let mut declared: Vec<(String, Vec<String>)> = Vec::new();
    // Sink destinations of the pipelines read so far: (destination, `pipeline.view`, file).
    let mut claimed: Vec<(String, String, String)> = Vec::new();
    for path in yaml_files(&root.join("pipelines"), &mut all) {
        let mut d = Diagnostics::new(&shown(&path));
        let Some(node) = read_node(&mut d, &path, &env) else {
            all.extend(d.into_vec());
            continue;
        };
        let name = node
            .get("name")
            .and_then(Node::as_str)
            .unwrap_or_default()
            .to_string();
        let view_names = match node.get("views") {
            Some(Node::Seq { items, .. }) => items
                .iter()
                .filter_map(|v| v.get("name")?.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        if let Some((_, _)) = declared
            .iter()
            .find(|(n, _)| !name.is_empty() && *n == name)
        {
            d.error(node.get("name").map_or(Loc { line: 1, col: 1 }, Node::loc), format!("duplicate pipeline name `{name}` (pipeline names must be unique in the project)"));
        }
        declared.push((name, view_names));
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let built = pipeline::build(&mut d, &node, &rel);
        if let Some(p) = &built {
            claim_destinations(&mut d, &node, p, &mut claimed);
        }
        if let Some(mut p) = built
            && d.is_empty()
        {
            pipeline::resolve_project_paths(&mut p, root);
            pipelines.push(p);
        }
        all.extend(d.into_vec());
    }

    let tz = settings.as_ref().map_or(chrono_tz::UTC, |s| s.timezone);
    let mut workflows: Vec<Workflow> = Vec::new();
    for path in yaml_files(&root.join("workflows"), &mut all) {
        let mut d = Diagnostics::new(&shown(&path));
        let Some(node) = read_node(&mut d, &path, &env) else {
            all.extend(d.into_vec());
            continue;
        };
        let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
        let (wf, refs) = workflow::build(&mut d, &node, &rel, tz);
        check_refs(&mut d, &refs, &declared);
        if let Some(wf) = wf {
            if workflows.iter().any(|w| w.name == wf.name) {
                d.error(
                    node.get("name").map_or(Loc { line: 1, col: 1 }, Node::loc),
                    format!("duplicate workflow name `{}`", wf.name),
                );
            }
            if d.is_empty() {
                workflows.push(wf);
            }
        }
        all.extend(d.into_vec());
    }

    if all.is_empty() {
        Ok(Project {
            root: root.to_path_buf(),
            settings: settings.expect("no diagnostics means settings built"),
            pipelines,
            workflows,
        })
    } else {
        all.sort();
        Err(SpecErrors(all))
    }
}

/// A sink destination written by a view of an earlier pipeline file is an error at this
/// pipeline's sink: the two views would overwrite each other's rows. (Within one file the
/// pipeline's own check reports it.)
fn claim_destinations(
    d: &mut Diagnostics,
    node: &Node,
    p: &Pipeline,
    claimed: &mut Vec<(String, String, String)>,
) {
    let mut mine = Vec::new();
    for (view, sink, loc) in pipeline::sinks_at(node, p) {
        let dest = sink.target.destination();
        match claimed.iter().find(|(c, _, _)| *c == dest) {
            Some((_, other, file)) => d.error(
                loc,
                format!(
                    "sink `{}` is already the destination of view `{other}` ({file}): each table, topic or file takes one view",
                    sink.target.name()
                ),
            ),
            None => mine.push((dest, format!("{}.{}", p.name, view.name), p.file.display().to_string())),
        }
    }
    claimed.extend(mine);
}

fn check_refs(
    d: &mut Diagnostics,
    refs: &[workflow::TaskRefs],
    declared: &[(String, Vec<String>)],
) {
    for r in refs {
        let Some((pipeline, loc)) = &r.pipeline else {
            continue;
        };
        match declared.iter().find(|(n, _)| n == pipeline) {
            None => d.error(
                *loc,
                format!(
                    "unknown pipeline `{pipeline}`{}",
                    did_you_mean(pipeline, declared.iter().map(|(n, _)| n.as_str()))
                ),
            ),
            Some((_, views)) => {
                for (view, vloc) in &r.views {
                    if !views.contains(view) {
                        d.error(
                            *vloc,
                            format!(
                                "pipeline `{pipeline}` has no view `{view}`{}",
                                did_you_mean(view, views.iter().map(String::as_str))
                            ),
                        );
                    }
                }
            }
        }
    }
}

fn read_node(
    d: &mut Diagnostics,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Node> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            d.error(Loc { line: 1, col: 1 }, format!("cannot read file: {e}"));
            return None;
        }
    };
    let mut node = match yaml::parse(&text) {
        Ok(n) => n,
        Err(e) => {
            d.error(e.loc, e.message);
            return None;
        }
    };
    // Checked on the file as written; reported without stopping the file's validation.
    let secrets = pipeline::literal_secrets(&node);
    for (loc, message) in node.interpolate(env) {
        d.error(loc, message);
    }
    let ok = d.is_empty();
    for (loc, message) in secrets {
        d.error(loc, message);
    }
    ok.then_some(node)
}

/// A pipeline from the text of its file (`file`, relative to the project in `root`) as a
/// server recorded it, to recompute answers by a definition no longer in pipelines/. A
/// variable the environment no longer sets reads as empty text: what one set is a source or
/// a credential, never part of a view's logic.
pub fn pipeline_from_text(root: &Path, file: &Path, text: &str) -> Result<Pipeline, String> {
    let mut d = Diagnostics::new(file);
    let mut node = yaml::parse(text).map_err(|e| {
        format!(
            "{}:{}:{}: {}",
            file.display(),
            e.loc.line,
            e.loc.col,
            e.message
        )
    })?;
    let env = |name: &str| Some(std::env::var(name).unwrap_or_default());
    for (loc, message) in node.interpolate(&env) {
        d.error(loc, message);
    }
    match pipeline::build(&mut d, &node, file) {
        Some(mut p) if d.is_empty() => {
            pipeline::resolve_project_paths(&mut p, root);
            Ok(p)
        }
        _ => Err(d
            .into_vec()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")),
    }
}

/// `*.yaml` / `*.yml` in `dir`, sorted; a missing directory is an empty project part.
fn yaml_files(dir: &Path, all: &mut Vec<Diagnostic>) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            all.push(Diagnostic {
                file: shown(dir),
                loc: Loc { line: 1, col: 1 },
                message: format!("cannot list directory: {e}"),
            });
            Vec::new()
        }
    };
    files.sort();
    files
}

/// How a path is printed: as the user reached it, without a leading `./`.
fn shown(path: &Path) -> PathBuf {
    path.strip_prefix(".")
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| path.to_path_buf())
}
