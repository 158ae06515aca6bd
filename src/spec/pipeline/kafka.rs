//! A kafka source's or sink's security (`security_protocol`, `sasl`, `ssl_ca_location`) and
//! its client `properties`.

use std::collections::BTreeMap;

use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::Node;

/// `security_protocol`, `sasl` and `ssl_ca_location` of a kafka source: SASL credentials are
/// required with (and only with) a SASL protocol, so a half-configured Event Hubs source is
/// reported at validation rather than as an authentication failure at run time.
pub(super) fn kafka_security(d: &mut Diagnostics, obj: &Obj) -> Option<KafkaSecurity> {
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

/// Client settings a kafka sink sets itself (its producer, and the consumer that reads the
/// topic back).
const KAFKA_SINK_MANAGED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `brokers`"),
    (
        "group.id",
        "the sink reads its topic back without committing",
    ),
    (
        "enable.auto.commit",
        "the sink reads its topic back without committing",
    ),
    (
        "enable.idempotence",
        "the sink's producer is always idempotent",
    ),
    (
        "acks",
        "the sink's records are acknowledged by all in-sync replicas",
    ),
    ("security.protocol", "use `security_protocol`"),
    ("sasl.mechanism", "use `sasl`"),
    ("sasl.mechanisms", "use `sasl`"),
    ("sasl.username", "use `sasl`"),
    ("sasl.password", "use `sasl`"),
    ("ssl.ca.location", "use `ssl_ca_location`"),
];

/// The `properties` of a kafka source.
pub(super) fn kafka_properties(
    d: &mut Diagnostics,
    node: &Node,
    what: &str,
) -> Option<BTreeMap<String, String>> {
    properties(d, node, what, KAFKA_MANAGED)
}

/// The `properties` of a kafka sink.
pub(super) fn kafka_sink_properties(
    d: &mut Diagnostics,
    node: &Node,
    what: &str,
) -> Option<BTreeMap<String, String>> {
    properties(d, node, what, KAFKA_SINK_MANAGED)
}

fn properties(
    d: &mut Diagnostics,
    node: &Node,
    what: &str,
    managed: &[(&str, &str)],
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
        if let Some((_, instead)) = managed.iter().find(|(p, _)| *p == k.name) {
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
