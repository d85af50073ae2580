//! Config diagnostics: every error names file, line and column, with a hint where one helps.
//!
//! Errors are found in four passes over one document: TOML syntax (the parser's own span),
//! value types (a value of the wrong type is reported in the config's terms, "expected an
//! integer", and taken out of the document so that typed parsing goes on with the default and
//! finds the next one), unknown keys (collected by `serde_ignored` so that all of them are
//! reported, each with a "did you mean" hint from the fields the section actually has), and
//! semantic validation (which records the key path of the offending value; the path is resolved
//! to a span here). A value reported for its type is not reported again by a later pass.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, Deserializer, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step of a key path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A key path such as `upstream[0].url`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<PathSeg>);

impl KeyPath {
    /// The path of a top-level key.
    pub fn root(key: &str) -> Self {
        KeyPath(vec![PathSeg::Key(key.to_owned())])
    }

    /// This path extended by a key.
    #[must_use]
    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(PathSeg::Key(key.to_owned()));
        KeyPath(segs)
    }

    /// This path extended by an array index.
    #[must_use]
    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(PathSeg::Index(index));
        KeyPath(segs)
    }

    /// The path with array indices removed (`upstream.url`), used to find a section's schema.
    fn section_name(&self) -> String {
        let keys: Vec<&str> = self
            .0
            .iter()
            .filter_map(|s| match s {
                PathSeg::Key(k) => Some(k.as_str()),
                PathSeg::Index(_) => None,
            })
            .collect();
        keys.join(".")
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                PathSeg::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSeg::Key(k) => write!(f, ".{k}")?,
                PathSeg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One config error, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when we can tell.
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        if let Some(hint) = &self.hint {
            write!(f, "\n    hint: {hint}")?;
        }
        Ok(())
    }
}

