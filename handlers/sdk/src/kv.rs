//! Key-value store with TTLs and sets: Redis when the runtime is configured
//! with one, an embedded store otherwise. Keys are confined to the handler's
//! prefix by the host; handlers pass and see unprefixed keys.

use std::time::Duration;

use crate::CapError;
use crate::bindings::outrun::handler::kv as wit;

/// The bytes at `key`, `None` if absent.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, CapError> {
    Ok(wit::get(key)?)
}

/// The value at `key` as UTF-8 text, `None` if absent. Bytes that are not
/// UTF-8 are [`CapError::Invalid`], naming the key.
pub fn get_string(key: &str) -> Result<Option<String>, CapError> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|e| CapError::Invalid(format!("kv value at `{key}` is not UTF-8 text: {e}"))),
    }
}

/// Store `value` at `key`, replacing any value; with `ttl` the key disappears
/// after that long.
pub fn set(key: &str, value: impl AsRef<[u8]>, ttl: Option<Duration>) -> Result<(), CapError> {
    Ok(wit::set(key, value.as_ref(), ttl.map(crate::duration_ms))?)
}

/// Delete `key`; returns whether it existed.
pub fn delete(key: &str) -> Result<bool, CapError> {
    Ok(wit::delete(key)?)
}

/// Whether `key` exists.
pub fn exists(key: &str) -> Result<bool, CapError> {
    Ok(wit::exists(key)?)
}

/// Set the key's time to live, or clear it with `None`; false if no such key.
pub fn expire(key: &str, ttl: Option<Duration>) -> Result<bool, CapError> {
    Ok(wit::expire(key, ttl.map(crate::duration_ms))?)
}

/// Add `members` to the set at `key`; returns how many were new.
pub fn set_add<S: AsRef<str>>(key: &str, members: &[S]) -> Result<u32, CapError> {
    Ok(wit::set_add(key, &owned(members))?)
}

/// Remove `members` from the set at `key`; returns how many were there.
pub fn set_remove<S: AsRef<str>>(key: &str, members: &[S]) -> Result<u32, CapError> {
    Ok(wit::set_remove(key, &owned(members))?)
}

/// All members of the set at `key` (empty if none), in no set order.
pub fn set_members(key: &str) -> Result<Vec<String>, CapError> {
    Ok(wit::set_members(key)?)
}

fn owned<S: AsRef<str>>(members: &[S]) -> Vec<String> {
    members.iter().map(|m| m.as_ref().to_owned()).collect()
}
