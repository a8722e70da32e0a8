//! The schema registry: event contracts as JSON Schema files, one per event
//! name and version (`schemas/TaskSolved.v0.json` is the contract of events
//! named `TaskSolved.v0`), compiled once at start and looked up by name.
//!
//! Every entry point checks a payload against its schema before anything is
//! written: [`Store::enqueue`](crate::Store::enqueue) and its batch form
//! (the CLI, the admin API and the Rust API all go through them), a
//! handler's `emit`, and, for rows inserted by plain SQL, the dispatcher
//! before it calls a handler ([`reason_to_bury`]). With no `[schemas] dir`
//! there is no registry and no cost; with one, an event name without a
//! schema costs one hash lookup (or is refused, when schemas are required).
//!
//! Drafts: draft-07 and 2020-12 (the `$schema` keyword; 2020-12 when it is
//! absent). `format` is checked, not just annotated: a `produced_at` that is
//! not a `date-time` or an id that is not a `uuid` breaks the contract.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jsonschema::{Draft, Validator};
use serde::Serialize;
use serde_json::Value;

/// A schema file that cannot be used. Each names the file and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "cannot read the schema directory {} ([schemas] dir): {source}; create it or fix the path",
        dir.display()
    )]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read schema file {}: {source}", file.display())]
    ReadFile {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("schema file {} is not JSON: {message}", file.display())]
    NotJson { file: PathBuf, message: String },
    #[error(
        "schema file {}: `$schema` is {value}; outrun supports draft-07 \
         (\"http://json-schema.org/draft-07/schema#\") and 2020-12 \
         (\"https://json-schema.org/draft/2020-12/schema\")",
        file.display()
    )]
    UnsupportedDraft { file: PathBuf, value: String },
    #[error(
        "schema file {} is not a valid JSON Schema: {} (keyword `{keyword}`): {message}",
        file.display(),
        at(pointer, "the schema's root")
    )]
    InvalidSchema {
        file: PathBuf,
        pointer: String,
        keyword: String,
        message: String,
    },
    #[error(
        "schema file {} is named for event {name:?}, which is not a valid event name: {why}",
        file.display()
    )]
    BadName {
        file: PathBuf,
        name: String,
        why: String,
    },
    #[error(
        "handler {handler} binds event {name}, which has no schema, and [schemas] required = true: \
         add {} or unbind the name",
        file.display()
    )]
    Unbound {
        handler: String,
        name: String,
        file: PathBuf,
    },
}

/// Why a payload was refused by its contract. Nothing is written; the text
/// names the event, the JSON pointer of the offending value and the rule.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Violation {
    #[error(
        "event {name} breaks its schema ({file}): {} breaks `{keyword}`: {message}",
        at(pointer, "the payload")
    )]
    Rule {
        name: String,
        /// JSON pointer of the offending value in the payload ("" = the
        /// whole payload).
        pointer: String,
        /// The schema keyword whose rule the value breaks.
        keyword: String,
        message: String,
        /// The schema's file name.
        file: String,
    },
    #[error(
        "event {name}: the payload is not JSON, so it cannot match its schema ({file}): {message}"
    )]
    NotJson {
        name: String,
        file: String,
        message: String,
    },
    #[error(
        "event {name} has no schema and [schemas] required = true: add {}/{name}.json, \
         or check the name and version",
        dir.display()
    )]
    NoSchema { name: String, dir: PathBuf },
}

impl Violation {
    /// The `last_error` of an event the dispatcher buries for it.
    pub fn dead_reason(&self) -> String {
        format!("schema: {self}")
    }
}

fn at(pointer: &str, root: &str) -> String {
    if pointer.is_empty() {
        root.to_string()
    } else {
        format!("{pointer:?}")
    }
}

/// One compiled schema.
struct Entry {
    validator: Validator,
    /// File name within the directory (for errors and `schemas list`).
    file: String,
    draft: &'static str,
}

/// The schemas of one directory, compiled, by event name. Cheap to share
/// (`Arc`); immutable once loaded.
pub struct Schemas {
    dir: PathBuf,
    required: bool,
    by_name: std::collections::HashMap<String, Entry>,
}

impl fmt::Debug for Schemas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&String> = self.by_name.keys().collect();
        names.sort();
        f.debug_struct("Schemas")
            .field("dir", &self.dir)
            .field("required", &self.required)
            .field("names", &names)
            .finish()
    }
}

/// What `outrun schemas list` shows of one schema.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaInfo {
    pub name: String,
    /// The part before `.vN`, and N (`None` for a name without a version).
    pub base: String,
    pub version: Option<u32>,
    pub draft: &'static str,
    pub file: String,
}

