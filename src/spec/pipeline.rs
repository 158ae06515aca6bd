//! `pipelines/NAME.yaml` → [`Pipeline`], reporting every problem with its location.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::diag::{Diagnostics, did_you_mean};
use super::expr;
use super::model::*;
use super::read::{self, Obj};
use super::yaml::{Loc, Node};

const KEYS: &[&str] = &[
    "name",
    "description",
    "source",
    "format",
    "schema",
    "event_time",
    "event_id",
    "dedupe_window",
    "filter",
    "columns",
    "archive",
    "views",
];
const SOURCE_TYPES: &[&str] = &[
    "http",
    "generator",
    "file",
    "nats",
    "kafka",
    "mqtt",
    "redis",
    "amqp",
    "servicebus",
];
pub const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "stddev",
    "variance",
    "first",
    "last",
    "approx_count_distinct",
    "approx_quantile",
];

pub fn build(d: &mut Diagnostics, root: &Node, file: &Path) -> Option<Pipeline> {
    let obj = Obj::new(d, root, "pipeline", KEYS)?;
    let name = obj
        .required(d, "name", "pipeline")
        .and_then(|n| read::name(d, n, "pipeline name"));
    let description = obj
        .value("description")
        .and_then(|n| read::string(d, n, "description"));
    let source = obj
        .required(d, "source", "pipeline")
        .and_then(|n| source(d, n, name.as_deref().unwrap_or("pipeline")));
    let format = match obj.value("format") {
        None => Some(Format::Json),
        Some(n) => match read::string(d, n, "format").as_deref() {
            Some("json" | "ndjson") => Some(Format::Json),
            Some("csv") => Some(Format::Csv),
            Some(other) => {
                d.error(
                    n.loc(),
                    format!(
                        "unknown format `{other}` (use `json` or `csv`){}",
                        did_you_mean(other, ["json", "csv"])
                    ),
                );
                None
            }
            None => None,
        },
    };
    let mapped = obj
        .required(d, "schema", "pipeline")
        .and_then(|n| schema(d, n, source.as_ref(), format));
    let schema_ok = mapped.is_some();
    let (mut schema, mut paths) = mapped.unwrap_or_default();
    // AMQP 1.0 messages carry a message-id: without `event_id`, it is the one (a column
    // `_message_id` of the events), so redeliveries are dropped at the door.
    let mut default_event_id = None;
    if schema_ok
        && matches!(source, Some(Source::ServiceBus { .. }))
        && obj.value("event_id").is_none()
        && format == Some(Format::Json)
    {
        let message_id = JsonPath::meta("message_id");
        let declared = paths
            .iter()
            .find(|(_, p)| **p == message_id)
            .map(|(c, _)| c.clone());
        default_event_id = Some(declared.unwrap_or_else(|| {
            let col = DEFAULT_MESSAGE_ID.to_string();
            if !schema.iter().any(|(c, _)| *c == col) {
                schema.push((col.clone(), ColumnType::String));
                paths.insert(col.clone(), message_id);
            }
            col
        }));
    }

    let event_time = obj.required(d, "event_time", "pipeline").and_then(|n| {
        let col = read::string(d, n, "event_time")?;
        match schema.iter().find(|(c, _)| *c == col) {
            Some((_, ColumnType::Timestamp)) => Some(col),
            Some((_, t)) => {
                d.error(n.loc(), format!("event_time column `{col}` is a {}, not a timestamp (declare it `{col}: timestamp`)", t.name()));
                None
            }
            None if !schema_ok => None,
            None => {
                d.error(n.loc(), unknown_column("event_time", &col, &schema));
                None
            }
        }
    });
    let event_id = obj
        .value("event_id")
        .and_then(|n| {
            let col = read::string(d, n, "event_id")?;
            if schema_ok && !schema.iter().any(|(c, _)| *c == col) {
                d.error(n.loc(), unknown_column("event_id", &col, &schema));
                return None;
            }
            Some(col)
        })
        .or(default_event_id);
    let dedupe_window = optional(
        d,
        &obj,
        "dedupe_window",
        Duration::from_secs(86_400),
        read::duration,
    );
    // (A servicebus pipeline's event id defaults to the message-id even when the schema has
    // errors: no second, misleading error about the window.)
    let defaulted = matches!(source, Some(Source::ServiceBus { .. }));
    if obj.value("dedupe_window").is_some() && event_id.is_none() && !defaulted {
        d.error(
            obj.get("dedupe_window").map_or(obj.loc, Node::loc),
            "`dedupe_window` has no effect without `event_id`",
        );
    }

    // Filter sees the declared columns; derived columns see those plus earlier derived ones.
    let filter = obj.value("filter").and_then(|n| {
        let sql = read::string(d, n, "filter")?;
        if schema_ok {
            match expr::check(&sql, &schema) {
                Ok(ColumnType::Bool) => {}
                Ok(t) => d.error(
                    n.loc(),
                    format!(
                        "filter `{sql}` must be a boolean expression, it is a {}",
                        t.name()
                    ),
                ),
                Err(e) => d.error(n.loc(), format!("filter `{sql}`: {e}")),
            }
        }
        Some(sql)
    });
    let mut available = schema.clone();
    let mut columns = Vec::new();
    if let Some(n) = obj.value("columns") {
        if let Node::Map { entries: cols, .. } = n {
            for (key, value) in cols {
                let Some(sql) = read::string(d, value, &key.name) else {
                    continue;
                };
                if !read::is_identifier(&key.name) {
                    d.error(
                        key.loc,
                        format!(
                            "invalid column name `{}`: use letters, digits and `_`",
                            key.name
                        ),
                    );
                    continue;
                }
                if available.iter().any(|(c, _)| *c == key.name) {
                    d.error(
                        key.loc,
                        format!("derived column `{}` is already a column", key.name),
                    );
                    continue;
                }
                if schema_ok {
                    match expr::check(&sql, &available) {
                        Ok(t) => available.push((key.name.clone(), t)),
                        Err(e) => {
                            d.error(value.loc(), format!("column `{}` = `{sql}`: {e}", key.name))
                        }
                    }
                }
                columns.push((key.name.clone(), sql));
            }
        } else {
            d.error(
                n.loc(),
                format!(
                    "`columns` must be a mapping of name: SQL expression, found {}",
                    n.kind()
                ),
            );
        }
    }

    let archive = match obj.value("archive") {
        None => Some(Archive {
            segment_rows: 500_000,
            segment_age: Duration::from_secs(60),
        }),
        Some(n) => Obj::new(d, n, "archive", &["segment_rows", "segment_age"]).and_then(|a| {
            let rows = optional(d, &a, "segment_rows", 500_000, read::integer);
            if rows == Some(0) {
                d.error(
                    a.get("segment_rows").map_or(a.loc, Node::loc),
                    "`segment_rows` must be at least 1",
                );
            }
            let age = optional(
                d,
                &a,
                "segment_age",
                Duration::from_secs(60),
                read::duration,
            );
            Some(Archive {
                segment_rows: rows.filter(|r| *r > 0)?,
                segment_age: age?,
            })
        }),
    };

    let views = obj
        .required(d, "views", "pipeline")
        .and_then(|n| views(d, n, &available, schema_ok));

    Some(Pipeline {
        name: name?,
        description,
        file: file.to_path_buf(),
        source: source?,
        format: format?,
        schema,
        paths,
        event_time: event_time?,
        event_id,
        dedupe_window: dedupe_window?,
        filter,
        columns,
        archive: archive?,
        views: views?,
    })
    .filter(|_| schema_ok && d.is_empty())
}

