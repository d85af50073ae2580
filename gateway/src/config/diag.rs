//! Config diagnostics: every error names file, line and column, with a hint where one helps.
//!
//! Errors are found in three passes over one document: TOML syntax (the parser's own span),
//! unknown keys (collected by `serde_ignored` so that all of them are reported, each with a
//! "did you mean" hint from the fields the section actually has), and semantic validation (which
//! records the key path of the offending value; the path is resolved to a span here).

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

    /// Records an error about the value at `path` (or the closest enclosing item that exists).
    pub(crate) fn at_path(&mut self, path: &KeyPath, message: String, hint: Option<String>) {
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
