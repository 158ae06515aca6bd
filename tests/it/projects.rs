//! Every YAML in the repository is a project the suite validates: the root example,
//! `lambda-ctl init`'s scaffold and each project under examples/.

use std::path::Path;

use lambda_ctl::spec::{self, Aggregate, Source, Window};

use crate::support::repo;

fn load(root: &Path) -> spec::Project {
    spec::load(root).unwrap_or_else(|e| panic!("{} does not validate:\n{e}", root.display()))
}

#[test]
fn repository_example_validates() {
    let p = load(repo());
    let clicks = p.pipeline("clicks").expect("clicks pipeline");
    assert!(matches!(clicks.source, Source::Generator { .. }));
    let kinds: Vec<Window> = clicks.views.iter().map(|v| v.window).collect();
    assert!(kinds.iter().any(|w| matches!(w, Window::Tumbling { .. })));
    assert!(kinds.iter().any(|w| matches!(w, Window::Hopping { .. })));
    assert!(kinds.iter().any(|w| matches!(w, Window::Session { .. })));
    assert!(kinds.contains(&Window::All));
    let pv = clicks.view("page_views").unwrap();
    assert!(
        pv.metrics
            .iter()
            .any(|m| matches!(m.aggregate, Aggregate::ApproxQuantile(_, q) if q == 0.95))
    );
    let nightly = p.workflow("nightly").expect("nightly workflow");
    assert_eq!(nightly.tasks.len(), 4);
    assert_eq!(
        nightly.task("verify").map(|t| &t.kind),
        Some(&lambda_ctl::spec::TaskKind::Verify {
            pipeline: "clicks".into(),
            sample: lambda_ctl::spec::Sample::Percent(10.0),
        })
    );
    assert_eq!(nightly.schedule.as_ref().unwrap().expr, "0 2 * * *");
}

#[test]
fn every_example_project_validates() {
    let dir = repo().join("examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.join("pipelines").is_dir() {
            load(&path);
            n += 1;
        }
    }
    assert!(n > 0, "examples/ holds no project");
}

#[test]
fn interpolation_fills_settings_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("lambda.yaml"),
        "state: ${STATE_URL:-sqlite://s.db}\nlake: ${LAKE_URL}\nserve:\n  token: ${TOKEN:-}\n",
    )
    .unwrap();
    let env = |n: &str| match n {
        "LAKE_URL" => Some("memory://".to_string()),
        _ => None,
    };
    let p = spec::load_with_env(dir.path(), &env).unwrap();
    assert_eq!(p.settings.lake, "memory://");
    assert!(
        p.settings.state.starts_with("sqlite:///") && p.settings.state.ends_with("/s.db"),
        "{}",
        p.settings.state
    );
    assert_eq!(p.settings.serve.token, None);
}

/// The Event Hubs source block of examples/clickstream-kafka/README.md: SASL_SSL + PLAIN, the
/// literal `$ConnectionString` user, the password from the environment.
#[test]
fn kafka_event_hubs_source_validates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/clicks.yaml"),
        "name: clicks\nsource:\n  type: kafka\n  brokers: ${EVENTHUBS_NAMESPACE}.servicebus.windows.net:9093\n  topic: clicks\n  group: lambda-clickstream\n  security_protocol: SASL_SSL\n  sasl:\n    mechanism: PLAIN\n    username: $ConnectionString\n    password: ${EVENTHUBS_CONNECTION_STRING}\n  properties:\n    session.timeout.ms: \"30000\"\nschema:\n  id: string\n  ts: timestamp\nevent_time: ts\nviews:\n  - name: n\n    window: all\n    metrics:\n      n: count()\n",
    )
    .unwrap();
    let secret =
        "Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=k;SharedAccessKey=s=";
    let env = |n: &str| match n {
        "EVENTHUBS_NAMESPACE" => Some("ns".to_string()),
        "EVENTHUBS_CONNECTION_STRING" => Some(secret.to_string()),
        _ => None,
    };
    let p = spec::load_with_env(dir.path(), &env).unwrap_or_else(|e| panic!("{e}"));
    let Source::Kafka {
        brokers,
        security,
        properties,
        ..
    } = &p.pipeline("clicks").unwrap().source
    else {
        panic!("a kafka source");
    };
    assert_eq!(brokers, "ns.servicebus.windows.net:9093");
    assert_eq!(security.protocol, spec::KafkaProtocol::SaslSsl);
    let sasl = security.sasl.as_ref().unwrap();
    assert_eq!(
        (
            sasl.mechanism.as_str(),
            sasl.username.as_str(),
            sasl.password.as_str()
        ),
        ("PLAIN", "$ConnectionString", secret)
    );
    assert!(
        !format!("{security:?}").contains("SharedAccessKey"),
        "the password is redacted"
    );
    assert_eq!(properties["session.timeout.ms"], "30000");
}