/// Reads `key` with `f` when present, else `default`.
fn optional<T>(
    d: &mut Diagnostics,
    obj: &Obj,
    key: &str,
    default: T,
    f: impl FnOnce(&mut Diagnostics, &Node, &str) -> Option<T>,
) -> Option<T> {
    match obj.value(key) {
        None => Some(default),
        Some(n) => f(d, n, key),
    }
}

fn unknown_column(what: &str, col: &str, columns: &[(String, ColumnType)]) -> String {
    format!(
        "{what} names unknown column `{col}`{}",
        did_you_mean(col, columns.iter().map(|(c, _)| c.as_str()))
    )
}

fn source(d: &mut Diagnostics, node: &Node, pipeline: &str) -> Option<Source> {
    let Some(ty_node) = node.get("type").filter(|n| !n.is_null()) else {
        if matches!(node, Node::Map { .. }) {
            d.error(
                node.loc(),
                format!(
                    "source is missing required key `type` (one of {})",
                    SOURCE_TYPES.join(", ")
                ),
            );
        } else {
            d.error(
                node.loc(),
                format!("source must be a mapping, found {}", node.kind()),
            );
        }
        return None;
    };
    let ty = read::string(d, ty_node, "type")?;
    let allowed: &[&str] = match ty.as_str() {
        "http" => &["type"],
        "generator" => &["type", "rate"],
        "file" => &["type", "path", "follow"],
        "nats" => &["type", "url", "stream", "subject", "consumer"],
        "kafka" => &[
            "type",
            "brokers",
            "topic",
            "group",
            "security_protocol",
            "sasl",
            "ssl_ca_location",
            "properties",
        ],
        "mqtt" => &["type", "url", "topic", "qos", "client_id"],
        "redis" => &["type", "url", "stream", "group", "consumer"],
        "amqp" => &["type", "url", "queue", "prefetch"],
        "servicebus" => &[
            "type",
            "url",
            "queue",
            "topic",
            "subscription",
            "sas_key_name",
            "sas_key",
            "prefetch",
        ],
        other => {
            d.error(
                ty_node.loc(),
                format!(
                    "unknown source type `{other}`{} (one of {})",
                    did_you_mean(other, SOURCE_TYPES.iter().copied()),
                    SOURCE_TYPES.join(", ")
                ),
            );
            return None;
        }
    };
    let what = format!("{ty} source");
    let obj = Obj::new(d, node, &what, allowed)?;
    let req = |d: &mut Diagnostics, key: &str| {
        obj.required(d, key, &what)
            .and_then(|n| read::string(d, n, key))
    };
    let src = match ty.as_str() {
        "http" => Source::Http,
        "generator" => {
            let rate = match obj.value("rate") {
                None => Some(100.0),
                Some(n) => read::string(d, n, "rate").and_then(|s| match parse_rate(&s) {
                    Ok(r) => Some(r),
                    Err(e) => {
                        d.error(n.loc(), e);
                        None
                    }
                }),
            };
            Source::Generator { rate: rate? }
        }
        "file" => {
            let path = req(d, "path");
            let follow = optional(d, &obj, "follow", false, read::boolean);
            Source::File {
                path: path?,
                follow: follow?,
            }
        }
        "nats" => {
            let (url, stream, subject) = (req(d, "url"), req(d, "stream"), req(d, "subject"));
            let consumer = optional(
                d,
                &obj,
                "consumer",
                format!("lambda-{pipeline}"),
                read::string,
            );
            Source::Nats {
                url: url?,
                stream: stream?,
                subject: subject?,
                consumer: consumer?,
            }
        }
        "kafka" => {
            let (brokers, topic) = (req(d, "brokers"), req(d, "topic"));
            let group = optional(d, &obj, "group", format!("lambda-{pipeline}"), read::string);
            let security = kafka_security(d, &obj);
            let properties = optional(d, &obj, "properties", BTreeMap::new(), kafka_properties);
            Source::Kafka {
                brokers: brokers?,
                topic: topic?,
                group: group?,
                security: security?,
                properties: properties?,
            }
        }
        "mqtt" => {
            let (url, topic) = (req(d, "url"), req(d, "topic"));
            let qos = optional(d, &obj, "qos", 1, read::integer);
            if let (Some(q), Some(n)) = (qos, obj.value("qos"))
                && !(1..=2).contains(&q)
            {
                d.error(
                    n.loc(),
                    format!("`qos` must be 1 or 2 (QoS 0 can lose events), found {q}"),
                );
            }
            let client_id = obj
                .value("client_id")
                .and_then(|n| read::string(d, n, "client_id"));
            Source::Mqtt {
                url: url?,
                topic: topic?,
                qos: qos.filter(|q| (1..=2).contains(q))? as u8,
                client_id,
            }
        }
        "redis" => {
            let (url, stream) = (req(d, "url"), req(d, "stream"));
            let group = optional(d, &obj, "group", "lambda".to_string(), read::string);
            let consumer = obj
                .value("consumer")
                .and_then(|n| read::string(d, n, "consumer"));
            Source::Redis {
                url: url?,
                stream: stream?,
                group: group?,
                consumer,
            }
        }
        "amqp" => {
            let (url, queue) = (req(d, "url"), req(d, "queue"));
            let prefetch = optional(d, &obj, "prefetch", 1000, read::integer);
            let prefetch = prefetch.and_then(|p| match u16::try_from(p) {
                Ok(p) if p > 0 => Some(p),
                _ => {
                    d.error(
                        obj.get("prefetch").map_or(obj.loc, Node::loc),
                        "`prefetch` must be between 1 and 65535",
                    );
                    None
                }
            });
            Source::Amqp {
                url: url?,
                queue: queue?,
                prefetch: prefetch?,
            }
        }
        "servicebus" => servicebus(d, &obj)?,
        _ => unreachable!("source types are matched above"),
    };
    Some(src)
}

