//! Sources: where events come from, one file per kind. Every source feeds the pipeline's door,
//! which logs every event durably before acknowledging it; HTTP is served by
//! `serving::http`, the others run as tasks started here. Broker sources (`mqtt`, `amqp`,
//! `redis`, `nats`, `kafka`, `servicebus`) acknowledge upstream only after the door returned (see `broker`;
//! kafka only after the segment is sealed). Each reports its lag into the runtime's
//! [`SourceStatus`](crate::speed::status::SourceStatus).

pub mod amqp;
pub mod broker;
pub mod file;
pub mod generator;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod mqtt;
pub mod nats;
pub mod redis;
#[cfg(feature = "servicebus")]
pub mod servicebus;

use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::spec::Source;
use crate::speed::runtime::PipelineRuntime;

/// Makes `rt`'s door publish what it accepts to `buffer` (a kafka or nats source's settings).
fn start_buffer(rt: &Arc<PipelineRuntime>, buffer: &Source) -> anyhow::Result<()> {
    let forward: Arc<dyn crate::speed::door::Forward> = match buffer {
        Source::Nats {
            url,
            stream,
            subject,
            ..
        } => Arc::new(nats::NatsBuffer::new(url, stream, subject)),
        #[cfg(feature = "kafka")]
        Source::Kafka {
            brokers,
            topic,
            security,
            properties,
            ..
        } => Arc::new(kafka::KafkaBuffer::new(
            rt, brokers, topic, security, properties,
        )?),
        #[cfg(not(feature = "kafka"))]
        Source::Kafka { .. } => anyhow::bail!(
            "pipeline `{}`: `buffer: {{kafka: …}}` is not available in this build of lambda-ctl (built without the `kafka` cargo feature)",
            rt.pipeline.name
        ),
        other => anyhow::bail!(
            "pipeline `{}`: a buffer is a kafka topic or a nats stream, not a `{}` source",
            rt.pipeline.name,
            other.kind()
        ),
    };
    rt.forward_to(forward);
    Ok(())
}

/// Starts the task feeding `rt` from its source, if the source is one that runs in-process.
pub fn spawn(
    rt: Arc<PipelineRuntime>,
    project_root: &Path,
    state_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    // An http pipeline with a `buffer`: the door publishes to it, the speed layer consumes it.
    let mut source = rt.pipeline.source.clone();
    if let (Source::Http, Some(buffer)) = (&source, &rt.pipeline.buffer) {
        start_buffer(&rt, buffer)?;
        source = buffer.clone();
    }
    let on_nodes = match &source {
        Source::Kafka { .. } => true,
        Source::Nats { subject, .. } => subject.contains(crate::spec::NATS_PARTITION),
        _ => false,
    };
    if let Some(node) = rt.node()
        && !on_nodes
    {
        anyhow::bail!(
            "pipeline `{}`: its `{}` source cannot run on nodes (`serve --node {node}`){}: it acknowledges events once this machine's write-ahead log has them, so losing the machine would lose them; use a `kafka` source, a `nats` source with `{}` in its subject, or a `buffer` on an http pipeline (the broker keeps the events until they are archived), or serve without --node",
            rt.pipeline.name,
            source.kind(),
            if matches!(source, Source::Nats { .. }) {
                " without a partitioned subject"
            } else {
                ""
            },
            crate::spec::NATS_PARTITION,
        );
    }
    Ok(match source {
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
            let source = amqp::AmqpSource::new(rt.clone(), &url, &queue, prefetch);
            Some(tokio::spawn(broker::run(rt, source, shutdown)))
        }
        #[cfg(feature = "servicebus")]
        Source::ServiceBus { .. } => {
            let source = servicebus::ServiceBusSource::new(rt.clone())?;
            Some(tokio::spawn(broker::run(rt, source, shutdown)))
        }
        #[cfg(not(feature = "servicebus"))]
        Source::ServiceBus { .. } => anyhow::bail!(
            "pipeline `{}`: the `servicebus` source is not available in this build of lambda-ctl (built without the `servicebus` cargo feature)",
            rt.pipeline.name
        ),
        Source::Redis {
            url,
            stream,
            group,
            consumer,
        } => {
            let source =
                redis::RedisSource::new(rt.clone(), &url, &stream, &group, consumer.as_deref())?;
            Some(tokio::spawn(broker::run(rt, source, shutdown)))
        }
        Source::Nats {
            url,
            stream,
            subject,
            consumer,
        } => {
            let source = nats::NatsSource::new(rt.clone(), &url, &stream, &subject, &consumer);
            Some(tokio::spawn(broker::run(rt, source, shutdown)))
        }
        #[cfg(feature = "kafka")]
        Source::Kafka {
            brokers,
            topic,
            group,
            security,
            properties,
        } => {
            let source = kafka::KafkaSource::new(
                rt.clone(),
                &brokers,
                &topic,
                &group,
                &security,
                &properties,
            );
            Some(tokio::spawn(broker::run(rt, source, shutdown)))
        }
        #[cfg(not(feature = "kafka"))]
        Source::Kafka { .. } => anyhow::bail!(
            "pipeline `{}`: the `kafka` source is not available in this build of lambda-ctl (built without the `kafka` cargo feature)",
            rt.pipeline.name
        ),
    })
}
