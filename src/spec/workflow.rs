//! `workflows/NAME.yaml` → [`Workflow`]. References to pipelines and views are checked by
//! `spec::load` once every pipeline is known.

use std::path::Path;
use std::time::Duration;

use chrono_tz::Tz;

use super::diag::{Diagnostics, did_you_mean};
use super::model::*;
use super::read::{self, Obj};
use super::schedule::Schedule;
use super::yaml::{Loc, Node};

const KEYS: &[&str] = &[
    "name",
    "description",
    "schedule",
    "timezone",
    "catchup",
    "max_active_runs",
    "tasks",
];
const TASK_KEYS: &[&str] = &[
    "name",
    "batch",
    "views",
    "compact",
    "retention",
    "verify",
    "command",
    "needs",
    "retries",
    "retry_delay",
    "timeout",
];
const KINDS: &[&str] = &["batch", "compact", "retention", "verify", "command"];

/// A task's references, kept with their locations for the cross-file checks.
pub struct TaskRefs {
    pub pipeline: Option<(String, Loc)>,
    pub views: Vec<(String, Loc)>,
}

/// Returns the workflow when it is valid, and the task references found either way (so a
/// workflow with other problems still gets its references checked).
pub fn build(
    d: &mut Diagnostics,
    root: &Node,
    file: &Path,
    default_tz: Tz,
) -> (Option<Workflow>, Vec<TaskRefs>) {
    let mut refs = Vec::new();
    let wf = workflow(d, root, file, default_tz, &mut refs);
    (wf, refs)
}

fn workflow(
    d: &mut Diagnostics,
    root: &Node,
    file: &Path,
    default_tz: Tz,
    refs: &mut Vec<TaskRefs>,
) -> Option<Workflow> {
    let obj = Obj::new(d, root, "workflow", KEYS)?;
    let name = obj
        .required(d, "name", "workflow")
        .and_then(|n| read::name(d, n, "workflow name"));
    let description = obj
        .value("description")
        .and_then(|n| read::string(d, n, "description"));
    let schedule = match obj.value("schedule") {
        None => Some(None),
        Some(n) => read::string(d, n, "schedule").and_then(|s| match Schedule::parse(&s) {
            Ok(s) => Some(Some(s)),
            Err(e) => {
                d.error(n.loc(), e);
                None
            }
        }),
    };
    let timezone = match obj.value("timezone") {
        None => Some(default_tz),
        Some(n) => read::string(d, n, "timezone").and_then(|s| timezone(d, n.loc(), &s)),
    };
    let catchup = obj
        .value("catchup")
        .map_or(Some(false), |n| read::boolean(d, n, "catchup"));
    let max_active_runs: Option<u32> = read::integer_in(
        d,
        &obj,
        "max_active_runs",
        1,
        1..=u64::from(u32::MAX),
        "at least 1",
    );
    let tasks = obj
        .required(d, "tasks", "workflow")
        .and_then(|n| tasks(d, n, refs));
    Some(Workflow {
        name: name?,
        description,
        file: file.to_path_buf(),
        schedule: schedule?,
        timezone: timezone?,
        catchup: catchup?,
        max_active_runs: max_active_runs?,
        tasks: tasks?,
    })
}

pub fn timezone(d: &mut Diagnostics, loc: Loc, s: &str) -> Option<Tz> {
    match s.parse::<Tz>() {
        Ok(tz) => Some(tz),
        Err(_) => {
            let names = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name());
            d.error(
                loc,
                format!(
                    "unknown time zone `{s}`{} (use an IANA name like `Europe/Berlin` or `UTC`)",
                    did_you_mean(s, names)
                ),
            );
            None
        }
    }
}