/// The column holding the AMQP message-id when a `servicebus` pipeline names no `event_id`.
pub const DEFAULT_MESSAGE_ID: &str = "_message_id";

/// A `servicebus` source: the URL's scheme, exactly one entity, SAS keys given together.
fn servicebus(d: &mut Diagnostics, obj: &Obj) -> Option<Source> {
    let what = "servicebus source";
    let url = obj.required(d, "url", what).and_then(|n| {
        let s = read::string(d, n, "url")?;
        match url::Url::parse(&s) {
            Ok(u) if matches!(u.scheme(), "amqp" | "amqps") && u.host_str().is_some() => Some(s),
            Ok(u) if !matches!(u.scheme(), "amqp" | "amqps") => {
                d.error(
                    n.loc(),
                    format!(
                        "servicebus `url` must start with amqps:// (Service Bus) or amqp:// (a local broker), found `{}://`",
                        u.scheme()
                    ),
                );
                None
            }
            _ => {
                d.error(
                    n.loc(),
                    format!(
                        "invalid servicebus `url` `{s}` (write amqps://NAMESPACE.servicebus.windows.net or amqp://127.0.0.1:5672)"
                    ),
                );
                None
            }
        }
    });
    let text =
        |d: &mut Diagnostics, key: &str| obj.value(key).and_then(|n| read::string(d, n, key));
    let (queue, topic, subscription) =
        (text(d, "queue"), text(d, "topic"), text(d, "subscription"));
    let address = match (queue, topic, subscription) {
        (Some(q), None, None) => Some(q),
        (None, Some(t), Some(s)) => Some(format!("{t}/Subscriptions/{s}")),
        (Some(_), _, _) => {
            d.error(
                obj.get("topic")
                    .or(obj.get("subscription"))
                    .map_or(obj.loc, Node::loc),
                "a servicebus source reads either a `queue` or a `topic` with a `subscription`, not both",
            );
            None
        }
        (None, Some(_), None) => {
            d.error(
                obj.get("topic").map_or(obj.loc, Node::loc),
                "`topic` needs a `subscription` (the subscription this pipeline reads)",
            );
            None
        }
        (None, None, Some(_)) => {
            d.error(
                obj.get("subscription").map_or(obj.loc, Node::loc),
                "`subscription` needs the `topic` it belongs to",
            );
            None
        }
        (None, None, None) => {
            if obj.get("queue").is_none() && obj.get("topic").is_none() {
                d.error(
                    obj.loc,
                    "servicebus source is missing `queue` (or `topic` and `subscription`)",
                );
            }
            None
        }
    };
    // Present but empty: typically a `${VAR:-}` whose variable is unset.
    let secret = |d: &mut Diagnostics, key: &str| -> Option<Option<String>> {
        let Some(n) = obj.get(key) else {
            return Some(None);
        };
        if !n.is_null()
            && let Some(s) = read::string(d, n, key)
            && !s.is_empty()
        {
            return Some(Some(s));
        }
        d.error(
            n.loc(),
            format!("`{key}` is empty (write `${{VAR}}` and set VAR in the environment)"),
        );
        None
    };
    let sas = match (secret(d, "sas_key_name")?, secret(d, "sas_key")?) {
        (Some(name), Some(key)) => Some(SasKey { name, key }),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            d.error(
                obj.get("sas_key_name")
                    .or(obj.get("sas_key"))
                    .map_or(obj.loc, Node::loc),
                "`sas_key_name` and `sas_key` go together (a shared access policy and its key)",
            );
            return None;
        }
    };
    let prefetch =
        optional(d, obj, "prefetch", 1000, read::integer).and_then(|p| match u32::try_from(p) {
            Ok(p) if (1..=100_000).contains(&p) => Some(p),
            _ => {
                d.error(
                    obj.get("prefetch").map_or(obj.loc, Node::loc),
                    "`prefetch` must be between 1 and 100000",
                );
                None
            }
        });
    Some(Source::ServiceBus {
        url: url?,
        address: address?,
        sas,
        prefetch: prefetch?,
    })
}