fn servicebus_project(source: &str, schema_extra: &str, env: &[(&str, &str)]) -> spec::Project {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/orders.yaml"),
        format!("name: orders\nsource:\n{source}schema:\n  ts: timestamp\n{schema_extra}event_time: ts\nviews:\n  - name: n\n    window: all\n    metrics:\n      n: count()\n"),
    )
    .unwrap();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    spec::load_with_env(dir.path(), &lookup).unwrap_or_else(|e| panic!("{e}"))
}

/// The Service Bus source as SPEC.md writes it: topic + subscription, SAS from the
/// environment (redacted in Debug), and without `event_id` the message-id is the one.
#[test]
fn servicebus_source_defaults_its_event_id_to_the_message_id() {
    let p = servicebus_project(
        "  type: servicebus\n  url: amqps://shop.servicebus.windows.net\n  topic: orders\n  subscription: analytics\n  sas_key_name: ${SB_KEY_NAME}\n  sas_key: ${SB_KEY}\n",
        "  amount: {type: float, path: \"$.order.lines[0].amount\"}\n",
        &[("SB_KEY_NAME", "listen"), ("SB_KEY", "c2VjcmV0")],
    );
    let orders = p.pipeline("orders").unwrap();
    let Source::ServiceBus {
        address,
        sas,
        prefetch,
        ..
    } = &orders.source
    else {
        panic!("a servicebus source");
    };
    assert_eq!(address, "orders/Subscriptions/analytics");
    assert_eq!(*prefetch, 1000);
    let sas = sas.as_ref().unwrap();
    assert_eq!(
        (sas.name.as_str(), sas.key.as_str()),
        ("listen", "c2VjcmV0")
    );
    assert!(!format!("{:?}", orders.source).contains("c2VjcmV0"));
    assert_eq!(orders.event_id.as_deref(), Some("_message_id"));
    assert!(
        orders
            .schema
            .contains(&("_message_id".to_string(), spec::ColumnType::String))
    );
    assert_eq!(
        orders.paths["_message_id"],
        spec::JsonPath::meta("message_id")
    );
    assert_eq!(
        orders.paths["amount"].to_string(),
        "$.order.lines[0].amount"
    );

    // A column already reading the message-id is the event id; an explicit one wins.
    let p = servicebus_project(
        "  type: servicebus\n  url: amqp://guest:guest@127.0.0.1:5672\n  queue: /amq/queue/orders\n",
        "  mid: {type: string, from: meta.message_id}\n",
        &[],
    );
    let orders = p.pipeline("orders").unwrap();
    assert_eq!(orders.event_id.as_deref(), Some("mid"));
    assert_eq!(orders.schema.len(), 2);
}

/// examples/orders-servicebus reads nested orders and the message-id from the broker.
#[test]
fn servicebus_example_reads_nested_orders() {
    let p = load(&repo().join("examples/orders-servicebus"));
    let orders = p.pipeline("orders").unwrap();
    assert!(matches!(orders.source, Source::ServiceBus { .. }));
    assert_eq!(orders.event_id.as_deref(), Some("message_id"));
    assert_eq!(orders.paths["amount"].to_string(), "$.order.payment.amount");
    assert_eq!(orders.paths["customer"].to_string(), "$.order.customer.id");
}

/// The commented postgres sinks of the examples validate as written once uncommented: a copy
/// of each example with its `# sinks:` block uncommented loads, with the URL (and its
/// password) from the environment and redacted in Debug.
#[test]
fn the_examples_commented_postgres_sinks_validate_when_uncommented() {
    for (example, var, view, table) in [
        (
            "clickstream-kafka",
            "CLICKS_PG_URL",
            "page_views",
            "page_views",
        ),
        (
            "orders-servicebus",
            "ORDERS_PG_URL",
            "revenue_per_minute",
            "revenue_per_store",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        let src = repo().join("examples").join(example).join("pipelines");
        let mut uncommented = 0;
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let mut in_block = false;
            let lines: Vec<String> = text
                .lines()
                .map(|l| {
                    if l.trim_start() == "# sinks:" {
                        in_block = true;
                    } else if !l.trim_start().starts_with("#   ") {
                        in_block = false;
                    }
                    if in_block {
                        uncommented += 1;
                        l.replacen("# ", "", 1)
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            std::fs::write(
                dir.path().join("pipelines").join(path.file_name().unwrap()),
                lines.join("\n") + "\n",
            )
            .unwrap();
        }
        assert_eq!(uncommented, 4, "{example}: the sink block is 4 lines");
        let url = "postgres://lambda:s3cret@127.0.0.1:5432/analytics";
        let env = |n: &str| (n == var).then(|| url.to_string());
        let p = spec::load_with_env(dir.path(), &env).unwrap_or_else(|e| panic!("{example}: {e}"));
        let sinks = &p.pipelines[0].view(view).unwrap().sinks;
        assert_eq!(sinks.len(), 1, "{example}");
        assert_eq!(sinks[0].target.name(), format!("postgres:{table}"));
        assert!(matches!(&sinks[0].target, spec::SinkTarget::Postgres { url: u, .. } if u == url));
        assert!(!format!("{:?}", sinks[0]).contains("s3cret"), "redacted");
    }
}
