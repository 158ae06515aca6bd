//! A pipeline's `source:`: its type and the keys of that type.

use std::collections::BTreeMap;

use super::kafka::{kafka_properties, kafka_security};
use super::optional;
use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::{Loc, Node};

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

pub(super) fn source(d: &mut Diagnostics, node: &Node, pipeline: &str) -> Option<Source> {
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
        "kafka" => KAFKA_SOURCE_KEYS,
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
        "nats" => nats(d, &obj, &what, pipeline, None)?,
        "kafka" => kafka(d, &obj, &what, pipeline)?,
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
            let prefetch: Option<u16> =
                read::integer_in(d, &obj, "prefetch", 1000, 1..=65_535, "between 1 and 65535");
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
/// The column holding a record's `meta.position` when a JSON `file` pipeline names no
/// `event_id`: a record read again after a crash is dropped at the door.
pub const DEFAULT_FILE_POSITION: &str = "_file_position";

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
    let prefetch: Option<u32> = read::integer_in(
        d,
        obj,
        "prefetch",
        1000,
        1..=100_000,
        "between 1 and 100000",
    );
    Some(Source::ServiceBus {
        url: url?,
        address: address?,
        sas,
        prefetch: prefetch?,
    })
}

/// Where a secret of a pipeline file is written as a literal rather than `${VAR}`: checked on
/// the file as written, before interpolation. Such secrets are `source.sas_key` and the
/// password in a sink's `url`.
pub fn literal_secrets(root: &Node) -> Vec<(Loc, String)> {
    let mut out = super::sinks::literal_sink_secrets(root);
    out.extend(super::lookups::literal_lookup_secrets(root));
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

/// The keys of a kafka source.
const KAFKA_SOURCE_KEYS: &[&str] = &[
    "type",
    "brokers",
    "topic",
    "group",
    "security_protocol",
    "sasl",
    "ssl_ca_location",
    "properties",
];

/// The keys of a `buffer`'s `kafka` mapping: a kafka source's, without `type`.
const KAFKA_KEYS: &[&str] = KAFKA_SOURCE_KEYS.split_at(1).1;

/// A kafka source's settings from `obj` (`what` names it in messages).
fn kafka(d: &mut Diagnostics, obj: &Obj, what: &str, pipeline: &str) -> Option<Source> {
    let req = |d: &mut Diagnostics, key: &str| {
        obj.required(d, key, what)
            .and_then(|n| read::string(d, n, key))
    };
    let (brokers, topic) = (req(d, "brokers"), req(d, "topic"));
    let group = optional(d, obj, "group", format!("lambda-{pipeline}"), read::string);
    let security = kafka_security(d, obj);
    let properties = optional(d, obj, "properties", BTreeMap::new(), kafka_properties);
    Some(Source::Kafka {
        brokers: brokers?,
        topic: topic?,
        group: group?,
        security: security?,
        properties: properties?,
    })
}

/// A nats source's settings from `obj` (`what` names it in messages). `subject` may hold the
/// partition token once, as a whole token; `default_subject` (a buffer's) makes it optional.
fn nats(
    d: &mut Diagnostics,
    obj: &Obj,
    what: &str,
    pipeline: &str,
    default_subject: Option<String>,
) -> Option<Source> {
    let req = |d: &mut Diagnostics, key: &str| {
        obj.required(d, key, what)
            .and_then(|n| read::string(d, n, key))
    };
    let (url, stream) = (req(d, "url"), req(d, "stream"));
    let subject = match (obj.value("subject"), default_subject) {
        (Some(n), must) => read::string(d, n, "subject").and_then(|s| {
            let tokens = s.split('.').filter(|t| *t == NATS_PARTITION).count();
            if s.matches(NATS_PARTITION).count() != tokens || tokens > 1 {
                d.error(
                    n.loc(),
                    format!("`subject: {s}`: `{NATS_PARTITION}` must be one whole token of the subject, as in `clicks.{NATS_PARTITION}`"),
                );
                return None;
            }
            if must.is_some() && tokens == 0 {
                d.error(
                    n.loc(),
                    format!("`subject: {s}`: a buffer's subject needs the token `{NATS_PARTITION}` (each partition its own subject)"),
                );
                return None;
            }
            Some(s)
        }),
        (None, Some(default)) => Some(default),
        (None, None) => req(d, "subject"),
    };
    let consumer = optional(
        d,
        obj,
        "consumer",
        format!("lambda-{pipeline}"),
        read::string,
    );
    Some(Source::Nats {
        url: url?,
        stream: stream?,
        subject: subject?,
        consumer: consumer?,
    })
}

/// An `http` pipeline's `buffer:` — `{kafka: {brokers, topic, …}}` (the keys of a kafka
/// source) or `{nats: {url, stream, subject, consumer}}` (`subject` by default
/// `STREAM.{partition}`) — as the [`Source`] it is consumed as.
pub(super) fn buffer(d: &mut Diagnostics, node: &Node, pipeline: &str) -> Option<Source> {
    let obj = Obj::new(
        d,
        node,
        "buffer (a `kafka` or `nats` mapping)",
        &["kafka", "nats"],
    )?;
    match (obj.value("kafka"), obj.value("nats")) {
        (Some(kafka_node), None) => {
            let what = "buffer `kafka`";
            let inner = Obj::new(d, kafka_node, what, KAFKA_KEYS)?;
            kafka(d, &inner, what, pipeline)
        }
        (None, Some(nats_node)) => {
            let what = "buffer `nats`";
            let inner = Obj::new(
                d,
                nats_node,
                what,
                &["url", "stream", "subject", "consumer"],
            )?;
            let stream = nats_node.get("stream").and_then(|n| match n {
                Node::Scalar { value, .. } => Some(value.clone()),
                _ => None,
            });
            let default = format!("{}.{NATS_PARTITION}", stream.as_deref().unwrap_or("lambda"));
            nats(d, &inner, what, pipeline, Some(default))
        }
        (Some(_), Some(_)) => {
            d.error(
                node.loc(),
                "`buffer` is one broker: a `kafka` or a `nats` mapping, not both",
            );
            None
        }
        (None, None) => {
            d.error(
                node.loc(),
                "`buffer` needs a `kafka` mapping (brokers, topic) or a `nats` mapping (url, stream)",
            );
            None
        }
    }
}