/// Where a secret of a pipeline file is written as a literal rather than `${VAR}`: checked on
/// the file as written, before interpolation. Only `source.sas_key` is such a secret.
pub fn literal_secrets(root: &Node) -> Vec<(Loc, String)> {
    let mut out = Vec::new();
    if let Some(source) = root.get("source")
        && let Some(Node::Scalar { value, loc, .. }) = source.get("sas_key")
        && !value.trim().is_empty()
        && !(value.trim_start().starts_with("${") && value.trim_end().ends_with('}'))
    {
        out.push((
            *loc,
            "`sas_key` is a secret: write it as `${VAR}` and set VAR in the environment, not in the file".to_string(),
        ));
    }
    out
}

/// `1000/s`, `60/m`, `3600/h` or a plain number (per second).
fn parse_rate(s: &str) -> Result<f64, String> {
    let bad = || {
        format!("invalid rate `{s}` (write events per second like `1000/s`, or `60/m`, `100/h`)")
    };
    let (n, per) = match s.trim().split_once('/') {
        Some((n, "s")) => (n, 1.0),
        Some((n, "m")) => (n, 60.0),
        Some((n, "h")) => (n, 3600.0),
        Some(_) => return Err(bad()),
        None => (s.trim(), 1.0),
    };
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    if !(n.is_finite() && n > 0.0) {
        return Err(bad());
    }
    Ok(n / per)
}

/// `security_protocol`, `sasl` and `ssl_ca_location` of a kafka source: SASL credentials are
/// required with (and only with) a SASL protocol, so a half-configured Event Hubs source is
/// reported at validation rather than as an authentication failure at run time.
fn kafka_security(d: &mut Diagnostics, obj: &Obj) -> Option<KafkaSecurity> {
    let protocol_node = obj.value("security_protocol");
    let protocol = match protocol_node {
        None => Some(KafkaProtocol::Plaintext),
        Some(n) => read::string(d, n, "security_protocol").and_then(|s| {
            let p = KafkaProtocol::parse(&s);
            if p.is_none() {
                d.error(
                    n.loc(),
                    format!(
                        "unknown `security_protocol` `{s}`{} (one of {})",
                        did_you_mean(&s, KafkaProtocol::NAMES.iter().copied()),
                        KafkaProtocol::NAMES.join(", ")
                    ),
                );
            }
            p
        }),
    };
    let sasl = obj.value("sasl").map(|n| kafka_sasl(d, n));
    let ssl_ca_location = obj
        .value("ssl_ca_location")
        .and_then(|n| read::string(d, n, "ssl_ca_location"));
    let protocol = protocol?;
    match (&sasl, protocol.is_sasl()) {
        (None, true) => d.error(
            protocol_node.map_or(obj.loc, Node::loc),
            format!(
                "`security_protocol: {}` needs a `sasl` mapping (mechanism, username, password)",
                protocol.as_str()
            ),
        ),
        (Some(_), false) => d.error(
            obj.get("sasl").map_or(obj.loc, Node::loc),
            format!(
                "`sasl` applies only with `security_protocol: SASL_SSL` or `SASL_PLAINTEXT` (found {})",
                protocol.as_str()
            ),
        ),
        _ => {}
    }
    if ssl_ca_location.is_some() && !matches!(protocol, KafkaProtocol::Ssl | KafkaProtocol::SaslSsl)
    {
        d.error(
            obj.get("ssl_ca_location").map_or(obj.loc, Node::loc),
            format!(
                "`ssl_ca_location` applies only with `security_protocol: SSL` or `SASL_SSL` (found {})",
                protocol.as_str()
            ),
        );
    }
    let sasl = match sasl {
        Some(s) => Some(s?),
        None => None,
    };
    Some(KafkaSecurity {
        protocol,
        sasl,
        ssl_ca_location,
    })
}

fn kafka_sasl(d: &mut Diagnostics, node: &Node) -> Option<KafkaSasl> {
    let what = "kafka `sasl`";
    let obj = Obj::new(d, node, what, &["mechanism", "username", "password"])?;
    let mechanism = obj
        .required(d, "mechanism", what)
        .and_then(|n| read::string(d, n, "mechanism").map(|s| (n, s)))
        .and_then(|(n, s)| {
            let upper = s.to_ascii_uppercase();
            if KafkaSasl::MECHANISMS.contains(&upper.as_str()) {
                Some(upper)
            } else {
                d.error(
                    n.loc(),
                    format!(
                        "unknown SASL mechanism `{s}`{} (one of {})",
                        did_you_mean(&s, KafkaSasl::MECHANISMS.iter().copied()),
                        KafkaSasl::MECHANISMS.join(", ")
                    ),
                );
                None
            }
        });
    let non_empty = |d: &mut Diagnostics, key: &str| {
        // Present but null or empty: typically a `${VAR:-}` whose variable is unset.
        let n = match obj.get(key) {
            None => {
                d.error(obj.loc, format!("{what} is missing required key `{key}`"));
                return None;
            }
            Some(n) => n,
        };
        if !n.is_null() {
            let s = read::string(d, n, key)?;
            if !s.is_empty() {
                return Some(s);
            }
        }
        d.error(
            n.loc(),
            format!("SASL `{key}` is empty (for a secret, write `${{VAR}}` and set VAR in the environment)"),
        );
        None
    };
    let username = non_empty(d, "username");
    let password = non_empty(d, "password");
    Some(KafkaSasl {
        mechanism: mechanism?,
        username: username?,
        password: password?,
    })
}

