//! `lambda-ctl validate`: every problem at once, or a one-line summary per pipeline/workflow.

use std::path::Path;

use super::CliError;
use crate::spec::{self, Project, Window, duration};

pub fn run(project: &Path) -> Result<(), CliError> {
    match spec::load(project) {
        Ok(p) => {
            print!("{}", summary(&p));
            Ok(())
        }
        Err(errors) => {
            let n = errors.0.len();
            Err(CliError::User(format!(
                "{errors}\n{n} problem{} found",
                if n == 1 { "" } else { "s" }
            )))
        }
    }
}

/// One line per pipeline and workflow.
pub fn summary(p: &Project) -> String {
    let mut out = String::new();
    for pl in &p.pipelines {
        let views: Vec<String> = pl
            .views
            .iter()
            .map(|v| format!("{} ({})", v.name, window_name(&v.window)))
            .collect();
        out.push_str(&format!(
            "pipeline {}: {} source, {} columns, views: {}\n",
            pl.name,
            pl.source.kind(),
            pl.schema.len() + pl.columns.len(),
            views.join(", ")
        ));
    }
    for wf in &p.workflows {
        let schedule = wf.schedule.as_ref().map_or("manual".to_string(), |s| {
            format!("`{}` {}", s.expr, wf.timezone)
        });
        let tasks: Vec<&str> = wf.tasks.iter().map(|t| t.name.as_str()).collect();
        out.push_str(&format!(
            "workflow {}: {schedule}, tasks: {}\n",
            wf.name,
            tasks.join(" ")
        ));
    }
    if p.pipelines.is_empty() && p.workflows.is_empty() {
        out.push_str(
            "no pipelines or workflows found (run `lambda-ctl init` to scaffold a project)\n",
        );
    }
    out
}

fn window_name(w: &Window) -> String {
    match w {
        Window::Tumbling { size } => format!("tumbling {}", duration::format(*size)),
        Window::Hopping { size, every } => format!(
            "hopping {} every {}",
            duration::format(*size),
            duration::format(*every)
        ),
        Window::Session { gap } => format!("session gap {}", duration::format(*gap)),
        Window::All => "all".into(),
    }
}
