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
    /// `serve.sql`: the PostgreSQL wire protocol listener; off unless set.
    pub sql: Option<SqlSettings>,
    /// `serve.history`: how far back `as_of` answers go (publications and installs are kept
    /// that long).
    pub history: Duration,
}

/// `serve.sql` of lambda.yaml: every view as a table `PIPELINE.VIEW` over the PostgreSQL
/// wire protocol (password: `serve.token`, when set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlSettings {
    /// `HOST:PORT` with an IP address.
    pub listen: String,
    /// A statement running longer is cancelled with SQLSTATE 57014.
    pub statement_timeout: Duration,
    /// A result with more rows is refused with SQLSTATE 54000.
    pub max_rows: usize,
}

impl fmt::Debug for ServeSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServeSettings")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("protect_metrics", &self.protect_metrics)
            .field("sql", &self.sql)
            .field("history", &self.history)
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
    /// Columns not read from the top-level JSON key of their name: a `path:` into the event
    /// or a broker's metadata (`from: meta.KEY`, the path `$meta.KEY`). JSON only.
    pub paths: BTreeMap<String, JsonPath>,
    /// A `timestamp` column of the schema.
    pub event_time: String,
    /// A column of the schema used to drop redelivered events.
    pub event_id: Option<String>,
    pub dedupe_window: Duration,
    /// Partitions of the speed layer (`partitions`, 1 by default): each has its own
    /// write-ahead log, positions, segments and checkpoint, and absorbs on its own; a batch
    /// view's cutoff is a position per partition.
    pub partitions: u32,
    /// The column whose value picks an event's partition (`partition_key`, by default
    /// `event_id`): events with the same key go to the same partition. Without either, each
    /// request goes whole to the next partition in turn.
    pub partition_key: Option<String>,
    /// An `http` pipeline's replicated buffer (`buffer: {kafka: …}` or `{nats: …}`): the door
    /// publishes each accepted event to this broker (a [`Source::Kafka`], or a
    /// [`Source::Nats`] with a partitioned subject) and acknowledges once the broker has; the
    /// speed layer consumes it as that source — so nodes (`serve --node`) can run it. `None`:
    /// the local write-ahead log.
    pub buffer: Option<Source>,
    /// SQL boolean expression; rows for which it is not true are dropped.
    pub filter: Option<String>,
    /// Derived columns `(name, SQL expression)`, evaluated in order after the filter.
    pub columns: Vec<(String, String)>,
    /// Reference tables joined to every event before the filter, in file order; their
    /// columns are `NAME.COLUMN` in `filter` and `columns`.
    pub lookups: Vec<Lookup>,
    pub archive: Archive,
    pub views: Vec<View>,
}

/// Most partitions a pipeline may have.
pub const MAX_PARTITIONS: u32 = 256;

impl Pipeline {
    /// The column that picks an event's partition, if any (see [`Pipeline::partition_key`]).
    pub fn partition_column(&self) -> Option<&str> {
        self.partition_key.as_deref().or(self.event_id.as_deref())
    }

    pub fn view(&self, name: &str) -> Option<&View> {
        self.views.iter().find(|v| v.name == name)
    }

    pub fn column_type(&self, name: &str) -> Option<ColumnType> {
        self.schema.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }
}

/// One `lookups:` entry: a reference table whose row with `key` = the event's `on` is joined
/// to the event (DESIGN.md §8: versioned like logic).
#[derive(Debug, Clone, PartialEq)]
pub struct Lookup {
    /// `[a-z][a-z0-9_]*`; its columns are `NAME.COLUMN` in SQL.
    pub name: String,
    pub from: LookupSource,
    /// The lookup's column matched against the event's `on` (same type: string or int).
    pub key: String,
    /// A column of the pipeline's schema.
    pub on: String,
    /// The lookup's columns and their types, as read from the source; other columns are
    /// ignored.
    pub schema: Vec<(String, ColumnType)>,
    /// How often the speed layer reads the source again (`None`: once, at start).
    pub refresh: Option<Duration>,
    pub on_missing: OnMissing,
    /// Effective dating: `(valid_from, valid_to)` timestamp columns; a row applies to events
    /// with `valid_from <= event_time < valid_to` (a null bound is open).
    pub valid: Option<(String, String)>,
}

