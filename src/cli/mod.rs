//! The `lambda-ctl` command line: clap types here, one file per subcommand.
//!
//! Exit codes: 0 success, 1 user error (bad spec, bad argument, failed run), 2 internal error.

mod backfill;
mod client;
mod diff;
mod ingest;
mod init;
mod logs;
mod query;
mod restatements;
mod run;
mod run_workflow;
mod runs;
mod serve;
mod status;
mod validate;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "lambda-ctl",
    version,
    about = "Lambda-architecture orchestrator: speed, batch and serving layers from one YAML spec"
)]
pub struct Cli {
    /// Project directory (holds lambda.yaml, pipelines/, workflows/).
    #[arg(long, global = true, env = "LAMBDA_PROJECT", default_value = ".")]
    pub project: PathBuf,

    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log lines on stderr: -v info, -vv debug. One-shot commands log only warnings and
    /// errors by default, `serve` and `worker` info; `RUST_LOG` overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scaffold a project (one pipeline, one workflow) in DIR.
    Init {
        /// Directory to create the project in (default: the current directory).
        dir: Option<PathBuf>,
    },
    /// Check every file of the project; list all problems and exit 1 if there are any.
    Validate,
    /// Run the speed layer for every pipeline, its sources and the HTTP API.
    Serve {
        /// Address to listen on (default: `serve.listen` of lambda.yaml, 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Run as node NAME of a cluster: the `serve` processes on one state DB share each
        /// pipeline's partitions through leases (kafka sources, http with a kafka `buffer`).
        #[arg(long, value_name = "NAME", value_parser = parse_node)]
        node: Option<String>,
    },
    /// Send NDJSON (or CSV) events to a pipeline of a running server.
    Ingest {
        pipeline: String,
        /// File to send; `-` or nothing reads stdin.
        file: Option<String>,
        /// Server address (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Show a view: the merged answer of the batch and speed layers.
    Query {
        /// PIPELINE.VIEW
        view: String,
        /// Only rows whose group_by column equals a value: COL=VALUE (repeatable).
        #[arg(long = "where", value_name = "COL=VALUE")]
        filters: Vec<String>,
        /// Windows starting at or after T (RFC 3339, date, or relative like -1h).
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Windows starting before T.
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// The answer served at instant T (RFC 3339 to the nanosecond as an answer's `as_of.at`
        /// gives it, date, or relative like -1h), within `serve.history`.
        #[arg(long, allow_hyphen_values = true, value_name = "T")]
        as_of: Option<String>,
        #[arg(long, value_enum, default_value_t = query::OutputFormat::Table)]
        format: query::OutputFormat,
        /// Server address (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Compare a view's candidate version (`run PIPELINE --candidate`) with what it serves:
    /// rows added, removed and changed, with counts and a sample.
    Diff {
        /// PIPELINE.VIEW
        view: String,
        /// Rows shown of each kind.
        #[arg(long, default_value_t = 5)]
        sample: usize,
        /// The counts and the sample as JSON.
        #[arg(long)]
        json: bool,
        /// Server address (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Forget a pipeline's candidate versions (`run PIPELINE --candidate`).
    Discard {
        /// The pipeline.
        pipeline: String,
    },
    /// Serve the definition of a pipeline's views in pipelines/: each changed view switches to
    /// its candidate (`run PIPELINE --candidate`) atomically, and a running server runs the
    /// new definition from that instant (without a server, the next `serve` does).
    Promote {
        /// The pipeline.
        pipeline: String,
        /// Server address (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Show a view's restatement ledger: the windows late events, or a publication that
    /// restated history, changed after they were served — each with the row before and after.
    Restatements {
        /// PIPELINE.VIEW
        view: String,
        /// Entries recorded at or after T (RFC 3339, date, or relative like -1h).
        #[arg(long, allow_hyphen_values = true)]
        from: Option<String>,
        /// Entries recorded before T.
        #[arg(long, allow_hyphen_values = true)]
        to: Option<String>,
        /// At most N entries, oldest first (default 1000).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: Option<u64>,
        /// The server's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
        /// Server address (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Start a run now and print its id. NAME is a workflow, or a pipeline: recompute its
    /// views from its sealed segments and publish them (whether or not a server is running; it
    /// picks the result up).
    Run {
        /// A workflow or a pipeline.
        name: String,
        /// Show progress, and exit with the run's status (0 succeeded, 1 failed). A workflow's
        /// tasks also execute in this process, so the run progresses without a server.
        #[arg(long)]
        wait: bool,
        /// Pipeline only: only these views (comma-separated).
        #[arg(long, value_delimiter = ',')]
        views: Vec<String>,
        /// Pipeline only: recompute from every sealed segment, even views whose published
        /// version has the same logic (a run otherwise builds on it, incrementally).
        #[arg(long)]
        full: bool,
        /// Pipeline only: read every lookup table from its source now and recompute every
        /// view from every segment with those versions, recording them as the segments'
        /// versions (history restated with today's reference data; without it, each segment
        /// is recomputed with the versions it was enriched with when it arrived).
        #[arg(long)]
        refresh_lookups: bool,
        /// Pipeline only: recompute the views whose definition in the YAML differs from the
        /// version served (or `--views`) from every segment, as candidate versions beside the
        /// live ones — which stay current — for `lambda-ctl diff` and `?version=candidate`.
        #[arg(long, conflicts_with = "refresh_lookups")]
        candidate: bool,
        /// Internal: this process is the background half of `run PIPELINE` without --wait.
        #[arg(long, hide = true)]
        detached: bool,
    },
    /// Check the archive (each sealed segment's file is the one sealed: size, checksum,
    /// positions, event times) and recompute every view over it in both engines (batch scan
    /// and the speed path); report what is wrong and exit 1 on anything. The result is
    /// recorded (shown by `status`, `/metrics` and answers' `as_of`).
    Verify {
        /// The pipeline.
        pipeline: String,
        /// Which sealed segments: `all`, a number picked at random (`20`), or a share (`5%`).
        #[arg(long, default_value = "all", value_parser = parse_sample)]
        sample: crate::spec::Sample,
    },
    /// Run history, newest first.
    Runs {
        /// Only runs of this workflow.
        workflow: Option<String>,
        /// How many runs to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A run's log and the output of every task attempt.
    Logs { run_id: i64 },
    /// Queue one run per schedule slot of WORKFLOW between --from and --to (inclusive).
    Backfill {
        workflow: String,
        /// First slot (RFC 3339, date, or relative like -7d).
        #[arg(long, allow_hyphen_values = true)]
        from: String,
        /// Last slot.
        #[arg(long, allow_hyphen_values = true)]
        to: String,
    },
    /// Overview for operators: pipelines (rate, lag, open segment, batch cutoff age),
    /// workflows (next fire, last run), recent runs; failing things first. Reads the state DB,
    /// and adds live figures when the project's server answers.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Server address for live figures (default: `serve.listen` of lambda.yaml).
        #[arg(long)]
        server: Option<String>,
    },
    /// Run task workers only (scale-out: many machines on one PostgreSQL state).
    Worker {
        /// Task attempts to execute at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Also compete for the scheduler role (one process schedules at a time), as `serve`
        /// does.
        #[arg(long)]
        schedule: bool,
    },
}

impl Cli {
    /// The log level without `RUST_LOG`: `serve` and `worker` run for long and say what they
    /// do; a one-shot command's output is its answer, so it logs only what went wrong.
    fn log_level(&self) -> &'static str {
        let long_running = matches!(self.command, Command::Serve { .. } | Command::Worker { .. });
        match self.verbose {
            0 if long_running => "info",
            0 => "warn",
            1 => "info",
            2 => "debug",
            _ => "trace",
        }
    }
}

/// A failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The user can fix it: bad spec, bad argument, failed run.
    #[error("{0}")]
    User(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::User(_) => ExitCode::from(1),
            CliError::Internal(_) => ExitCode::from(2),
        }
    }
}

fn parse_sample(s: &str) -> Result<crate::spec::Sample, String> {
    s.parse()
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // clap uses 2 for usage errors; a bad argument is a user error here.
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format, cli.log_level());
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match &e {
                CliError::User(msg) => eprintln!("{msg}"),
                CliError::Internal(err) => eprintln!("error: {err:#}"),
            }
            e.exit_code()
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Init { dir } => init::run(&dir.unwrap_or_else(|| cli.project.clone())),
        Command::Validate => validate::run(&cli.project),
        Command::Serve { listen, node } => serve::run(&cli.project, listen, node),
        Command::Ingest {
            pipeline,
            file,
            server,
        } => ingest::run(&cli.project, &pipeline, file.as_deref(), server.as_deref()),
        Command::Query {
            view,
            filters,
            from,
            to,
            as_of,
            format,
            server,
        } => query::run(
            &cli.project,
            query::Args {
                target: &view,
                filters: &filters,
                from: from.as_deref(),
                to: to.as_deref(),
                as_of: as_of.as_deref(),
                format,
                server: server.as_deref(),
            },
        ),
        Command::Diff {
            view,
            sample,
            json,
            server,
        } => diff::run(
            &cli.project,
            diff::Args {
                target: &view,
                sample,
                json,
                server: server.as_deref(),
            },
        ),
        Command::Discard { pipeline } => diff::discard(&cli.project, &pipeline),
        Command::Promote { pipeline, server } => {
            diff::promote(&cli.project, &pipeline, server.as_deref())
        }
        Command::Restatements {
            view,
            from,
            to,
            limit,
            json,
            server,
        } => restatements::run(
            &cli.project,
            restatements::Args {
                target: &view,
                from: from.as_deref(),
                to: to.as_deref(),
                limit,
                json,
                server: server.as_deref(),
            },
        ),
        Command::Run {
            name,
            wait,
            views,
            full,
            refresh_lookups,
            candidate,
            detached,
        } => run_workflow::run(
            &cli.project,
            &name,
            wait,
            detached,
            (&views, full, refresh_lookups, candidate),
        ),
        Command::Verify { pipeline, sample } => run::verify(&cli.project, &pipeline, sample),
        Command::Runs { workflow, limit } => runs::run(&cli.project, workflow.as_deref(), limit),
        Command::Logs { run_id } => logs::run(&cli.project, run_id),
        Command::Backfill { workflow, from, to } => {
            backfill::run(&cli.project, &workflow, &from, &to)
        }
        Command::Worker {
            concurrency,
            schedule,
        } => worker::run(&cli.project, concurrency, schedule),
        Command::Status { json, server } => status::run(&cli.project, server.as_deref(), json),
    }
}

/// Loads the project or fails with every problem, as `validate` prints them.
fn load_project(dir: &std::path::Path) -> Result<crate::spec::Project, CliError> {
    // A mistyped --project must not become an empty project with a new state DB in it.
    let marks = ["lambda.yaml", "pipelines", "workflows"];
    if !marks.iter().any(|m| dir.join(m).exists()) {
        let what = if dir.is_dir() {
            "has no lambda.yaml, pipelines/ or workflows/"
        } else {
            "does not exist"
        };
        return Err(CliError::User(format!(
            "{} {what}: not a lambda-ctl project (give its directory with --project DIR or LAMBDA_PROJECT, or create one with `lambda-ctl init {}`)",
            dir.display(),
            dir.display()
        )));
    }
    crate::spec::load(dir).map_err(|e| {
        let n = e.0.len();
        CliError::User(format!(
            "{e}
{n} problem{} found (see `lambda-ctl validate`)",
            if n == 1 { "" } else { "s" }
        ))
    })
}

fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A node's name: 1 to 64 letters, digits, `-`, `_` or `.`.
fn parse_node(name: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_string())
    } else {
        Err("a node name is 1 to 64 letters, digits, '-', '_' or '.'".to_string())
    }
}
