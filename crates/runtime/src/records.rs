//! Reading prost-encoded records from the state layer, shared by every service.

use chipgate_state::{Backend, Record, StateError, Store};
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
    decode_each(store.get(keys).await?, keys, |_, data| M::decode(data))
}

/// Decodes records as read (`raw`, one per key of `keys`, in order) with `decode`, given each one's
/// index and bytes: one answer per key, absent records None.
///
/// The vector is sized up front: collecting into a `Result<Vec<_>, _>` knows no lower bound and
/// grows it by doubling, which for a pro-rata drain's whole backlog (tens of thousands of orders)
/// copies the records several times over into fresh pages.
///
/// # Errors
/// [`LoadError::Corrupt`] naming the key of the first record that does not decode.
pub fn decode_each<M, E: std::fmt::Display>(
    raw: Vec<Option<Record>>,
    keys: &[String],
    mut decode: impl FnMut(usize, &[u8]) -> Result<M, E>,
) -> Result<Vec<Loaded<M>>, LoadError> {
    let mut loaded = Vec::with_capacity(raw.len());
    for (i, (r, key)) in raw.into_iter().zip(keys).enumerate() {
        loaded.push(match r {
            None => None,
            Some(rec) => Some((
                rec.version,
                decode(i, &rec.data).map_err(|e| LoadError::Corrupt { key: key.clone(), reason: e.to_string() })?,
            )),
        });
    }
    Ok(loaded)
}

/// Reads and decodes one record.
///
/// # Errors
/// When the backend fails or the record does not decode.
pub async fn load<M: Message + Default>(store: &Store, key: String) -> Result<Loaded<M>, LoadError> {
    Ok(load_many(store, std::slice::from_ref(&key)).await?.pop().flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(version: u64, data: &str) -> Option<Record> {
        Some(Record { version, data: data.as_bytes().to_vec() })
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("k{i}")).collect()
    }

    #[test]
    fn each_key_gets_its_own_answer_in_order_and_absent_records_are_none() {
        let raw = vec![rec(3, "a"), None, rec(7, "cc")];
        let mut seen = Vec::new();
        let got = decode_each(raw, &keys(3), |i, data| {
            seen.push(i);
            Ok::<_, String>(String::from_utf8_lossy(data).into_owned())
        })
        .expect("decodes");
        assert_eq!(got, vec![Some((3, "a".to_string())), None, Some((7, "cc".to_string()))]);
        assert_eq!(seen, [0, 2], "decode is given each present record's index");
    }

    #[test]
    fn an_undecodable_record_names_its_key() {
        let raw = vec![rec(1, "ok"), rec(2, "bad")];
        let err = decode_each(raw, &keys(2), |_, data| if data == b"bad" { Err("no") } else { Ok(()) })
            .expect_err("the second record does not decode");
        match err {
            LoadError::Corrupt { key, reason } => assert_eq!((key.as_str(), reason.as_str()), ("k1", "no")),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
