//! The HTTP server loop: hyper's HTTP/1.1 connections with the limits `axum::serve` has no
//! settings for, so that clients that connect and send nothing, or half a request, cannot
//! pile up.
//!
//! - At most [`MAX_CONNECTIONS`] connections are open; further ones wait in the listen
//!   backlog until one closes.
//! - A request's head must arrive within [`HEADER_READ_TIMEOUT`] — counted from the
//!   connection's start, and on a kept-alive connection from the end of the previous
//!   response, so an idle connection is closed after it as well.
//! - Bodies, and how many requests are handled at once, are limited by the router's
//!   middleware ([`super::app`]).
//!
//! HTTP/1.1 only: browsers speak HTTP/2 only over TLS, which a reverse proxy in front adds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// For a request's head, and for the next one on an idle kept-alive connection.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` completes, then lets the requests in progress
/// finish (for up to [`SHUTDOWN_GRACE`]) while closing idle connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    // A slot per open connection: shutdown waits until every one is back.
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let stopping = CancellationToken::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stopping.cancelled() => {
                    // Finish the request in progress, if any, then close.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            // Errors here are the client's: it went away, or sent no head in time.
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    stopping.cancel();
    let all = u32::try_from(MAX_CONNECTIONS).unwrap_or(u32::MAX);
    if tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("requests still in progress after {SHUTDOWN_GRACE:?}; stopping anyway");
    }
    Ok(())
}

/// A failed `accept`: the client's problem (it reset), or the process's (out of file
/// descriptors) — then wait a moment instead of spinning.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