fn tasks(d: &mut Diagnostics, node: &Node, refs: &mut Vec<TaskRefs>) -> Option<Vec<Task>> {
    let read::Named {
        built: out,
        names,
        mut ok,
    } = read::named(d, node, "tasks", "task", |d, item| task(d, item, refs))?;
    // `needs` must name tasks of this workflow, and the graph must be acyclic.
    for (t, need_locs) in &out {
        for (need, loc) in t.needs.iter().zip(need_locs) {
            if !names.contains(&need.as_str()) {
                d.error(
                    *loc,
                    format!(
                        "task `{}` needs unknown task `{need}`{}",
                        t.name,
                        did_you_mean(need, names.iter().copied())
                    ),
                );
                ok = false;
            } else if *need == t.name {
                d.error(*loc, format!("task `{}` needs itself", t.name));
                ok = false;
            }
        }
    }
    if ok && let Some(cycle) = find_cycle(&out.iter().map(|(t, ..)| t.clone()).collect::<Vec<_>>())
    {
        let first = out
            .iter()
            .find(|(t, ..)| t.name == cycle[0])
            .map(|(_, l)| l.first().copied());
        let loc = first.flatten().unwrap_or(node.loc());
        d.error(loc, format!("tasks form a cycle: {}", cycle.join(" → ")));
        ok = false;
    }
    ok.then(|| out.into_iter().map(|(t, _)| t).collect())
}

/// Returns one cycle as task names (first repeated at the end), if any.
pub fn find_cycle(tasks: &[Task]) -> Option<Vec<String>> {
    fn visit(
        i: usize,
        tasks: &[Task],
        state: &mut [u8],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        state[i] = 1;
        stack.push(i);
        for need in &tasks[i].needs {
            let Some(j) = tasks.iter().position(|t| &t.name == need) else {
                continue;
            };
            if state[j] == 1 {
                let from = stack.iter().position(|&k| k == j).unwrap_or(0);
                let mut names: Vec<String> = stack[from..]
                    .iter()
                    .map(|&k| tasks[k].name.clone())
                    .collect();
                names.push(tasks[j].name.clone());
                return Some(names);
            }
            if state[j] == 0
                && let Some(c) = visit(j, tasks, state, stack)
            {
                return Some(c);
            }
        }
        stack.pop();
        state[i] = 2;
        None
    }
    let mut state = vec![0u8; tasks.len()];
    (0..tasks.len()).find_map(|i| {
        if state[i] == 0 {
            visit(i, tasks, &mut state, &mut Vec::new())
        } else {
            None
        }
    })
}

