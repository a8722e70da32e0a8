//! Validation against `ProductStopListEvent.schema.json` (embedded): the
//! keywords that schema uses, interpreted from the schema document itself,
//! so the file consumers read is the one messages are checked against. A
//! test fails if the schema starts using a keyword this does not check.

use serde_json::Value;

/// The schema, as shipped next to the crate.
pub const SCHEMA: &str = include_str!("../ProductStopListEvent.schema.json");

/// Keywords [`validate`] enforces, plus the annotations it may ignore.
const SUPPORTED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "enum",
    "format",
    "$schema",
    "$id",
    "title",
    "description",
];

/// Every violation of `schema` by `value`, as `path: problem` lines (empty:
/// valid).
pub fn validate(schema: &Value, value: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    check(schema, value, "", &mut errors);
    errors
}

fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let at = if path.is_empty() { "/" } else { path };
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "array" => value.is_array(),
            "null" => value.is_null(),
            _ => false,
        };
        if !ok {
            errors.push(format!("{at}: {value} is not of type {t}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!(
            "{at}: {value} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    if let (Some(format), Some(s)) = (schema.get("format").and_then(Value::as_str), value.as_str())
    {
        let ok = match format {
            "uuid" => is_uuid(s),
            "date-time" => chrono::DateTime::parse_from_rfc3339(s).is_ok(),
            _ => true,
        };
        if !ok {
            errors.push(format!("{at}: {s:?} is not a valid {format}"));
        }
    }
    let Some(object) = value.as_object() else {
        return;
    };
    let properties = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !object.contains_key(name) {
                errors.push(format!("{at}: required property {name} is missing"));
            }
        }
    }
    for (name, v) in object {
        let child = format!("{path}/{name}");
        match properties.and_then(|p| p.get(name)) {
            Some(s) => check(s, v, &child, errors),
            None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                errors.push(format!("{child}: property not allowed by the schema"));
            }
            None => {}
        }
    }
}

/// The hyphenated 8-4-4-4-12 form RFC 9562 (and JSON Schema's `uuid`
/// format) specifies.
fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Keywords the schema uses that [`validate`] does not check.
pub fn unsupported_keywords(schema: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(o) = schema.as_object() {
        for (k, v) in o {
            if !SUPPORTED.contains(&k.as_str()) {
                out.push(k.clone());
            }
            if k == "properties"
                && let Some(props) = v.as_object()
            {
                for p in props.values() {
                    out.extend(unsupported_keywords(p));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        serde_json::from_str(SCHEMA).unwrap()
    }

    fn valid() -> Value {
        json!({
            "EventId": "0b6f7c1e-5d0a-5f3b-9a55-2c9d1e0f4a11",
            "CountryId": 643,
            "MonolithId": "11111111-1111-1111-1111-111111111111",
            "AtUtc": "2024-05-01T12:00:00Z",
            "At": "2024-05-01T15:00:00+03:00",
            "UnitId": "22222222-2222-2222-2222-222222222222",
            "StopId": "33333333-3333-3333-3333-333333333333",
            "ProductId": "44444444-4444-4444-4444-444444444444",
            "ActionType": 0,
            "Reason": 2
        })
    }

    #[test]
    fn the_schema_uses_only_checked_keywords() {
        assert_eq!(unsupported_keywords(&schema()), Vec::<String>::new());
    }

    #[test]
    fn accepts_a_valid_event() {
        assert_eq!(validate(&schema(), &valid()), Vec::<String>::new());
    }

    #[test]
    fn names_each_violation() {
        let s = schema();
        let mut v = valid();
        v["Reason"] = json!(7);
        v["ActionType"] = json!("0");
        v["UnitId"] = json!("not-a-uuid");
        v["At"] = json!("2024-05-01 15:00");
        v.as_object_mut().unwrap().remove("CountryId");
        v["Extra"] = json!(1);
        let errors = validate(&s, &v).join("\n");
        for needle in [
            "/Reason: 7 is not one of",
            "/ActionType: \"0\" is not of type integer",
            "/UnitId: \"not-a-uuid\" is not a valid uuid",
            "/At: \"2024-05-01 15:00\" is not a valid date-time",
            "required property CountryId is missing",
            "/Extra: property not allowed",
        ] {
            assert!(errors.contains(needle), "{needle} not in:\n{errors}");
        }
        assert!(
            validate(&s, &json!(1.5))
                .join("")
                .contains("not of type object")
        );
    }
}