/// `TaskSolved.v0` → (`TaskSolved`, Some(0)); a name without a `.vN`
/// suffix has no version.
pub fn split_version(name: &str) -> (&str, Option<u32>) {
    if let Some((base, v)) = name.rsplit_once(".v")
        && !base.is_empty()
        && !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = v.parse()
    {
        return (base, Some(n));
    }
    (name, None)
}

impl Schemas {
    /// Load every `*.json` file of `dir`; the first bad file is the error.
    pub fn load(dir: &Path, required: bool) -> Result<Schemas, SchemaError> {
        let (schemas, mut errors) = Self::scan(dir, required)?;
        if errors.is_empty() {
            Ok(schemas)
        } else {
            Err(errors.swap_remove(0))
        }
    }

    /// Load what loads and return every bad file's error too (`outrun
    /// schemas check` reports them all). Files not ending in `.json` are
    /// ignored (a README may sit beside the schemas).
    pub fn scan(dir: &Path, required: bool) -> Result<(Schemas, Vec<SchemaError>), SchemaError> {
        let read_dir = |source| SchemaError::ReadDir {
            dir: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            if path.extension().is_some_and(|e| e == "json") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        let mut by_name = std::collections::HashMap::new();
        let mut errors = Vec::new();
        for file in files {
            match compile(&file) {
                Ok((name, entry)) => {
                    by_name.insert(name, entry);
                }
                Err(e) => errors.push(e),
            }
        }
        Ok((
            Schemas {
                dir: dir.to_path_buf(),
                required,
                by_name,
            },
            errors,
        ))
    }

    /// Load the directory the config names, if it names one.
    pub fn from_config(
        config: &crate::config::Config,
    ) -> Result<Option<Arc<Schemas>>, SchemaError> {
        match config.schema_dir() {
            Some(dir) => Ok(Some(Arc::new(Self::load(&dir, config.schemas.required)?))),
            None => Ok(None),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn required(&self) -> bool {
        self.required
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Every schema, by name.
    pub fn list(&self) -> Vec<SchemaInfo> {
        let mut out: Vec<SchemaInfo> = self
            .by_name
            .iter()
            .map(|(name, e)| {
                let (base, version) = split_version(name);
                SchemaInfo {
                    name: name.clone(),
                    base: base.to_string(),
                    version,
                    draft: e.draft,
                    file: e.file.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.base, a.version).cmp(&(&b.base, b.version)));
        out
    }

    /// Check a payload (JSON text) of an event named `name` against its
    /// schema. A name without a schema passes unless schemas are required.
    pub fn check(&self, name: &str, payload: &str) -> Result<(), Violation> {
        let Some(entry) = self.by_name.get(name) else {
            return self.unschematised(name);
        };
        let value: Value = serde_json::from_str(payload).map_err(|e| Violation::NotJson {
            name: name.to_string(),
            file: entry.file.clone(),
            message: e.to_string(),
        })?;
        Self::verdict(name, entry, &value)
    }

    /// As [`Schemas::check`], for a payload already parsed.
    pub fn check_value(&self, name: &str, payload: &Value) -> Result<(), Violation> {
        match self.by_name.get(name) {
            Some(entry) => Self::verdict(name, entry, payload),
            None => self.unschematised(name),
        }
    }

    /// Check every event of a batch; the first violation is the error.
    pub fn check_all(&self, events: &[crate::NewEvent]) -> Result<(), Violation> {
        events
            .iter()
            .try_for_each(|e| self.check(&e.name, &e.payload))
    }

    fn unschematised(&self, name: &str) -> Result<(), Violation> {
        if self.required {
            Err(Violation::NoSchema {
                name: name.to_string(),
                dir: self.dir.clone(),
            })
        } else {
            Ok(())
        }
    }

    fn verdict(name: &str, entry: &Entry, value: &Value) -> Result<(), Violation> {
        // The yes/no check builds no error (no paths, no message): the
        // common case, a valid payload, pays only for the rules.
        if entry.validator.is_valid(value) {
            return Ok(());
        }
        match entry.validator.validate(value) {
            Ok(()) => Ok(()),
            Err(e) => Err(Violation::Rule {
                name: name.to_string(),
                pointer: e.instance_path().as_str().to_string(),
                keyword: last_segment(e.schema_path().as_str()),
                message: e.to_string(),
                file: entry.file.clone(),
            }),
        }
    }

    /// With `required`, every event name a handler binds must have a
    /// schema; the errors name each missing one.
    pub fn unbound(&self, handlers: &[crate::wasm::HandlerSpec]) -> Vec<SchemaError> {
        let mut missing = Vec::new();
        if !self.required {
            return missing;
        }
        for h in handlers {
            for name in &h.events {
                if !self.by_name.contains_key(name) {
                    missing.push(SchemaError::Unbound {
                        handler: h.name.clone(),
                        name: name.clone(),
                        file: self.dir.join(format!("{name}.json")),
                    });
                }
            }
        }
        missing
    }

    /// Which handlers bind each schema's name (for `schemas list`).
    pub fn bound_by(&self, handlers: &[crate::wasm::HandlerSpec]) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for h in handlers {
            for name in &h.events {
                out.entry(name.clone()).or_default().push(h.name.clone());
            }
        }
        out
    }
}

/// The dispatcher's check of a claimed event (rows inserted by plain SQL
/// never met the enqueue check): `Some(last_error)` when the event must be
/// dead instead of reaching its handler. No registry: no cost.
pub fn reason_to_bury(schemas: Option<&Arc<Schemas>>, event: &crate::Event) -> Option<String> {
    let schemas = schemas?;
    schemas
        .check(&event.name, &event.payload)
        .err()
        .map(|v| v.dead_reason())
}

/// The last segment of a JSON pointer, unescaped: the keyword of a schema
/// path like `/properties/payload/required`.
fn last_segment(pointer: &str) -> String {
    pointer
        .rsplit('/')
        .next()
        .unwrap_or("")
        .replace("~1", "/")
        .replace("~0", "~")
}

/// `$schema` → the draft; absent means 2020-12.
fn draft_of(file: &Path, schema: &Value) -> Result<(Draft, &'static str), SchemaError> {
    let Some(uri) = schema.get("$schema") else {
        return Ok((Draft::Draft202012, "2020-12"));
    };
    let text = uri.as_str().unwrap_or("");
    let trimmed = text
        .trim_end_matches('#')
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    match trimmed {
        "json-schema.org/draft-07/schema" => Ok((Draft::Draft7, "draft-07")),
        "json-schema.org/draft/2020-12/schema" => Ok((Draft::Draft202012, "2020-12")),
        _ => Err(SchemaError::UnsupportedDraft {
            file: file.to_path_buf(),
            value: uri.to_string(),
        }),
    }
}

/// RFC 4122's textual form: 36 characters, hyphenated.
fn is_uuid(text: &str) -> bool {
    text.len() == 36 && uuid::Uuid::try_parse(text).is_ok()
}

fn compile(file: &Path) -> Result<(String, Entry), SchemaError> {
    let file_name = file
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = file_name.trim_end_matches(".json").to_string();
    crate::event::validate_name(&name).map_err(|e| SchemaError::BadName {
        file: file.to_path_buf(),
        name: name.clone(),
        why: e.to_string(),
    })?;
    let text = std::fs::read_to_string(file).map_err(|source| SchemaError::ReadFile {
        file: file.to_path_buf(),
        source,
    })?;
    let schema: Value = serde_json::from_str(&text).map_err(|e| SchemaError::NotJson {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let (draft, draft_name) = draft_of(file, &schema)?;
    let validator = jsonschema::options()
        .with_draft(draft)
        .should_validate_formats(true)
        // The validator checks `uuid` from draft 2019-09 on only; the
        // seed's schemas are draft-07.
        .with_format("uuid", is_uuid)
        .build(&schema)
        .map_err(|e| {
            let pointer = e.instance_path().as_str().to_string();
            // The schema keyword at fault is where in the schema the meta-
            // schema found the problem; at the root, the meta-schema's rule.
            let keyword = match last_segment(&pointer) {
                k if k.is_empty() => last_segment(e.schema_path().as_str()),
                k => k,
            };
            SchemaError::InvalidSchema {
                file: file.to_path_buf(),
                pointer,
                keyword,
                message: e.to_string(),
            }
        })?;
    Ok((
        name,
        Entry {
            validator,
            file: file_name,
            draft: draft_name,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK_SOLVED: &str = r#"{
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {
            "event_id": {"type": "string", "format": "uuid"},
            "event_name": {"type": "string", "enum": ["TaskSolved"]},
            "produced_at": {"type": "string", "format": "date-time"},
            "payload": {
                "type": "object",
                "properties": {"task_uid": {"type": "string"}},
                "required": ["task_uid"],
                "additionalProperties": false
            }
        },
        "required": ["event_id", "event_name", "produced_at", "payload"],
        "additionalProperties": false
    }"#;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    fn good(extra: &str) -> String {
        format!(
            r#"{{"event_id":"90a91f4b-8e34-4a3c-bfc8-f6649597445e","event_name":"TaskSolved","produced_at":"2025-02-13T17:11:30Z","payload":{{"task_uid":"t1"{extra}}}}}"#
        )
    }

    fn rule(v: Violation) -> (String, String) {
        match v {
            Violation::Rule {
                pointer, keyword, ..
            } => (pointer, keyword),
            other => panic!("not a rule violation: {other}"),
        }
    }

    #[test]
    fn checks_payloads_and_names_pointer_and_keyword() {
        let dir = dir_with(&[
            ("TaskSolved.v0.json", TASK_SOLVED),
            ("README.md", "not a schema"),
        ]);
        let s = Schemas::load(dir.path(), false).unwrap();
        assert!(s.check("TaskSolved.v0", &good("")).is_ok());
        // Other names pass: schemas are not required.
        assert!(s.check("other", "{}").is_ok());

        let missing = s
            .check("TaskSolved.v0", &good("").replace(r#""task_uid":"t1""#, ""))
            .unwrap_err();
        let text = missing.to_string();
        assert!(
            text.contains("TaskSolved.v0") && text.contains("task_uid"),
            "{text}"
        );
        assert_eq!(rule(missing), ("/payload".into(), "required".into()));

        let extra = s.check("TaskSolved.v0", &good(r#","x":1"#)).unwrap_err();
        assert_eq!(
            rule(extra),
            ("/payload".into(), "additionalProperties".into())
        );

        let date = s
            .check(
                "TaskSolved.v0",
                &good("").replace("2025-02-13T17:11:30Z", "yesterday"),
            )
            .unwrap_err();
        assert_eq!(rule(date), ("/produced_at".into(), "format".into()));

        let uuid = s
            .check(
                "TaskSolved.v0",
                &good("").replace("90a91f4b-8e34", "not-a-uuid"),
            )
            .unwrap_err();
        assert_eq!(rule(uuid), ("/event_id".into(), "format".into()));

        let name = s
            .check(
                "TaskSolved.v0",
                &good("").replace(r#""TaskSolved""#, r#""NewCandidate""#),
            )
            .unwrap_err();
        let text = name.to_string();
        assert_eq!(rule(name), ("/event_name".into(), "enum".into()));
        assert!(
            text.contains("\"/event_name\"") && text.contains("`enum`"),
            "{text}"
        );

        let whole = s.check("TaskSolved.v0", "[]").unwrap_err();
        assert!(
            whole.to_string().contains("the payload breaks `type`"),
            "{whole}"
        );
        assert!(matches!(
            s.check("TaskSolved.v0", "{nope").unwrap_err(),
            Violation::NotJson { .. }
        ));
    }

    #[test]
    fn required_refuses_names_without_a_schema() {
        let dir = dir_with(&[("TaskSolved.v0.json", TASK_SOLVED)]);
        let s = Schemas::load(dir.path(), true).unwrap();
        let err = s.check("TaskSolved.v7", "{}").unwrap_err();
        assert!(matches!(err, Violation::NoSchema { .. }));
        let text = err.dead_reason();
        assert!(
            text.starts_with("schema: ") && text.contains("TaskSolved.v7.json"),
            "{text}"
        );
    }

    #[test]
    fn bad_files_name_the_file_and_keyword() {
        let dir = dir_with(&[
            ("Broken.v0.json", r#"{"required": ["a" "b"]}"#),
            ("BadType.v0.json", r#"{"type": "strin"}"#),
            (
                "Nested.v0.json",
                r#"{"properties": {"a": {"minLength": -1}}}"#,
            ),
            (
                "Draft4.v0.json",
                r#"{"$schema": "http://json-schema.org/draft-04/schema#"}"#,
            ),
            (
                "Fine.v1.json",
                r#"{"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}"#,
            ),
        ]);
        let (s, errors) = Schemas::scan(dir.path(), false).unwrap();
        assert_eq!(
            s.list().iter().map(|i| i.name.as_str()).collect::<Vec<_>>(),
            ["Fine.v1"]
        );
        let texts: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        assert_eq!(texts.len(), 4, "{texts:?}");
        let find = |file: &str| texts.iter().find(|t| t.contains(file)).unwrap().clone();
        assert!(find("Broken.v0.json").contains("is not JSON"));
        let t = find("BadType.v0.json");
        assert!(
            t.contains("not a valid JSON Schema") && t.contains("`type`"),
            "{t}"
        );
        let t = find("Nested.v0.json");
        assert!(
            t.contains("/properties/a/minLength") && t.contains("`minLength`"),
            "{t}"
        );
        assert!(find("Draft4.v0.json").contains("draft-07"));
        assert!(Schemas::load(dir.path(), false).is_err());
        let err = Schemas::load(&dir.path().join("nope"), false).unwrap_err();
        assert!(err.to_string().contains("[schemas] dir"), "{err}");
    }

    #[test]
    fn versions_split_from_names() {
        assert_eq!(split_version("TaskSolved.v0"), ("TaskSolved", Some(0)));
        assert_eq!(split_version("a.b.v12"), ("a.b", Some(12)));
        assert_eq!(split_version("order.created"), ("order.created", None));
        assert_eq!(split_version("x.v"), ("x.v", None));
        assert_eq!(split_version(".v1"), (".v1", None));
    }
}
