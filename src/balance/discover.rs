//! The balancer's `Discover`: the [`Upstreams`](super::Upstreams) handle's
//! changes, each added upstream made into an [`Endpoint`].

use std::convert::Infallible;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::mpsc;
use tower::discover::Change;

use super::config::Settings;
use super::endpoint::{Client, Endpoint};
use super::ewma::PickClock;
use super::upstreams::{Id, SetChange};

/// The stream of changes p2c consumes ([`tower::discover::Discover`] is
/// implemented for it).
pub(crate) struct Discovered<B> {
    changes: mpsc::UnboundedReceiver<SetChange>,
    client: Client<B>,
    settings: Arc<Settings>,
    clock: Arc<PickClock>,
}

impl<B> Discovered<B> {
    pub(crate) fn new(
        changes: mpsc::UnboundedReceiver<SetChange>,
        client: Client<B>,
        settings: Arc<Settings>,
        clock: Arc<PickClock>,
    ) -> Self {
        Self {
            changes,
            client,
            settings,
            clock,
        }
    }
}

impl<B> fmt::Debug for Discovered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovered").finish_non_exhaustive()
    }
}

impl<B> Stream for Discovered<B> {
    type Item = Result<Change<Id, Endpoint<B>>, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.changes.poll_recv(cx).map(|change| {
            change.map(|change| {
                Ok(match change {
                    Change::Insert(key, state) => Change::Insert(
                        key,
                        Endpoint::new(
                            state,
                            this.client.clone(),
                            Arc::clone(&this.settings),
                            Arc::clone(&this.clock),
                        ),
                    ),
                    Change::Remove(key) => Change::Remove(key),
                })
            })
        })
    }
}
