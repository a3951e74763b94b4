//! Reading prost-encoded records from the state layer, shared by every service.

use chipgate_state::{Backend, StateError, Store};
use prost::Message;

/// A record as read: its version and decoded value.
pub type Loaded<M> = Option<(u64, M)>;

/// Why records could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The backend failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A stored record does not decode (a bug or foreign data, never a user error).
    #[error("record {key} is undecodable: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decode error.
        reason: String,
    },
}

/// Reads and decodes records, one answer per key.
///
/// # Errors
/// When the backend fails or a record does not decode.
pub async fn load_many<M: Message + Default>(store: &Store, keys: &[String]) -> Result<Vec<Loaded<M>>, LoadError> {
    let raw = store.get(keys).await?;
    raw.into_iter()
        .zip(keys)
        .map(|(r, k)| match r {
            None => Ok(None),
            Some(rec) => M::decode(rec.data.as_slice())
                .map(|m| Some((rec.version, m)))
                .map_err(|e| LoadError::Corrupt { key: k.clone(), reason: e.to_string() }),
        })
        .collect()
}

/// Reads and decodes one record.
///
/// # Errors
/// When the backend fails or the record does not decode.
pub async fn load<M: Message + Default>(store: &Store, key: String) -> Result<Loaded<M>, LoadError> {
    Ok(load_many(store, std::slice::from_ref(&key)).await?.pop().flatten())
}
