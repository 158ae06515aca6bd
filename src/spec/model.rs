//! The validated project: what every other module consumes. Built only by `spec::load`,
//! so holding a `Pipeline` means it passed every check.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono_tz::Tz;

#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub settings: Settings,
    pub pipelines: Vec<Pipeline>,
    pub workflows: Vec<Workflow>,
}

impl Project {
    pub fn pipeline(&self, name: &str) -> Option<&Pipeline> {
        self.pipelines.iter().find(|p| p.name == name)
    }

    pub fn workflow(&self, name: &str) -> Option<&Workflow> {
        self.workflows.iter().find(|w| w.name == name)
    }
}

/// `lambda.yaml`, with relative paths already resolved against the project directory.
#[derive(Debug, Clone)]
pub struct Settings {
    /// sqlx URL of the state DB (`sqlite://…` or `postgres://…`).
    pub state: String,
    /// Lake URL (`file://`, `memory://`, `s3://`, `az://`, `gs://`).
    pub lake: String,
    /// Passed to the object store builder (endpoint, region, allow_http, use_emulator, …).
    pub lake_options: BTreeMap<String, String>,
    pub serve: ServeSettings,
    /// Default time zone of workflow schedules.
    pub timezone: Tz,
    /// How batch runs scale out (`batch:`).
    pub batch: BatchSettings,
}

/// `batch:` of lambda.yaml: when a run is split into jobs for `lambda-ctl worker` processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// A run with a view with at least this many segments to scan is split into group jobs
    /// and a finish job on the queue; 0 never splits (every run computes in one process).
    pub scale_out_segments: usize,
    /// Segments per group job.
    pub group_segments: usize,
}

#[derive(Clone)]
pub struct ServeSettings {
    pub listen: String,
    /// Bearer token required on `/v1` routes when set. Never printed.
    pub token: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// `/metrics` also requires the bearer token (it is open by default, like `/healthz`).
    pub protect_metrics: bool,
}

impl fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("protect_metrics", &self.protect_metrics)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub description: Option<String>,
    /// The file it came from, relative to the project root.
    pub file: PathBuf,
    pub source: Source,
    pub format: Format,
    /// Declared columns, in file order.
    pub schema: Vec<(String, ColumnType)>,
    /// A `timestamp` column of the schema.
    pub event_time: String,
    /// A column of the schema used to drop redelivered events.
    pub event_id: Option<String>,
    pub dedupe_window: Duration,
    /// SQL boolean expression; rows for which it is not true are dropped.
    pub filter: Option<String>,
    /// Derived columns `(name, SQL expression)`, evaluated in order after the filter.
    pub columns: Vec<(String, String)>,
    pub archive: Archive,
    pub views: Vec<View>,
}

impl Pipeline {
    pub fn view(&self, name: &str) -> Option<&View> {
        self.views.iter().find(|v| v.name == name)
    }

    pub fn column_type(&self, name: &str) -> Option<ColumnType> {
        self.schema.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Http,
    /// Synthetic events at `rate` per second.
    Generator {
        rate: f64,
    },
    File {
        path: String,
        follow: bool,
    },
    Nats {
        url: String,
        stream: String,
        subject: String,
        consumer: String,
    },
    /// `security` carries TLS/SASL (an Event Hubs Kafka endpoint); `properties` are further
    /// librdkafka client settings passed as given.
    Kafka {
        brokers: String,
        topic: String,
        group: String,
        security: KafkaSecurity,
        properties: BTreeMap<String, String>,
    },
    Mqtt {
        url: String,
        topic: String,
        qos: u8,
        client_id: Option<String>,
    },
    Redis {
        url: String,
        stream: String,
        group: String,
        consumer: Option<String>,
    },
    Amqp {
        url: String,
        queue: String,
        prefetch: u16,
    },
}

/// How the `kafka` source authenticates and encrypts (librdkafka `security.protocol`,
/// `sasl.*`, `ssl.ca.location`).
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KafkaSecurity {
    /// `PLAINTEXT` (default), `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`.
    pub protocol: KafkaProtocol,
    /// Present exactly when `protocol` is a SASL one.
    pub sasl: Option<KafkaSasl>,
    /// CA bundle (PEM) to verify the brokers with, instead of the system store.
    pub ssl_ca_location: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaProtocol {
    pub const NAMES: &[&str] = &["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => KafkaProtocol::Plaintext,
            "SSL" => KafkaProtocol::Ssl,
            "SASL_PLAINTEXT" => KafkaProtocol::SaslPlaintext,
            "SASL_SSL" => KafkaProtocol::SaslSsl,
            _ => return None,
        })
    }

    /// The librdkafka `security.protocol` value.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaProtocol::Plaintext => "PLAINTEXT",
            KafkaProtocol::Ssl => "SSL",
            KafkaProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            KafkaProtocol::SaslSsl => "SASL_SSL",
        }
    }

    pub fn is_sasl(self) -> bool {
        matches!(self, KafkaProtocol::SaslPlaintext | KafkaProtocol::SaslSsl)
    }
}

/// SASL credentials. Event Hubs: mechanism `PLAIN`, username `$ConnectionString`, password
/// the namespace connection string (from the environment, `${VAR}`).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: String,
    pub username: String,
    pub password: String,
}

impl KafkaSasl {
    pub const MECHANISMS: &[&str] = &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];
}