impl Lookup {
    /// The column the plan joins in for `column` of this lookup: `NAME.COLUMN`.
    pub fn column_name(&self, column: &str) -> String {
        format!("{}.{column}", self.name)
    }

    pub fn column_type(&self, name: &str) -> Option<ColumnType> {
        self.schema.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }
}

/// Where a lookup's rows come from.
#[derive(Clone, PartialEq)]
pub enum LookupSource {
    /// A CSV (with a header) or Parquet file: lake-relative, or a `file://`, `s3://`,
    /// `az://`, `gs://` URL configured by `options` (as `lake_options`).
    File {
        path: String,
        format: FileFormat,
        options: BTreeMap<String, String>,
    },
    /// The rows of a query against PostgreSQL (a password in `url` only as `${VAR}`).
    Postgres { url: String, query: String },
}

impl LookupSource {
    /// What the source is, for logs: the path, or `postgres:HOST/DB` (no password).
    pub fn describe(&self) -> String {
        match self {
            LookupSource::File { path, .. } => redact_url(path),
            LookupSource::Postgres { url, .. } => format!("postgres {}", redact_url(url)),
        }
    }
}

// Hand-written so a logged or printed spec never shows a password.
impl fmt::Debug for LookupSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupSource::File {
                path,
                format,
                options,
            } => f
                .debug_struct("File")
                .field("path", &redact_url(path))
                .field("format", format)
                .field("options", &options.keys().collect::<Vec<_>>())
                .finish(),
            LookupSource::Postgres { url, query } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("query", query)
                .finish(),
        }
    }
}

/// What happens to an event whose `on` value has no row in the lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissing {
    /// The lookup's columns are null.
    Null,
    /// The event is dropped from every view and kept in the dead-letter area with the reason.
    Reject,
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
    /// `subject` may hold the token [`NATS_PARTITION`]: pipeline partition K then reads the
    /// subject with K in its place ([`nats_subject`]).
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
    /// AMQP 1.0 (Azure Service Bus, RabbitMQ's AMQP 1.0 plugin): one queue or subscription.
    ServiceBus {
        /// `amqp://[user:pass@]host[:port]` or `amqps://…`; credentials mean SASL PLAIN.
        url: String,
        /// The node address the receiver attaches to (a queue, or `TOPIC/Subscriptions/SUB`).
        address: String,
        /// Shared access signature: SASL ANONYMOUS plus a CBS put-token for the entity.
        sas: Option<SasKey>,
        /// Link credit: messages the broker may deliver ahead of their acceptance.
        prefetch: u32,
    },
}

/// A Service Bus shared access key (policy name and key), from the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct SasKey {
    pub name: String,
    pub key: String,
}

impl std::fmt::Debug for SasKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasKey")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The top-level key a broker source adds to each JSON event for its `meta.*` columns.
pub const META_KEY: &str = "$meta";

/// One step of a [`JsonPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathStep {
    Key(String),
    Index(usize),
}

/// Where a column's value sits in a JSON event, from the top-level object: `$.a.b[0]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JsonPath(pub Vec<PathStep>);

impl JsonPath {
    /// The path of metadata key `key` (`from: meta.KEY`).
    pub fn meta(key: &str) -> JsonPath {
        JsonPath(vec![
            PathStep::Key(META_KEY.into()),
            PathStep::Key(key.into()),
        ])
    }

