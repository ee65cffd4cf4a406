//! Network databases as the fetcher and the loader see them: MaxMind DB
//! files, opened and checked whole (what they say of an address is
//! [`crate::defences::networks`]' business).

use maxminddb::Reader;

use super::ListError;

/// A database's bytes, opened and checked from end to end: its metadata,
/// its search tree and every record the tree points at. `label` names it
/// in errors.
pub(crate) fn open_database(label: &str, bytes: Vec<u8>) -> Result<Reader<Vec<u8>>, ListError> {
    let invalid = |error: maxminddb::MaxMindDbError| ListError::NotADatabase {
        path: label.to_owned(),
        reason: error.to_string(),
    };
    let reader = Reader::from_source(bytes).map_err(invalid)?;
    reader.verify().map_err(invalid)?;
    Ok(reader)
}
