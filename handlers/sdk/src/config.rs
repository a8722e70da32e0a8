//! Handler config values from the `[[handler]]` entry of the runtime's config
//! file, read through `wasi:config/store`.
//!
//! A missing or malformed value is an operator's mistake, not the event's, so
//! the errors here are retryable: the event backs off while the config is
//! fixed and reloaded, instead of going dead at once.

use std::fmt::Display;
use std::str::FromStr;

use crate::HandlerError;
use crate::bindings::wasi::config::store as wit;

/// The value of `key`, or an error if the host's config source failed.
pub fn try_get(key: &str) -> Result<Option<String>, HandlerError> {
    wit::get(key).map_err(|e| {
        let detail = match e {
            wit::Error::Upstream(m) | wit::Error::Io(m) => m,
        };
        HandlerError::retry(format!("reading config key `{key}` failed: {detail}"))
    })
}

/// The value of `key`, `None` if it is not set. A failure of the host's config
/// source is logged and reads as unset; use [`try_get`] to see it.
pub fn get(key: &str) -> Option<String> {
    match try_get(key) {
        Ok(v) => v,
        Err(e) => {
            crate::log::warn(e.message());
            None
        }
    }
}

/// The value of `key`; an unset key is an error naming it.
pub fn require(key: &str) -> Result<String, HandlerError> {
    try_get(key)?.ok_or_else(|| {
        HandlerError::retry(format!(
            "config key `{key}` is not set; add it to this handler's config in the runtime's config file"
        ))
    })
}

/// The value of `key` parsed as `T`, `default` when unset; a value that does
/// not parse is an error naming the key and the value.
pub fn parse_or<T>(key: &str, default: T) -> Result<T, HandlerError>
where
    T: FromStr,
    T::Err: Display,
{
    match try_get(key)? {
        None => Ok(default),
        Some(raw) => parse_value(key, &raw),
    }
}

/// Parse a config value, with an error naming the key and the value.
pub fn parse_value<T>(key: &str, raw: &str) -> Result<T, HandlerError>
where
    T: FromStr,
    T::Err: Display,
{
    raw.trim().parse().map_err(|e| {
        HandlerError::retry(format!(
            "config key `{key}` has value {raw:?}, which is not a valid {}: {e}",
            std::any::type_name::<T>()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_value_names_key_and_value() {
        assert_eq!(parse_value::<u64>("n", " 12 ").unwrap(), 12);
        let e = parse_value::<u64>("requeue_threshold", "two").unwrap_err();
        assert!(e.is_retryable());
        assert!(e.message().contains("`requeue_threshold`") && e.message().contains("\"two\""));
    }
}