    /// The metadata key this path reads, if it is a `meta.KEY` path.
    pub fn meta_key(&self) -> Option<&str> {
        match self.0.as_slice() {
            [PathStep::Key(m), PathStep::Key(k)] if m == META_KEY => Some(k),
            _ => None,
        }
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(k) = self.meta_key() {
            return write!(f, "meta.{k}");
        }
        f.write_str("$")?;
        for step in &self.0 {
            match step {
                PathStep::Key(k)
                    if !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_alphanumeric() || c == '_' || c == '-') =>
                {
                    write!(f, ".{k}")?
                }
                PathStep::Key(k) => write!(f, "[{}]", serde_json::Value::from(k.as_str()))?,
                PathStep::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
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
            Source::ServiceBus { .. } => "servicebus",
        }
    }

    /// The metadata a source can add to each event as `from: meta.KEY` columns (JSON only),
    /// each with the type it arrives as.
    pub fn meta_keys(&self) -> &'static [(&'static str, ColumnType)] {
        match self {
            Source::ServiceBus { .. } => SERVICEBUS_META,
            Source::Amqp { .. } => AMQP_META,
            Source::Mqtt { .. } => MQTT_META,
            Source::Redis { .. } => REDIS_META,
            Source::Nats { .. } => NATS_META,
            Source::Kafka { .. } => KAFKA_META,
            Source::File { .. } => FILE_META,
            Source::Http | Source::Generator { .. } => &[],
        }
    }
}

/// The token of a `nats` subject that names the pipeline partition, e.g. `clicks.{partition}`:
/// partition K reads `clicks.K` (producers pick the partition, as Kafka producers do).
pub const NATS_PARTITION: &str = "{partition}";

/// A `nats` source's subject for pipeline partition `partition`, or for every partition
/// (`None`: the token becomes the wildcard `*`). A subject without the token is returned as is.
pub fn nats_subject(subject: &str, partition: Option<u32>) -> String {
    match partition {
        Some(k) => subject.replace(NATS_PARTITION, &k.to_string()),
        None => subject.replace(NATS_PARTITION, "*"),
    }
}

/// The partition a message's subject names under the partitioned `pattern` (the number in the
/// token's place); `None` when `pattern` has no token or the subject does not match it.
pub fn nats_partition_of(pattern: &str, subject: &str) -> Option<u32> {
    let at = pattern.split('.').position(|t| t == NATS_PARTITION)?;
    subject.split('.').nth(at)?.parse().ok()
}

/// `meta.*` keys of the `servicebus` source: AMQP 1.0 message properties and header, and the
/// Service Bus annotations (`x-opt-enqueued-time`, `x-opt-sequence-number`,
/// `x-opt-partition-key`; absent on other brokers, so null there).
pub const SERVICEBUS_META: &[(&str, ColumnType)] = &[
    ("message_id", ColumnType::String),
    ("correlation_id", ColumnType::String),
    ("subject", ColumnType::String),
    ("content_type", ColumnType::String),
    ("to", ColumnType::String),
    ("reply_to", ColumnType::String),
    ("user_id", ColumnType::String),
    ("creation_time", ColumnType::Timestamp),
    ("enqueued_time", ColumnType::Timestamp),
    ("sequence_number", ColumnType::Int),
    ("partition_key", ColumnType::String),
    ("delivery_count", ColumnType::Int),
];

/// `meta.*` keys of the `amqp` source (AMQP 0-9-1 delivery and basic properties; the
/// properties' `timestamp` is in seconds, given as a timestamp).
pub const AMQP_META: &[(&str, ColumnType)] = &[
    ("message_id", ColumnType::String),
    ("correlation_id", ColumnType::String),
    ("content_type", ColumnType::String),
    ("app_id", ColumnType::String),
    ("timestamp", ColumnType::Timestamp),
    ("exchange", ColumnType::String),
    ("routing_key", ColumnType::String),
    ("redelivered", ColumnType::Bool),
];

/// `meta.*` keys of the `mqtt` source (the PUBLISH packet).
pub const MQTT_META: &[(&str, ColumnType)] = &[
    ("topic", ColumnType::String),
    ("qos", ColumnType::Int),
    ("retain", ColumnType::Bool),
];

/// `meta.*` keys of the `redis` source: the entry id and the time in it.
pub const REDIS_META: &[(&str, ColumnType)] = &[
    ("stream", ColumnType::String),
    ("id", ColumnType::String),
    ("timestamp", ColumnType::Timestamp),
];

