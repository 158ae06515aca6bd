//! Sources: where events come from, one file per kind. Every source feeds the pipeline's door,
//! which logs every event durably before acknowledging it; HTTP is served by
//! `serving::http`, the others run as tasks started here. Broker sources (`mqtt`, `amqp`,
//! `redis`, `nats`) acknowledge upstream only after the door returned (see `broker`).

pub mod amqp;
pub mod broker;
pub mod file;
pub mod generator;
pub mod mqtt;
pub mod nats;
pub mod redis;

use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::spec::Source;
use crate::speed::runtime::PipelineRuntime;

/// Starts the task feeding `rt` from its source, if the source is one that runs in-process.
pub fn spawn(
    rt: Arc<PipelineRuntime>,
    project_root: &Path,
    state_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    Ok(match rt.pipeline.source.clone() {
        Source::Http => None,
        Source::Generator { rate } => Some(tokio::spawn(generator::run(rt, rate, shutdown))),
        Source::File { path, follow } => {
            let reader = file::FileSource::new(rt, project_root, &path, follow, state_dir)?;
            Some(tokio::spawn(reader.run(shutdown)))
        }
        Source::Mqtt {
            url,
            topic,
            qos,
            client_id,
        } => {
            let source = mqtt::MqttSource::new(rt, &url, &topic, qos, client_id.as_deref())?;
            Some(tokio::spawn(source.run(shutdown)))
        }
        Source::Amqp {
            url,
            queue,
            prefetch,
        } => {
            let source = amqp::AmqpSource::new(rt, &url, &queue, prefetch);
            Some(tokio::spawn(source.run(shutdown)))
        }
        Source::Redis {
            url,
            stream,
            group,
            consumer,
        } => {
            let source = redis::RedisSource::new(rt, &url, &stream, &group, consumer.as_deref())?;
            Some(tokio::spawn(source.run(shutdown)))
        }
        Source::Nats {
            url,
            stream,
            subject,
            consumer,
        } => {
            let source = nats::NatsSource::new(rt, &url, &stream, &subject, &consumer);
            Some(tokio::spawn(source.run(shutdown)))
        }
        other => anyhow::bail!(
            "pipeline `{}`: the `{}` source is not available in this build of lambda-ctl (available: http, generator, file, mqtt, amqp, redis, nats)",
            rt.pipeline.name,
            other.kind()
        ),
    })
}
