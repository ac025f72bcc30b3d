//! `LISTEN` on a session of its own (the pooled sessions' drivers drop
//! notifications): what the job queue's workers wake on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Socket};

use super::DbError;

/// Called with each notification's payload.
pub(crate) type OnNotify = Arc<dyn Fn(&str) + Send + Sync>;

type ListenFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Connects, listens on a channel, calls `listening(true)` once `LISTEN`
/// took effect, and calls back for each notification until the session
/// ends (an error; `listening(false)` first): the caller reconnects.
pub(crate) type Listen = Box<dyn Fn(String, OnNotify, OnListening) -> ListenFuture + Send + Sync>;

/// Told when a listening session starts (`true`) and ends (`false`).
pub(crate) type OnListening = Arc<dyn Fn(bool) + Send + Sync>;

/// How often a quiet listening session is checked; a check unanswered
/// within the connect bound ends the session (a stalled server).
const CHECK_EVERY: Duration = Duration::from_secs(10);

/// The listener of one node: `config` with the node's TLS, every step
/// bounded by `bound`.
pub(crate) fn listener<T>(config: tokio_postgres::Config, tls: T, bound: Duration) -> Listen
where
    T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
    T::Stream: Sync + Send,
    T::TlsConnect: Sync + Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    Box::new(move |channel, on_notify, listening| {
        let (config, tls) = (config.clone(), tls.clone());
        Box::pin(async move {
            let ended = listen(config, tls, bound, channel, on_notify, &listening).await;
            listening(false);
            ended
        })
    })
}

async fn listen<T>(
    config: tokio_postgres::Config,
    tls: T,
    bound: Duration,
    channel: String,
    on_notify: OnNotify,
    listening: &OnListening,
) -> Result<(), String>
where
    T: MakeTlsConnect<Socket> + Send + 'static,
    T::Stream: Send,
    T::TlsConnect: Send,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    let (client, mut connection) = tokio::time::timeout(bound, config.connect(tls))
        .await
        .map_err(|_| format!("no session within {bound:?}"))?
        .map_err(|e| e.to_string())?;
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<String>();
    // Aborted however this future ends (dropped too: the primary moved),
    // so the session's connection never outlives it.
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let why = loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => on_notify(n.payload()),
                Some(Ok(_)) => {}
                Some(Err(e)) => break e.to_string(),
                None => break "the session closed".to_string(),
            }
        };
        let _ = ended_tx.send(why);
    }));
    let quoted = format!("LISTEN \"{}\"", channel.replace('"', "\"\""));
    async {
        tokio::time::timeout(bound, client.batch_execute(&quoted))
            .await
            .map_err(|_| format!("LISTEN unanswered within {bound:?}"))?
            .map_err(|e| e.to_string())?;
        listening(true);
        loop {
            tokio::select! {
                why = &mut ended => return Err(why.unwrap_or_else(|_| "the session ended".into())),
                () = tokio::time::sleep(CHECK_EVERY) => {
                    tokio::time::timeout(bound, client.simple_query(""))
                        .await
                        .map_err(|_| format!("the session stalled (no answer within {bound:?})"))?
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    .await
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl super::Db {
    /// Listens on `channel` on the primary (a session of its own) until
    /// that session ends, or the primary moves to another node (after a
    /// failover the old primary, if it still runs, would hear no more
    /// notifications); the caller reconnects.
    pub(crate) async fn listen(
        &self,
        channel: String,
        on_notify: OnNotify,
        listening: OnListening,
    ) -> Result<(), DbError> {
        let index = self.primary_index().await?;
        let node = self.node(index);
        let session = (node.listen)(channel, on_notify, Arc::clone(&listening));
        let moved = async {
            loop {
                let notified = self.inner.changed.notified();
                // Another node elected; not a moment without a primary
                // (one failed probe), which would only churn the session.
                let now = self
                    .inner
                    .primary
                    .load(std::sync::atomic::Ordering::Acquire);
                if now != index && now < self.inner.nodes.len() {
                    return;
                }
                notified.await;
            }
        };
        tokio::select! {
            ended = session => ended.map_err(|reason| DbError::Listen {
                node: Arc::clone(&node.name),
                reason,
            }),
            () = moved => {
                // The session's future is dropped with its connection;
                // its own `listening(false)` went with it.
                listening(false);
                Err(DbError::Listen {
                    node: Arc::clone(&node.name),
                    reason: "the primary moved to another node".into(),
                })
            }
        }
    }
}