/// `meta.*` keys of the `nats` source (JetStream message and its ack metadata).
pub const NATS_META: &[(&str, ColumnType)] = &[
    ("subject", ColumnType::String),
    ("stream_sequence", ColumnType::Int),
    ("published", ColumnType::Timestamp),
    ("delivered", ColumnType::Int),
];

/// `meta.*` keys of the `file` source: where a record starts — the file (relative to the
/// project when it is inside it), the byte offset, and `position`, both with the file's
/// generation (`FILE#GENERATION:OFFSET`; a generation starts whenever the file is replaced or
/// truncated), which identifies the record for good.
pub const FILE_META: &[(&str, ColumnType)] = &[
    ("file", ColumnType::String),
    ("offset", ColumnType::Int),
    ("position", ColumnType::String),
];

/// `meta.*` keys of the `kafka` source.
pub const KAFKA_META: &[(&str, ColumnType)] = &[
    ("topic", ColumnType::String),
    ("partition", ColumnType::Int),
    ("offset", ColumnType::Int),
];

impl ColumnType {
    /// Whether a value arriving as `self` can fill a column of type `column`: the same type,
    /// or epoch milliseconds as an int, or an int as a float.
    pub fn fits(self, column: ColumnType) -> bool {
        self == column
            || matches!(
                (self, column),
                (ColumnType::Timestamp, ColumnType::Int) | (ColumnType::Int, ColumnType::Float)
            )
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
    /// Where the view's served answer is delivered besides the API (DESIGN.md §8); in file
    /// order. No part of the view's logic: the answer is the same with or without them.
    pub sinks: Vec<Sink>,
}

/// One `sinks:` entry of a view: a destination kept equal to the view's served answer, one
/// row per (window_start, group keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Sink {
    pub target: SinkTarget,
    pub emit: Emit,
    /// Deliveries are at least this far apart (`every`, default 1s).
    pub every: Duration,
    /// `emit: final`: a window is final this long after its end (`allowed_lateness`, 0s).
    pub allowed_lateness: Duration,
}

/// When a sink writes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    /// Every change of the served answer (throttled by `every`).
    Updates,
    /// A window once `window_end + allowed_lateness` has passed in wall time; afterwards again
    /// whenever later data or a batch publication changes it.
    Final,
}

#[derive(Clone, PartialEq)]
pub enum SinkTarget {
    /// A PostgreSQL table, upserted by (window_start, group keys).
    Postgres {
        /// `postgres://…`; a password only through `${VAR}`.
        url: String,
        /// `table` or `schema.table`, lowercase.
        table: String,
    },
    /// A Kafka topic as a changelog: the latest record of a key is the row, a tombstone
    /// (null value) a row that no longer exists.
    Kafka {
        brokers: String,
        topic: String,
        security: KafkaSecurity,
        properties: BTreeMap<String, String>,
    },
    /// The whole answer as one file, replaced atomically.
    Files {
        /// Lake-relative (`exports/revenue.parquet`) or a URL (`s3://…`, `az://…`, `gs://…`,
        /// `file:///…`), ending in the format's extension.
        path: String,
        format: FileFormat,
        /// Object-store settings for a URL `path` (as `lake_options`).
        options: BTreeMap<String, String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Parquet,
    Csv,
}

impl FileFormat {
    pub fn extension(self) -> &'static str {
        match self {
            FileFormat::Parquet => "parquet",
            FileFormat::Csv => "csv",
        }
    }
}

impl SinkTarget {
    pub fn kind(&self) -> &'static str {
        match self {
            SinkTarget::Postgres { .. } => "postgres",
            SinkTarget::Kafka { .. } => "kafka",
            SinkTarget::Files { .. } => "files",
        }
    }

    /// How the sink is named in logs, metrics, `status` and its progress record:
    /// `postgres:TABLE`, `kafka:TOPIC`, `files:PATH`. Unique within a view.
    pub fn name(&self) -> String {
        match self {
            SinkTarget::Postgres { table, .. } => format!("postgres:{table}"),
            SinkTarget::Kafka { topic, .. } => format!("kafka:{topic}"),
            SinkTarget::Files { path, .. } => format!("files:{}", redact_url(path)),
        }
    }
}