fn task(
    d: &mut Diagnostics,
    node: &Node,
    all_refs: &mut Vec<TaskRefs>,
) -> Option<(Task, Vec<Loc>)> {
    let obj = Obj::new(d, node, "task", TASK_KEYS)?;
    let name = obj
        .required(d, "name", "task")
        .and_then(|n| read::name(d, n, "task name"));
    let present: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| obj.value(k).is_some())
        .collect();
    let mut refs = TaskRefs {
        pipeline: None,
        views: Vec::new(),
    };
    let kind = match present.as_slice() {
        [] => {
            d.error(
                obj.loc,
                format!("task needs exactly one of {}", KINDS.join(", ")),
            );
            None
        }
        [_, second, ..] => {
            d.error(
                obj.get(second).map_or(obj.loc, Node::loc),
                format!("task has more than one kind: {}", present.join(", ")),
            );
            None
        }
        [kind] => {
            let n = obj.get(kind).expect("present");
            match *kind {
                "batch" => {
                    let pipeline = read::string(d, n, "batch");
                    refs.pipeline = pipeline.clone().map(|p| (p, n.loc()));
                    let views = match obj.value("views") {
                        None => Some(None),
                        Some(v) => read::string_list(d, v, "views").map(|vs| {
                            refs.views = vs.clone();
                            Some(vs.into_iter().map(|(v, _)| v).collect())
                        }),
                    };
                    pipeline
                        .zip(views)
                        .map(|(pipeline, views)| TaskKind::Batch { pipeline, views })
                }
                "compact" => read::string(d, n, "compact").map(|p| {
                    refs.pipeline = Some((p.clone(), n.loc()));
                    TaskKind::Compact { pipeline: p }
                }),
                "retention" => Obj::new(d, n, "retention", &["pipeline", "keep"]).and_then(|r| {
                    let p = r.required(d, "pipeline", "retention").and_then(|pn| {
                        let p = read::string(d, pn, "pipeline")?;
                        refs.pipeline = Some((p.clone(), pn.loc()));
                        Some(p)
                    });
                    let keep = r
                        .required(d, "keep", "retention")
                        .and_then(|k| read::duration(d, k, "keep"));
                    Some(TaskKind::Retention {
                        pipeline: p?,
                        keep: keep?,
                    })
                }),
                "verify" => {
                    // `verify: PIPELINE` (every sealed segment) or `{pipeline, sample}`.
                    let (p, sample) = match n {
                        Node::Map { .. } => verify_options(d, n),
                        _ => (
                            read::string(d, n, "verify").map(|p| (p, n.loc())),
                            Some(Sample::All),
                        ),
                    };
                    refs.pipeline = p.clone();
                    p.zip(sample)
                        .map(|((pipeline, _), sample)| TaskKind::Verify { pipeline, sample })
                }
                _ => read::string_list(d, n, "command").and_then(|argv| {
                    if argv.is_empty() {
                        d.error(
                            n.loc(),
                            "`command` is empty: give the program and its arguments as a list",
                        );
                        return None;
                    }
                    Some(TaskKind::Command {
                        argv: argv.into_iter().map(|(a, _)| a).collect(),
                    })
                }),
            }
        }
    };
    if obj.value("views").is_some() && present != ["batch"] {
        d.error(
            obj.get("views").map_or(obj.loc, Node::loc),
            "`views` only applies to `batch` tasks",
        );
    }
    let needs = match obj.value("needs") {
        None => Some(Vec::new()),
        Some(n) => read::string_list(d, n, "needs"),
    };
    let retries = obj
        .value("retries")
        .map_or(Some(0), |n| read::integer(d, n, "retries"));
    let retries = retries.and_then(|r| u32::try_from(r).ok());
    let retry_delay = obj
        .value("retry_delay")
        .map_or(Some(Duration::from_secs(30)), |n| {
            read::duration(d, n, "retry_delay")
        });
    let timeout = match obj.value("timeout") {
        None => Some(None),
        Some(n) => read::duration(d, n, "timeout").map(Some),
    };
    all_refs.push(refs);
    let (needs, need_locs): (Vec<String>, Vec<Loc>) = needs?.into_iter().unzip();
    let task = Task {
        name: name?,
        kind: kind?,
        needs,
        retries: retries?,
        retry_delay: retry_delay?,
        timeout: timeout?,
    };
    Some((task, need_locs))
}

/// `verify: {pipeline, sample}`: the pipeline (with its location) and the sample.
fn verify_options(d: &mut Diagnostics, n: &Node) -> (Option<(String, Loc)>, Option<Sample>) {
    let Some(v) = Obj::new(d, n, "verify", &["pipeline", "sample"]) else {
        return (None, None);
    };
    let p = v.required(d, "pipeline", "verify").and_then(|pn| {
        let p = read::string(d, pn, "pipeline")?;
        Some((p, pn.loc()))
    });
    let sample = match v.value("sample") {
        None => Some(Sample::All),
        Some(sn) => read::string(d, sn, "sample").and_then(|t| match t.parse::<Sample>() {
            Ok(s) => Some(s),
            Err(e) => {
                d.error(sn.loc(), e);
                None
            }
        }),
    };
    (p, sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verify_sample_is_all_a_count_or_a_share() {
        assert_eq!("all".parse(), Ok(Sample::All));
        assert_eq!("20".parse(), Ok(Sample::Segments(20)));
        assert_eq!(" 5% ".parse(), Ok(Sample::Percent(5.0)));
        for bad in ["0", "0%", "150%", "-3", "some", "%"] {
            assert!(bad.parse::<Sample>().is_err(), "{bad}");
        }
        assert_eq!(Sample::All.of(7), 7);
        assert_eq!(Sample::Segments(20).of(7), 7);
        assert_eq!(Sample::Segments(2).of(7), 2);
        assert_eq!(Sample::Percent(10.0).of(7), 1);
        assert_eq!(Sample::Percent(50.0).of(7), 4);
        assert_eq!(Sample::Percent(10.0).of(0), 0);
    }
}
