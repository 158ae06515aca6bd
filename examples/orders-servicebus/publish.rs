//! The shop side of examples/orders-servicebus: sends orders (nested customer, payment and
//! lines) and late corrections over AMQP 1.0, each with its message-id, into a RabbitMQ queue
//! it declares over AMQP 0-9-1 (the AMQP 1.0 plugin of RabbitMQ 3.x addresses an existing
//! queue as `/amq/queue/NAME`).
//!
//! `cargo run --example orders-servicebus-publish -- [AMQP_URL] [QUEUE] [ORDERS]`
//! (defaults: amqp://guest:guest@127.0.0.1:5672, orders, 200). One order in ten gets a
//! correction sent after all orders (a refund of part of its amount, with the order's own
//! time); one message is sent twice, as a broker would redeliver it.

use fe2o3_amqp::types::messaging::{Data, Message, Properties};
use fe2o3_amqp::types::primitives::Binary;
use fe2o3_amqp::{Connection, Sender, Session};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672".into());
    let queue = args.next().unwrap_or_else(|| "orders".into());
    let n: usize = args.next().map_or(Ok(200), |s| s.parse())?;

    // Declare the queue (durable) with the classic protocol on the same broker.
    let classic = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
    let channel = classic.create_channel().await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    classic.close(200, "declared".into()).await?;

    let mut conn = Connection::open("orders-shop", url.as_str()).await?;
    let mut session = Session::begin(&mut conn).await?;
    let mut sender =
        Sender::attach(&mut session, "orders-shop", format!("/amq/queue/{queue}")).await?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let start = now_ms - now_ms % 60_000 - 5 * 60_000;
    let stores = ["berlin", "paris", "madrid"];
    let methods = ["card", "paypal", "invoice"];
    let mut messages = Vec::new();
    for i in 0..n {
        let placed = start + (i as i64 * 300_000 / n.max(1) as i64);
        let amount = 10.0 + (i % 17) as f64 * 2.5;
        let order = serde_json::json!({
            "kind": "order",
            "order": {
                "id": format!("o-{i}"),
                "placed_at": placed,
                "store": {"id": stores[i % stores.len()], "country": "EU"},
                "customer": {"id": format!("c{}", i % 37), "segment": if i % 4 == 0 { "business" } else { "consumer" }},
                "payment": {"method": methods[i % methods.len()], "amount": amount, "currency": "EUR"},
                "lines": [{"sku": format!("sku-{}", i % 11), "qty": 1 + i % 3}],
            }
        });
        messages.push((format!("o-{i}"), order));
    }
    for i in (0..n).step_by(10) {
        let placed = start + (i as i64 * 300_000 / n.max(1) as i64);
        let correction = serde_json::json!({
            "kind": "correction",
            "order": {
                "id": format!("o-{i}"),
                "placed_at": placed,
                "store": {"id": stores[i % stores.len()]},
                "customer": {"id": format!("c{}", i % 37)},
                "payment": {"method": methods[i % methods.len()], "amount": -5.0},
                "lines": [],
            }
        });
        messages.push((format!("o-{i}-correction"), correction));
    }
    if n > 0 {
        // A redelivered copy: the same message-id, dropped at the door.
        messages.push(messages[0].clone());
    }
    let total = messages.len();
    for (id, body) in messages {
        let message = Message::builder()
            .properties(Properties::builder().message_id(id).build())
            .data(Data(Binary::from(body.to_string().into_bytes())))
            .build();
        sender
            .send(message)
            .await?
            .accepted_or_else(|state| anyhow::anyhow!("not accepted: {state:?}"))?;
    }
    // Every message was accepted above; the teardown is best effort and bounded (RabbitMQ 3.10
    // answers a closing detach in a way the client calls an illegal state, at times not at all).
    let close = async {
        let _ = sender.close().await;
        let _ = session.end().await;
        let _ = conn.close().await;
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), close).await;
    println!("sent {total} messages ({n} orders, corrections, one duplicate) to {queue}");
    Ok(())
}