impl SinkTarget {
    /// What the sink writes to, for finding two sinks that would write the same thing: the
    /// table of a database, the topic of a cluster, the file.
    pub fn destination(&self) -> String {
        match self {
            SinkTarget::Postgres { url, table } => format!("{} {table}", redact_url(url)),
            SinkTarget::Kafka { brokers, topic, .. } => format!("{brokers} {topic}"),
            SinkTarget::Files { path, .. } => path.clone(),
        }
    }
}

/// `url` with its password (if any) replaced by `***`.
fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Only URLs that can have a password have one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    }
}

// Hand-written so a logged or printed spec never shows a password.
impl fmt::Debug for SinkTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SinkTarget::Postgres { url, table } => f
                .debug_struct("Postgres")
                .field("url", &redact_url(url))
                .field("table", table)
                .finish(),
            SinkTarget::Kafka {
                brokers,
                topic,
                security,
                properties,
            } => f
                .debug_struct("Kafka")
                .field("brokers", brokers)
                .field("topic", topic)
                .field("security", security)
                .field("properties", &properties.keys().collect::<Vec<_>>())
                .finish(),
            SinkTarget::Files {
                path,
                format,
                options,
            } => f
                .debug_struct("Files")
                .field("path", &redact_url(path))
                .field("format", format)
                .field("options", &options.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
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
    /// Check the archive and the two engines (`lambda-ctl verify`), on `sample` of the sealed
    /// segments; the result is recorded for `status`, `/metrics` and answers' `as_of`.
    Verify {
        pipeline: String,
        sample: Sample,
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
            TaskKind::Verify { .. } => "verify",
            TaskKind::Command { .. } => "command",
        }
    }
}

/// Which sealed segments a `verify` reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sample {
    All,
    /// This many, picked at random (all when there are fewer).
    Segments(u64),
    /// This share, in percent (0 < p ≤ 100), picked at random; at least one.
    Percent(f64),
}

impl Sample {
    /// How many of `n` segments to check.
    pub fn of(self, n: usize) -> usize {
        match self {
            Sample::All => n,
            Sample::Segments(k) => usize::try_from(k).unwrap_or(usize::MAX).min(n),
            Sample::Percent(p) => ((n as f64 * p / 100.0).ceil() as usize).clamp(n.min(1), n),
        }
    }
}

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sample::All => f.write_str("all"),
            Sample::Segments(k) => write!(f, "{k}"),
            Sample::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl std::str::FromStr for Sample {
    type Err = String;

    /// `all`, a number of segments (`20`), or a share (`5%`).
    fn from_str(s: &str) -> Result<Sample, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(Sample::All);
        }
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(Sample::Percent(p)),
                _ => Err(format!(
                    "`{s}` is not a share of segments: use a percentage in (0, 100], like `5%`"
                )),
            };
        }
        match s.parse::<u64>() {
            Ok(k) if k > 0 => Ok(Sample::Segments(k)),
            _ => Err(format!(
                "`{s}` is not a sample: use `all`, a number of segments like `20`, or a share like `5%`"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partitioned_nats_subject_names_each_partition() {
        let s = "clicks.{partition}.>";
        assert_eq!(nats_subject(s, Some(3)), "clicks.3.>");
        assert_eq!(nats_subject(s, None), "clicks.*.>");
        assert_eq!(nats_partition_of(s, "clicks.3.eu.web"), Some(3));
        assert_eq!(nats_partition_of(s, "clicks.x.eu"), None);
        assert_eq!(nats_partition_of("clicks.>", "clicks.3"), None, "no token");
        assert_eq!(nats_subject("clicks.>", Some(3)), "clicks.>");
    }
}
