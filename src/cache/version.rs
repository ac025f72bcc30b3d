//! [`DataVersion`]: the version of the data a response was built from, as
//! a response extension.

/// The version of the data a response was built from, carried in the
/// response's extensions (`http::Extensions`): a lower bound, as a number
/// that only grows with the source's history. For PostgreSQL it is a WAL
/// position (an [`Lsn`](crate::pg::Lsn)'s `u64`, feature `postgres`): the
/// response reflects every commit at or below it.
///
/// [`DbLayer`](crate::pg::DbLayer) (features `http` and `postgres`) puts it
/// on the responses of requests that read or wrote through their
/// [`RequestDb`](crate::pg::RequestDb): the lowest position among their
/// reads and writes. [`HttpCacheLayer`](crate::http::HttpCacheLayer)
/// (feature `http`) stamps what it stores with it, so that a request whose
/// consistency token is newer than the stamp is not answered from it, and
/// so that an invalidation at a version (`Invalidator::invalidate_tag_at`)
/// keeps out a response built from older data. Any service can set it.
///
/// ```
/// use tower_scale::cache::DataVersion;
///
/// let mut res = axum::http::Response::new(());
/// res.extensions_mut().insert(DataVersion(42));
/// assert_eq!(res.extensions().get::<DataVersion>(), Some(&DataVersion(42)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DataVersion(pub u64);