/// Client settings lambda-ctl sets itself: a `properties` entry may not override them.
const KAFKA_MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `brokers`"),
    ("group.id", "use `group`"),
    (
        "enable.auto.commit",
        "offsets are committed once their segment is sealed",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed once their segment is sealed",
    ),
    ("security.protocol", "use `security_protocol`"),
    ("sasl.mechanism", "use `sasl`"),
    ("sasl.mechanisms", "use `sasl`"),
    ("sasl.username", "use `sasl`"),
    ("sasl.password", "use `sasl`"),
    ("ssl.ca.location", "use `ssl_ca_location`"),
];

fn kafka_properties(
    d: &mut Diagnostics,
    node: &Node,
    what: &str,
) -> Option<BTreeMap<String, String>> {
    let Node::Map { entries, .. } = node else {
        d.error(
            node.loc(),
            format!("`{what}` must be a mapping, found {}", node.kind()),
        );
        return None;
    };
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, v) in entries {
        if let Some((_, instead)) = KAFKA_MANAGED.iter().find(|(p, _)| *p == k.name) {
            d.error(
                k.loc,
                format!(
                    "kafka property `{}` is set by lambda-ctl ({instead})",
                    k.name
                ),
            );
            ok = false;
            continue;
        }
        match read::string(d, v, &k.name) {
            Some(s) => {
                out.insert(k.name.clone(), s);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Declared columns and the paths of those not read from the top-level key of their name.
type Mapped = (Vec<(String, ColumnType)>, BTreeMap<String, JsonPath>);

/// `schema:` — each entry `col: TYPE` (the top-level key `col`), or
/// `col: {type: TYPE, path: $.a.b[0]}`, or `col: {type: TYPE, from: meta.KEY}`.
fn schema(
    d: &mut Diagnostics,
    node: &Node,
    source: Option<&Source>,
    format: Option<Format>,
) -> Option<Mapped> {
    let Node::Map { entries, .. } = node else {
        d.error(
            node.loc(),
            format!(
                "`schema` must be a mapping of column: type, found {}",
                node.kind()
            ),
        );
        return None;
    };
    if entries.is_empty() {
        d.error(node.loc(), "`schema` declares no columns");
        return None;
    }
    let mut out = Vec::new();
    let mut paths: BTreeMap<String, (JsonPath, Loc)> = BTreeMap::new();
    // `from: meta.KEY` columns: the type each value arrives as, checked against the column's.
    let mut meta_types: Vec<(String, ColumnType, Loc)> = Vec::new();
    let mut ok = true;
    for (key, value) in entries {
        if !read::is_identifier(&key.name) {
            d.error(
                key.loc,
                format!(
                    "invalid column name `{}`: use letters, digits and `_`",
                    key.name
                ),
            );
            ok = false;
        }
        let (ty_node, path) = match value {
            Node::Map { .. } => {
                let what = format!("column `{}`", key.name);
                let Some(o) = Obj::new(d, value, &what, &["type", "path", "from"]) else {
                    ok = false;
                    continue;
                };
                let Some(t) = o.required(d, "type", &what) else {
                    ok = false;
                    continue;
                };
                let path = match (o.value("path"), o.value("from")) {
                    (Some(_), Some(f)) => {
                        d.error(
                            f.loc(),
                            format!("column `{}` has both `path` and `from`: use one", key.name),
                        );
                        ok = false;
                        None
                    }
                    (Some(p), None) => json_path(d, p),
                    (None, Some(f)) => meta_path(d, f, source).map(|(p, arrives)| {
                        meta_types.push((key.name.clone(), arrives, f.loc()));
                        p
                    }),
                    (None, None) => None,
                };
                if (o.value("path").is_some() || o.value("from").is_some()) && path.is_none() {
                    ok = false;
                }
                if let Some(p) = &path
                    && format == Some(Format::Csv)
                {
                    let n = o.value("path").or(o.value("from")).unwrap_or(value);
                    d.error(
                        n.loc(),
                        format!(
                            "column `{}`: `{}` applies to JSON events only (this pipeline's format is csv)",
                            key.name,
                            if p.meta_key().is_some() { "from" } else { "path" }
                        ),
                    );
                    ok = false;
                }
                (t, path.map(|p| (p, value.loc())))
            }
            _ => (value, None),
        };
        let Some(ty) = read::string(d, ty_node, &key.name) else {
            ok = false;
            continue;
        };
        match ColumnType::ALL.iter().find(|(n, _)| *n == ty) {
            Some((_, t)) => out.push((key.name.clone(), *t)),
            None => {
                let names = ColumnType::ALL.map(|(n, _)| n);
                d.error(
                    ty_node.loc(),
                    format!(
                        "unknown type `{ty}` for column `{}`{} (one of {})",
                        key.name,
                        did_you_mean(&ty, names),
                        names.join(", ")
                    ),
                );
                ok = false;
            }
        }
        if let Some(p) = path {
            paths.insert(key.name.clone(), p);
        }
    }
    for (col, arrives, loc) in &meta_types {
        if let Some((_, t)) = out.iter().find(|(c, _)| c == col)
            && !arrives.fits(*t)
        {
            d.error(
                *loc,
                format!(
                    "column `{col}` is a {}, but this metadata arrives as a {} (declare it `{}`)",
                    t.name(),
                    arrives.name(),
                    arrives.name()
                ),
            );
            ok = false;
        }
    }
    // Every column reads one value: no path may lead into another column's value.
    let all: Vec<(&str, JsonPath, Loc)> = out
        .iter()
        .map(|(c, _)| match paths.get(c) {
            Some((p, loc)) => (c.as_str(), p.clone(), *loc),
            None => (
                c.as_str(),
                JsonPath(vec![PathStep::Key(c.clone())]),
                Loc::default(),
            ),
        })
        .collect();
    for (i, (a, pa, _)) in all.iter().enumerate() {
        for (b, pb, loc) in &all[i + 1..] {
            let (short, long) = if pa.0.len() <= pb.0.len() {
                (pa, pb)
            } else {
                (pb, pa)
            };
            if long.0.starts_with(&short.0) {
                let at = if *loc == Loc::default() {
                    paths.get(*a).map_or(node.loc(), |(_, l)| *l)
                } else {
                    *loc
                };
                d.error(
                    at,
                    if pa == pb {
                        format!("columns `{a}` and `{b}` read the same value `{pa}`")
                    } else {
                        format!(
                            "columns `{a}` (`{pa}`) and `{b}` (`{pb}`): one path leads into the other's value"
                        )
                    },
                );
                ok = false;
            }
        }
    }
    let paths = paths.into_iter().map(|(c, (p, _))| (c, p)).collect();
    ok.then_some((out, paths))
}

/// `path: $.a.b[0]` — checked where it is written (the column of the offending character).
fn json_path(d: &mut Diagnostics, node: &Node) -> Option<JsonPath> {
    let text = read::string(d, node, "path")?;
    match parse_path(&text) {
        Ok(p) => Some(p),
        Err((at, msg)) => {
            let mut loc = node.loc();
            if let Node::Scalar { quoted, .. } = node
                && !text.contains('\n')
            {
                loc.col += at + usize::from(*quoted);
            }
            d.error(loc, format!("invalid path `{text}`: {msg}"));
            None
        }
    }
}

/// A JSONPath of keys and indexes from the event's root: `$.a.b`, `$.a[0]`, `$['a b']`.
/// The error is the byte offset of the problem and what is wrong there.
pub fn parse_path(s: &str) -> Result<JsonPath, (usize, String)> {
    let b = s.as_bytes();
    if b.first() != Some(&b'$') {
        return Err((
            0,
            "a path starts at the event's root `$`, like `$.body.id`".into(),
        ));
    }
    let mut i = 1;
    let mut steps = Vec::new();
    while i < b.len() {
        match b[i] {
            b'.' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && !matches!(b[j], b'.' | b'[') {
                    j += 1;
                }
                let key = &s[start..j];
                if key.is_empty() {
                    return Err((start, "expected a key after `.`".into()));
                }
                if key
                    .chars()
                    .any(|c| c.is_whitespace() || "]'\"*?@()".contains(c))
                {
                    return Err((
                        start,
                        format!(
                            "`{key}` is not a plain key (write `['{key}']` for a key with such characters; wildcards and filters are not supported)"
                        ),
                    ));
                }
                steps.push(PathStep::Key(key.to_string()));
                i = j;
            }
            b'[' => {
                let start = i + 1;
                match b.get(start) {
                    Some(&q @ (b'\'' | b'"')) => {
                        let Some(len) = s[start + 1..].find(q as char) else {
                            return Err((start, "unterminated quoted key".into()));
                        };
                        let key = &s[start + 1..start + 1 + len];
                        let close = start + 1 + len + 1;
                        if b.get(close) != Some(&b']') {
                            return Err((close, "expected `]` after the quoted key".into()));
                        }
                        steps.push(PathStep::Key(key.to_string()));
                        i = close + 1;
                    }
                    _ => {
                        let Some(len) = s[start..].find(']') else {
                            return Err((i, "unterminated `[`".into()));
                        };
                        let idx = &s[start..start + len];
                        match idx.parse::<usize>() {
                            Ok(n) if idx.bytes().all(|c| c.is_ascii_digit()) => {
                                steps.push(PathStep::Index(n))
                            }
                            _ => {
                                return Err((
                                    start,
                                    format!(
                                        "`[{idx}]` is not an array index (write a number like `[0]`, or a quoted key like `['k']`)"
                                    ),
                                ));
                            }
                        }
                        i = start + len + 1;
                    }
                }
            }
            _ => return Err((i, "expected `.key` or `[index]`".into())),
        }
    }
    if steps.is_empty() {
        return Err((1, "the path names no value (write `$.key`)".into()));
    }
    if steps.first() == Some(&PathStep::Key(META_KEY.into())) {
        return Err((
            2,
            format!("`{META_KEY}` is reserved for broker metadata: use `from: meta.KEY`"),
        ));
    }
    Ok(JsonPath(steps))
}

/// `from: meta.KEY` — a key the pipeline's source carries. Returns the path and the type the
/// value arrives as.
fn meta_path(
    d: &mut Diagnostics,
    node: &Node,
    source: Option<&Source>,
) -> Option<(JsonPath, ColumnType)> {
    let text = read::string(d, node, "from")?;
    let Some(key) = text.strip_prefix("meta.") else {
        d.error(
            node.loc(),
            format!("`from: {text}`: write `from: meta.KEY` (broker metadata), or `path:` for a value of the event"),
        );
        return None;
    };
    let source = source?;
    let keys = source.meta_keys();
    if keys.is_empty() {
        d.error(
            node.loc(),
            format!(
                "`from: {text}`: the {} source carries no metadata",
                source.kind()
            ),
        );
        return None;
    }
    let Some((_, t)) = keys.iter().find(|(k, _)| *k == key) else {
        let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        d.error(
            node.loc(),
            format!(
                "unknown metadata key `{key}` of the {} source{} (one of {})",
                source.kind(),
                did_you_mean(key, names.iter().copied()),
                names.join(", ")
            ),
        );
        return None;
    };
    Some((JsonPath::meta(key), *t))
}

fn views(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<Vec<View>> {
    let Node::Seq { items, .. } = node else {
        d.error(
            node.loc(),
            format!("`views` must be a list, found {}", node.kind()),
        );
        return None;
    };
    if items.is_empty() {
        d.error(node.loc(), "`views` is empty: declare at least one view");
        return None;
    }
    let mut out: Vec<View> = Vec::new();
    let mut ok = true;
    for item in items {
        match view(d, item, columns, check_columns) {
            Some(v) if out.iter().any(|o| o.name == v.name) => {
                let loc = item.get("name").map_or(item.loc(), Node::loc);
                d.error(loc, format!("duplicate view name `{}`", v.name));
                ok = false;
            }
            Some(v) => out.push(v),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn view(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<View> {
    let obj = Obj::new(
        d,
        node,
        "view",
        &["name", "description", "group_by", "window", "metrics"],
    )?;
    let name = obj
        .required(d, "name", "view")
        .and_then(|n| read::name(d, n, "view name"));
    let group_by = match obj.value("group_by") {
        None => Some(Vec::new()),
        Some(n) => read::string_list(d, n, "group_by").and_then(|cols| {
            let mut ok = true;
            for (c, loc) in &cols {
                if check_columns && !columns.iter().any(|(n, _)| n == c) {
                    d.error(*loc, unknown_column("group_by", c, columns));
                    ok = false;
                }
            }
            ok.then(|| cols.into_iter().map(|(c, _)| c).collect())
        }),
    };
    let window = obj.required(d, "window", "view").and_then(|n| window(d, n));
    let metrics = obj
        .required(d, "metrics", "view")
        .and_then(|n| metrics(d, n, columns, check_columns));
    if let (Some(g), Some(m)) = (&group_by, &metrics) {
        for metric in m {
            if g.contains(&metric.name)
                || ["window_start", "window_end"].contains(&metric.name.as_str())
            {
                let loc = node
                    .get("metrics")
                    .and_then(|ms| ms.get(&metric.name))
                    .map_or(obj.loc, Node::loc);
                d.error(
                    loc,
                    format!(
                        "metric name `{}` clashes with an output column",
                        metric.name
                    ),
                );
            }
        }
    }
    Some(View {
        name: name?,
        group_by: group_by?,
        window: window?,
        metrics: metrics?,
    })
}

fn window(d: &mut Diagnostics, node: &Node) -> Option<Window> {
    const HINT: &str = "write `1m`, `all`, {tumbling: 5m}, {hopping: {size: 10m, every: 1m}} or {session: {gap: 30m}}";
    match node {
        Node::Scalar { value, .. } if value == "all" => Some(Window::All),
        Node::Scalar { value, .. } => match super::duration::parse(value) {
            Ok(size) if !size.is_zero() => Some(Window::Tumbling { size }),
            _ => {
                d.error(node.loc(), format!("invalid window `{value}`: {HINT}"));
                None
            }
        },
        Node::Map { entries, .. } if entries.len() == 1 => {
            let (key, value) = &entries[0];
            match key.name.as_str() {
                "tumbling" => {
                    read::duration(d, value, "tumbling").map(|size| Window::Tumbling { size })
                }
                "hopping" => {
                    let o = Obj::new(d, value, "hopping window", &["size", "every"])?;
                    let size = o
                        .required(d, "size", "hopping window")
                        .and_then(|n| read::duration(d, n, "size"));
                    let every = o
                        .required(d, "every", "hopping window")
                        .and_then(|n| read::duration(d, n, "every"));
                    let (size, every) = (size?, every?);
                    if size < every || !size.as_millis().is_multiple_of(every.as_millis()) {
                        d.error(
                            value.loc(),
                            format!(
                                "hopping window size {} must be a whole multiple of every {}",
                                super::duration::format(size),
                                super::duration::format(every)
                            ),
                        );
                        return None;
                    }
                    Some(Window::Hopping { size, every })
                }
                "session" => {
                    let o = Obj::new(d, value, "session window", &["gap"])?;
                    let gap = o
                        .required(d, "gap", "session window")
                        .and_then(|n| read::duration(d, n, "gap"));
                    Some(Window::Session { gap: gap? })
                }
                other => {
                    d.error(
                        key.loc,
                        format!(
                            "unknown window kind `{other}`{}: {HINT}",
                            did_you_mean(other, ["tumbling", "hopping", "session"])
                        ),
                    );
                    None
                }
            }
        }
        _ => {
            d.error(node.loc(), format!("invalid window: {HINT}"));
            None
        }
    }
}

fn metrics(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<Vec<Metric>> {
    let Node::Map { entries, .. } = node else {
        d.error(
            node.loc(),
            format!(
                "`metrics` must be a mapping of name: aggregate, found {}",
                node.kind()
            ),
        );
        return None;
    };
    if entries.is_empty() {
        d.error(
            node.loc(),
            "`metrics` is empty: declare at least one, e.g. `events: count()`",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (key, value) in entries {
        if !read::is_identifier(&key.name) {
            d.error(
                key.loc,
                format!(
                    "invalid metric name `{}`: use letters, digits and `_`",
                    key.name
                ),
            );
            ok = false;
        }
        let Some(text) = read::string(d, value, &key.name) else {
            ok = false;
            continue;
        };
        match aggregate(&text, columns, check_columns) {
            Ok(aggregate) => out.push(Metric {
                name: key.name.clone(),
                aggregate,
            }),
            Err(e) => {
                d.error(value.loc(), format!("metric `{}`: {e}", key.name));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// Parses `name(args)` and checks the argument's column and type.
pub fn aggregate(
    text: &str,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Result<Aggregate, String> {
    let t = text.trim();
    let (func, args) = match t.split_once('(') {
        Some((f, rest)) if rest.ends_with(')') => {
            (f.trim().to_ascii_lowercase(), &rest[..rest.len() - 1])
        }
        _ => {
            return Err(format!(
                "`{t}` is not an aggregate call; write e.g. `count()`, `sum(amount)`, `approx_quantile(latency_ms, 0.95)`"
            ));
        }
    };
    let args: Vec<&str> = args
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if !AGGREGATES.contains(&func.as_str()) {
        return Err(format!(
            "unknown aggregate `{func}`{}",
            did_you_mean(&func, AGGREGATES.iter().copied())
        ));
    }
    let arity = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "`{func}` takes {n} argument{}, found {}",
                if n == 1 { "" } else { "s" },
                args.len()
            ))
        }
    };
    let column = |i: usize, need: &[ColumnType], kind: &str| -> Result<String, String> {
        let c = args[i].to_string();
        if !check_columns {
            return Ok(c);
        }
        let Some((_, ty)) = columns.iter().find(|(n, _)| *n == c) else {
            return Err(format!(
                "unknown column `{c}`{}",
                did_you_mean(&c, columns.iter().map(|(n, _)| n.as_str()))
            ));
        };
        if !need.is_empty() && !need.contains(ty) {
            return Err(format!(
                "`{func}` needs a {kind} column, but `{c}` is a {}",
                ty.name()
            ));
        }
        Ok(c)
    };
    const NUMERIC: &[ColumnType] = &[ColumnType::Int, ColumnType::Float];
    const ORDERED: &[ColumnType] = &[
        ColumnType::Int,
        ColumnType::Float,
        ColumnType::Timestamp,
        ColumnType::String,
    ];
    Ok(match func.as_str() {
        "count" if args.is_empty() || args == ["*"] => Aggregate::Count,
        "count" => {
            arity(1)?;
            Aggregate::CountCol(column(0, &[], "")?)
        }
        "sum" => {
            arity(1)?;
            Aggregate::Sum(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "avg" => {
            arity(1)?;
            Aggregate::Avg(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "stddev" => {
            arity(1)?;
            Aggregate::Stddev(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "variance" => {
            arity(1)?;
            Aggregate::Variance(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "min" => {
            arity(1)?;
            Aggregate::Min(column(0, ORDERED, "int, float, timestamp or string")?)
        }
        "max" => {
            arity(1)?;
            Aggregate::Max(column(0, ORDERED, "int, float, timestamp or string")?)
        }
        "first" => {
            arity(1)?;
            Aggregate::First(column(0, &[], "")?)
        }
        "last" => {
            arity(1)?;
            Aggregate::Last(column(0, &[], "")?)
        }
        "approx_count_distinct" => {
            arity(1)?;
            Aggregate::ApproxCountDistinct(column(0, &[], "")?)
        }
        "approx_quantile" => {
            arity(2)?;
            let c = column(0, NUMERIC, "numeric (int or float)")?;
            let q: f64 = args[1]
                .parse()
                .ok()
                .filter(|q: &f64| (0.0..=1.0).contains(q))
                .ok_or_else(|| {
                    format!("quantile `{}` must be a number between 0 and 1", args[1])
                })?;
            Aggregate::ApproxQuantile(c, q)
        }
        _ => unreachable!("checked against AGGREGATES"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_print_back() {
        for (text, shown) in [
            ("$.body.device.id", "$.body.device.id"),
            ("$.readings[0].value", "$.readings[0].value"),
            ("$['a key'][2]", "$[\"a key\"][2]"),
            ("$[\"x\"]", "$.x"),
        ] {
            assert_eq!(parse_path(text).unwrap().to_string(), shown, "{text}");
        }
        assert_eq!(JsonPath::meta("message_id").to_string(), "meta.message_id");
    }

    #[test]
    fn bad_paths_say_where() {
        for (text, at) in [
            ("body.id", 0),
            ("$", 1),
            ("$.", 2),
            ("$.a..b", 4),
            ("$.a[x]", 4),
            ("$.a[0", 3),
            ("$['a]", 2),
            ("$.a[*]", 4),
            ("$.a b", 2),
            ("$.$meta.message_id", 2),
        ] {
            let (got, msg) = parse_path(text).expect_err(text);
            assert_eq!(got, at, "{text}: {msg}");
        }
    }
}