/// Builds diagnostics for one source text.
pub(crate) struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    root: Option<&'a Spanned<DeTable<'a>>>,
    /// Errors found so far, in document order once sorted.
    pub(crate) errors: Vec<Diagnostic>,
    /// Values already reported for their type (and taken out of the document): later errors
    /// about them or below them would only restate the same mistake.
    reported: Vec<KeyPath>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(
        file: &'a Path,
        text: &'a str,
        root: Option<&'a Spanned<DeTable<'a>>>,
    ) -> Self {
        Reporter {
            file,
            text,
            root,
            errors: Vec::new(),
            reported: Vec::new(),
        }
    }

    /// Records an error at a byte span.
    pub(crate) fn at_span(
        &mut self,
        span: Option<Range<usize>>,
        message: String,
        hint: Option<String>,
    ) {
        let offset = span.map_or(0, |s| s.start);
        let (line, column) = line_col(self.text, offset);
        self.errors.push(Diagnostic {
            file: self.file.to_owned(),
            line,
            column,
            message,
            hint,
        });
    }

    /// Records an error about the value at `path` (or the closest enclosing item that exists),
    /// unless that value was already reported for its type.
    pub(crate) fn at_path(&mut self, path: &KeyPath, message: String, hint: Option<String>) {
        if self.was_reported(path) {
            return;
        }
        let span = self.root.and_then(|root| span_of(root, path, false));
        self.at_span(span, format!("`{path}`: {message}"), hint);
    }

    /// Records an unknown key, with a "did you mean" hint drawn from the section's fields.
    pub(crate) fn unknown_key(&mut self, path: &KeyPath, known: &[&'static str]) {
        let span = self.root.and_then(|root| span_of(root, path, true));
        let name = match path.0.last() {
            Some(PathSeg::Key(k)) => k.clone(),
            _ => path.to_string(),
        };
        let parent = KeyPath(
            path.0
                .split_last()
                .map(|(_, p)| p.to_vec())
                .unwrap_or_default(),
        );
        let section = parent.section_name();
        let message = if section.is_empty() {
            format!("unknown key `{name}`")
        } else {
            format!("unknown key `{name}` in `[{section}]`")
        };
        let hint = did_you_mean(&name, known)
            .map(|best| format!("did you mean `{best}`?"))
            .or_else(|| {
                (!known.is_empty()).then(|| format!("valid keys here: {}", known.join(", ")))
            });
        self.at_span(span, message, hint);
    }

    /// Records a value of the wrong type at `path`, taken out of the document with everything
    /// under `removed`; `message` is the deserializer's (`invalid type: string "5", expected
    /// i64`), said again in the config's terms.
    pub(crate) fn wrong_type(&mut self, path: &KeyPath, removed: KeyPath, message: &str) {
        let (message, hint) = type_message(message);
        let span = self.root.and_then(|root| span_of(root, path, false));
        self.at_span(span, format!("`{path}`: {message}"), hint);
        self.reported.push(removed);
    }

    /// Whether the value at `path` (or one above it) was reported for its type.
    pub(crate) fn was_reported(&self, path: &KeyPath) -> bool {
        self.reported.iter().any(|r| path.0.starts_with(&r.0))
    }

    pub(crate) fn finish(mut self) -> Vec<Diagnostic> {
        self.errors.sort_by_key(|d| (d.line, d.column));
        self.errors.dedup();
        self.errors
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// The span of the value (or, with `key_span`, of the key) at `path`; falls back to the deepest
/// existing ancestor so that an error about a missing key points at its section.
fn span_of(root: &Spanned<DeTable<'_>>, path: &KeyPath, key_span: bool) -> Option<Range<usize>> {
    let mut best = Some(root.span());
    let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
    let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
    for seg in &path.0 {
        let value: &Spanned<DeValue<'_>> = match (seg, table, array) {
            (PathSeg::Key(k), Some(t), _) => {
                let Some((key, value)) = t.get_key_value(k.as_str()) else {
                    return best;
                };
                if key_span && std::ptr::eq(seg, path.0.last()?) {
                    return Some(key.span());
                }
                value
            }
            (PathSeg::Index(i), _, Some(a)) => match a.get(*i) {
                Some(v) => v,
                None => return best,
            },
            _ => return best,
        };
        best = Some(value.span());
        table = None;
        array = None;
        match value.get_ref() {
            DeValue::Table(t) => table = Some(t),
            DeValue::Array(a) => array = Some(a.as_ref()),
            _ => {}
        }
    }
    best
}

/// The path of the value whose span is exactly `span` (where the deserializer located an
/// error), if there is one.
pub(crate) fn path_of_span(root: &Spanned<DeTable<'_>>, span: &Range<usize>) -> Option<KeyPath> {
    fn in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut Vec<PathSeg>) -> bool {
        for (key, value) in table {
            path.push(PathSeg::Key(key.get_ref().to_string()));
            if in_value(value, span, path) {
                return true;
            }
            path.pop();
        }
        false
    }
    fn in_value(
        value: &Spanned<DeValue<'_>>,
        span: &Range<usize>,
        path: &mut Vec<PathSeg>,
    ) -> bool {
        if value.span() == *span {
            return true;
        }
        match value.get_ref() {
            DeValue::Table(t) => in_table(t, span, path),
            DeValue::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    path.push(PathSeg::Index(i));
                    if in_value(v, span, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            _ => false,
        }
    }
    let mut path = Vec::new();
    in_table(root.get_ref(), span, &mut path).then_some(KeyPath(path))
}

/// Takes the value at `path` out of the document, so that its default applies; an element of
/// an array goes with its whole array (the later elements keep their index, so errors about
/// them are still located right). Returns the path of what was removed.
pub(crate) fn remove_value(root: &mut Spanned<DeTable<'_>>, path: &KeyPath) -> Option<KeyPath> {
    fn table_at<'a, 'i>(
        table: &'a mut DeTable<'i>,
        segs: &[PathSeg],
    ) -> Option<&'a mut DeTable<'i>> {
        let Some((first, rest)) = segs.split_first() else {
            return Some(table);
        };
        let PathSeg::Key(key) = first else {
            return None;
        };
        value_table(table.get_mut(key.as_str())?.get_mut(), rest)
    }
    fn value_table<'a, 'i>(
        value: &'a mut DeValue<'i>,
        segs: &[PathSeg],
    ) -> Option<&'a mut DeTable<'i>> {
        match (value, segs.split_first()) {
            (DeValue::Table(t), _) => table_at(t, segs),
            (DeValue::Array(a), Some((PathSeg::Index(i), rest))) => {
                value_table(a.get_mut(*i)?.get_mut(), rest)
            }
            _ => None,
        }
    }
    let last_key = path.0.iter().rposition(|s| matches!(s, PathSeg::Key(_)))?;
    let target = path.0.get(..=last_key)?;
    let (PathSeg::Key(key), parents) = target.split_last()? else {
        return None;
    };
    table_at(root.get_mut(), parents)?.remove(key.as_str())?;
    Some(KeyPath(target.to_vec()))
}

/// Says a deserializer's type error (`invalid type: string "5", expected i64`) in the config's
/// terms (`expected an integer, found the string "5"`), with a hint for the usual slips.
pub(crate) fn type_message(message: &str) -> (String, Option<String>) {
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.rsplit_once(", expected "))
    else {
        return (message.to_owned(), None);
    };
    let expected = match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" => "an integer",
        "a boolean" => "true or false",
        "a sequence" => "an array",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        e => e,
    };
    // serde writes scalars as `integer \`10\`` and strings as `string "x"`.
    let scalar = |prefix: &str| {
        found
            .strip_prefix(prefix)
            .map(|v| v.trim_matches('`').to_owned())
    };
    let (found_text, hint) = if let Some(n) = scalar("integer ") {
        let hint = if expected.starts_with("a duration") {
            Some(format!(
                "durations are strings with a unit: write \"{n}s\" for {n} seconds"
            ))
        } else if expected.starts_with("a size") {
            Some(format!(
                "sizes are strings with a unit: write \"{n}B\" for {n} bytes"
            ))
        } else {
            None
        };
        (format!("the integer {n}"), hint)
    } else if let Some(x) = scalar("floating point ") {
        (format!("the number {x}"), None)
    } else if let Some(b) = scalar("boolean ") {
        (b, None)
    } else if let Some(text) = found.strip_prefix("string ") {
        let unquoted = text.trim_matches('"');
        let hint = match expected {
            "an integer" if unquoted.trim().parse::<i64>().is_ok() => Some(format!(
                "write the number without quotes: {}",
                unquoted.trim()
            )),
            "true or false" if matches!(unquoted, "true" | "false") => {
                Some(format!("write it without quotes: {unquoted}"))
            }
            _ => None,
        };
        (format!("the string {text}"), hint)
    } else {
        let found = match found {
            "sequence" => "an array",
            "map" => "a table",
            other => other,
        };
        (found.to_owned(), None)
    };
    (format!("expected {expected}, found {found_text}"), hint)
}