// Hand-written so a logged or printed spec never shows the password.
impl std::fmt::Debug for KafkaSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSecurity")
            .field("protocol", &self.protocol)
            .field("sasl", &self.sasl)
            .field("ssl_ca_location", &self.ssl_ca_location)
            .finish()
    }
}

impl std::fmt::Debug for KafkaSasl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSasl")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Http => "http",
            Source::Generator { .. } => "generator",
            Source::File { .. } => "file",
            Source::Nats { .. } => "nats",
            Source::Kafka { .. } => "kafka",
            Source::Mqtt { .. } => "mqtt",
            Source::Redis { .. } => "redis",
            Source::Amqp { .. } => "amqp",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    String,
    Int,
    Float,
    Bool,
    /// UTC instant; RFC 3339 or epoch milliseconds on input.
    Timestamp,
}

impl ColumnType {
    pub const ALL: [(&'static str, ColumnType); 5] = [
        ("string", ColumnType::String),
        ("int", ColumnType::Int),
        ("float", ColumnType::Float),
        ("bool", ColumnType::Bool),
        ("timestamp", ColumnType::Timestamp),
    ];

    pub fn name(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Int => "int",
            ColumnType::Float => "float",
            ColumnType::Bool => "bool",
            ColumnType::Timestamp => "timestamp",
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, ColumnType::Int | ColumnType::Float)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Archive {
    pub segment_rows: u64,
    pub segment_age: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct View {
    pub name: String,
    pub group_by: Vec<String>,
    pub window: Window,
    /// In file order; the order of the served columns.
    pub metrics: Vec<Metric>,
}

/// Event-time windows, aligned to the Unix epoch in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Tumbling {
        size: Duration,
    },
    /// `size` is a whole multiple of `every`; an event is in `size / every` windows.
    Hopping {
        size: Duration,
        every: Duration,
    },
    /// Windows close after `gap` without events for the key.
    Session {
        gap: Duration,
    },
    /// One all-time window; `window_start`/`window_end` are null.
    All,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub aggregate: Aggregate,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Aggregate {
    Count,
    CountCol(String),
    Sum(String),
    Min(String),
    Max(String),
    Avg(String),
    /// Sample standard deviation (n - 1).
    Stddev(String),
    /// Sample variance (n - 1).
    Variance(String),
    /// Value at the earliest event time.
    First(String),
    /// Value at the latest event time.
    Last(String),
    ApproxCountDistinct(String),
    ApproxQuantile(String, f64),
}

impl Aggregate {
    /// The input column, if any.
    pub fn column(&self) -> Option<&str> {
        match self {
            Aggregate::Count => None,
            Aggregate::CountCol(c)
            | Aggregate::Sum(c)
            | Aggregate::Min(c)
            | Aggregate::Max(c)
            | Aggregate::Avg(c)
            | Aggregate::Stddev(c)
            | Aggregate::Variance(c)
            | Aggregate::First(c)
            | Aggregate::Last(c)
            | Aggregate::ApproxCountDistinct(c)
            | Aggregate::ApproxQuantile(c, _) => Some(c),
        }
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregate::Count => write!(f, "count()"),
            Aggregate::CountCol(c) => write!(f, "count({c})"),
            Aggregate::Sum(c) => write!(f, "sum({c})"),
            Aggregate::Min(c) => write!(f, "min({c})"),
            Aggregate::Max(c) => write!(f, "max({c})"),
            Aggregate::Avg(c) => write!(f, "avg({c})"),
            Aggregate::Stddev(c) => write!(f, "stddev({c})"),
            Aggregate::Variance(c) => write!(f, "variance({c})"),
            Aggregate::First(c) => write!(f, "first({c})"),
            Aggregate::Last(c) => write!(f, "last({c})"),
            Aggregate::ApproxCountDistinct(c) => write!(f, "approx_count_distinct({c})"),
            Aggregate::ApproxQuantile(c, q) => write!(f, "approx_quantile({c}, {q})"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Workflow {
    pub name: String,
    pub description: Option<String>,
    pub file: PathBuf,
    pub schedule: Option<super::schedule::Schedule>,
    pub timezone: Tz,
    pub catchup: bool,
    pub max_active_runs: u32,
    /// In file order, which is also a valid order of the DAG's `needs`.
    pub tasks: Vec<Task>,
}

impl Workflow {
    pub fn task(&self, name: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.name == name)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub name: String,
    pub kind: TaskKind,
    pub needs: Vec<String>,
    pub retries: u32,
    /// Delay before the first retry; doubles on each further one.
    pub retry_delay: Duration,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskKind {
    /// Recompute views of a pipeline (all when `views` is None).
    Batch {
        pipeline: String,
        views: Option<Vec<String>>,
    },
    Compact {
        pipeline: String,
    },
    Retention {
        pipeline: String,
        keep: Duration,
    },
    /// argv; `${LAMBDA_RUN_ID}`, `${LAMBDA_WORKFLOW}`, `${LAMBDA_SCHEDULED_AT}` are expanded at run time.
    Command {
        argv: Vec<String>,
    },
}

impl TaskKind {
    pub fn kind(&self) -> &'static str {
        match self {
            TaskKind::Batch { .. } => "batch",
            TaskKind::Compact { .. } => "compact",
            TaskKind::Retention { .. } => "retention",
            TaskKind::Command { .. } => "command",
        }
    }
}
