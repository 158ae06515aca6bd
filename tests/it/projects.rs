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
    assert_eq!(nightly.tasks.len(), 3);
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