/// The closest known name, if it is close enough to be a plausible typo.
pub(crate) fn did_you_mean<'k>(name: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), *k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// The field names serde's derive declares for `T` (a struct), found by asking `T` to deserialize
/// itself from a deserializer that only records them. Keeps "did you mean" hints in step with the
/// real schema without a hand-kept list.
pub(crate) fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'f>(&'f mut &'static [&'static str]);
    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("probe")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 4));
        assert_eq!(line_col(text, 999), (3, 1));
    }

    #[test]
    fn type_errors_are_said_in_the_configs_terms() {
        let t = |m: &str| type_message(m);
        assert_eq!(
            t("invalid type: string \"5\", expected i64"),
            (
                "expected an integer, found the string \"5\"".to_owned(),
                Some("write the number without quotes: 5".to_owned())
            )
        );
        assert_eq!(
            t("invalid type: integer `10`, expected a duration such as \"10s\""),
            (
                "expected a duration such as \"10s\", found the integer 10".to_owned(),
                Some("durations are strings with a unit: write \"10s\" for 10 seconds".to_owned())
            )
        );
        assert_eq!(
            t("invalid type: string \"yes\", expected a boolean").0,
            "expected true or false, found the string \"yes\""
        );
        assert_eq!(
            t("invalid type: sequence, expected a string").0,
            "expected a string, found an array"
        );
        assert_eq!(t("something else").0, "something else");
    }

    #[test]
    fn did_you_mean_suggests_close_names_only() {
        let known = ["max_clients", "listen", "max_packet_size"];
        assert_eq!(did_you_mean("max_client", &known), Some("max_clients"));
        assert_eq!(did_you_mean("lisen", &known), Some("listen"));
        assert_eq!(did_you_mean("zzz", &known), None);
    }

    #[test]
    fn fields_of_reads_the_derived_schema() {
        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct S {
            alpha: u8,
            beta: String,
        }
        assert_eq!(fields_of::<S>(), &["alpha", "beta"]);
    }
}
