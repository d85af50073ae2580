//! The man pages of the Debian package, generated so that they cannot drift from their sources:
//! `sensorgate(8)` from the clap definition ([`Cli`], what `--help` prints) and
//! `sensorgate.toml(5)` from the reference config `config/sensorgate.toml` (its comments are
//! the documentation of every key).
//!
//! The generated pages are checked in under `packaging/man/` (cargo-deb packs them from there,
//! with no build step of its own). The tests here regenerate both and fail when the checked-in
//! copy differs; `SENSORGATE_BLESS=1 cargo test -p sensorgate manpages` rewrites them.
//!
//! Rendering of the reference config (every line is one of these):
//! - a comment block at the top: the DESCRIPTION;
//! - `[table]` / `[[table]]`: a subsection, the comment above it its introduction;
//! - `key = value`: an entry (`.TP`), the comment lines above it its description;
//! - `# key = value` and `# [[table]]`: the same, marked as not set by default (commented-out
//!   examples); inside them `# # text` is description;
//! - comment lines indented by more than one space: literal lines (commands).
//!
//! No date in the title: the pages are a pure function of their sources.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::CommandFactory as _;

use crate::Cli;

/// The environment variable that makes the tests rewrite the checked-in pages.
const BLESS: &str = "SENSORGATE_BLESS";

/// The command that refreshes the checked-in pages.
const REFRESH: &str = "SENSORGATE_BLESS=1 cargo test -p sensorgate manpages";

/// `packaging/man/` in the workspace.
fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/man")
}

/// The reference config.
fn reference_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/sensorgate.toml")
}

/// Escapes text for roff: backslashes, and a leading `.` or `'` (a control line otherwise).
/// Hyphens become `\-` so that options and paths copy and paste as typed.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            _ => out.push(c),
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// The apostrophe string definition clap_mangen puts before every rendered part; the page
/// keeps the first.
const PREAMBLE: [&str; 2] = [".ie \\n(.g .ds Aq \\(aq", ".el .ds Aq '"];

/// A clap_mangen rendering without its `.SH` heading line (reused under our own headings)
/// and without the [`PREAMBLE`].
fn without_heading(render: impl Fn(&mut Vec<u8>) -> std::io::Result<()>) -> String {
    let mut buf = Vec::new();
    render(&mut buf).unwrap();
    String::from_utf8(buf)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with(".SH ") && !PREAMBLE.contains(l))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `sensorgate(8)`.
pub(crate) fn sensorgate_8() -> String {
    let mut cmd = Cli::command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration");
    // Our own title: clap_mangen leaves out an empty date (its arguments then shift).
    let mut page = format!(
        ".TH sensorgate 8 \"\" \"sensorgate {}\" \"System Administration\"\n",
        env!("CARGO_PKG_VERSION")
    )
    .into_bytes();
    man.render_name_section(&mut page).unwrap();
    let mut page = String::from_utf8(page).unwrap();
    page.push_str(".SH SYNOPSIS\n");
    page.push_str(&without_heading(|w| man.render_synopsis_section(w)));
    page.push_str(
        ".SH DESCRIPTION\n\
         \\fBsensorgate\\fR connects MQTT\\-SN (UDP and serial lines), CoAP and HTTP sensors to \
         MQTT and AMQP brokers. Every uplink message is stored in a spool on disk before it is \
         acknowledged, and forwarded from there, so broker outages and restarts lose nothing.\n\
         .PP\n\
         The Debian package runs it as the systemd service \\fBsensorgate.service\\fR, as the \
         \\fBsensorgate\\fR system user, with the configuration \
         \\fI/etc/sensorgate/sensorgate.toml\\fR (see \\fBsensorgate.toml\\fR(5)).\n",
    );
    page.push_str(".SH OPTIONS\n");
    page.push_str(&without_heading(|w| man.render_options_section(w)));
    page.push_str(".SH COMMANDS\n");
    // Not clap's own `help` command (the same as --help).
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("sensorgate {}", sub.get_name());
        let sub_man = clap_mangen::Man::new(sub.clone().bin_name(&name));
        writeln!(page, ".SS \"{}\"", escape(&name)).unwrap();
        page.push_str(&without_heading(|w| sub_man.render_synopsis_section(w)));
        page.push_str(".PP\n");
        page.push_str(&without_heading(|w| sub_man.render_description_section(w)));
        page.push_str(&without_heading(|w| sub_man.render_options_section(w)));
    }
    page.push_str(".SH \"EXIT STATUS\"\n.nf\n");
    let after = cmd
        .get_after_help()
        .map(ToString::to_string)
        .unwrap_or_default();
    for line in after.lines().skip_while(|l| l.starts_with("Exit status")) {
        writeln!(page, "{}", escape(line)).unwrap();
    }
    page.push_str(".fi\n");
    page.push_str(
        ".SH FILES\n\
         .TP\n\\fI/etc/sensorgate/sensorgate.toml\\fR\n\
         The configuration (a conffile: upgrades keep local edits). \
         \\fBsensorgate check\\-config\\fR validates it.\n\
         .TP\n\\fI/var/lib/sensorgate/\\fR\n\
         The state directory (\\fBstate_dir\\fR): the spool and the persistent sessions.\n\
         .TP\n\\fI/lib/systemd/system/sensorgate.service\\fR\n\
         The systemd unit (change it with \\fBsystemctl edit sensorgate\\fR).\n\
         .SH \"SEE ALSO\"\n\
         \\fBsensorgate.toml\\fR(5), \\fBsystemctl\\fR(1), \\fBjournalctl\\fR(1), \
         \\fBsystemd.exec\\fR(5)\n",
    );
    page.push_str(".SH VERSION\n");
    page.push_str(&without_heading(|w| man.render_version_section(w)));
    page
}

/// What one line of the reference config is.
#[derive(Debug, PartialEq)]
enum Line<'a> {
    /// An empty line: ends a comment block.
    Blank,
    /// An empty comment line (`#`, or `# #` in an example): a paragraph break within one.
    Break,
    /// A comment line's text (`#` and one space removed; `# #` for an example's comment).
    Text(&'a str),
    /// Text indented further: a literal line (a command).
    Literal(&'a str),
    /// `[table]` or `[[table]]`; `example` when commented out.
    Table { name: &'a str, example: bool },
    /// `key = value`; `example` when commented out.
    Key {
        key: &'a str,
        value: &'a str,
        example: bool,
    },
}

/// A `key = value` line's parts, when `text` is one (a bare TOML key, then ` = `).
fn key_value(text: &str) -> Option<(&str, &str)> {
    let (key, value) = text.split_once(" = ")?;
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    bare.then_some((key, value))
}

/// A table header's name, when `text` is one.
fn table(text: &str) -> Option<&str> {
    let inner = text.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner
        .strip_prefix('[')
        .and_then(|i| i.strip_suffix(']'))
        .unwrap_or(inner);
    inner
        .chars()
        .all(|c| c.is_ascii_lowercase() || c == '.' || c == '_')
        .then_some(text)
}

fn classify(line: &str) -> Line<'_> {
    let line = line.trim_end();
    if line.is_empty() {
        return Line::Blank;
    }
    let Some(comment) = line.strip_prefix('#') else {
        if let Some(name) = table(line) {
            return Line::Table {
                name,
                example: false,
            };
        }
        return match key_value(line) {
            Some((key, value)) => Line::Key {
                key,
                value,
                example: false,
            },
            // Not in the reference config (the test below says so); shown as it is.
            None => Line::Literal(line),
        };
    };
    let text = comment.strip_prefix(' ').unwrap_or(comment);
    if text.is_empty() || text == "#" {
        return Line::Break;
    }
    if let Some(inner) = text.strip_prefix("# ") {
        return Line::Text(inner);
    }
    if text.starts_with(' ') {
        return Line::Literal(text.trim_start());
    }
    if let Some(name) = table(text) {
        return Line::Table {
            name,
            example: true,
        };
    }
    match key_value(text) {
        Some((key, value)) => Line::Key {
            key,
            value,
            example: true,
        },
        None => Line::Text(text),
    }
}

/// `sensorgate.toml(5)` from the text of the reference config.
pub(crate) fn sensorgate_toml_5(reference: &str) -> String {
    let mut page = format!(
        ".TH sensorgate.toml 5 \"\" \"sensorgate {}\" \"File Formats\"\n\
         .SH NAME\nsensorgate.toml \\- sensorgate configuration file\n\
         .SH SYNOPSIS\n\\fI/etc/sensorgate/sensorgate.toml\\fR\n\
         .SH DESCRIPTION\n",
        env!("CARGO_PKG_VERSION")
    );
    let mut in_description = true;
    // Text waiting for the entry or table it describes; literal lines keep their place.
    let mut pending: Vec<Line<'_>> = Vec::new();
    for line in reference.lines() {
        match classify(line) {
            Line::Table { name, example } => {
                if in_description {
                    flush_description(&mut page, &mut pending);
                    page.push_str(".SH KEYS\n");
                    in_description = false;
                }
                let note = if example {
                    " (an example, commented out)"
                } else {
                    ""
                };
                writeln!(page, ".SS \"{}{note}\"", escape(name)).unwrap();
                flush_entry(&mut page, &mut pending, false);
            }
            Line::Key {
                key,
                value,
                example,
            } => {
                page.push_str(".TP\n");
                let note = if example { " (not set by default)" } else { "" };
                writeln!(page, "\\fB{}\\fR = {}{note}", escape(key), escape(value)).unwrap();
                flush_entry(&mut page, &mut pending, true);
            }
            Line::Blank if in_description => pending.push(Line::Blank),
            // A blank line ends a comment block that described nothing below it: it stands
            // on its own.
            Line::Blank => {
                if !pending.is_empty() {
                    // As a plain paragraph, not indented under the previous entry.
                    page.push_str(".PP\n");
                    flush_plain(&mut page, &mut pending);
                }
            }
            other => pending.push(other),
        }
    }
    flush_entry(&mut page, &mut pending, false);
    page.push_str(
        ".SH \"SEE ALSO\"\n\\fBsensorgate\\fR(8); \\fBsensorgate check\\-config\\fR \
         validates the file and names every error by line and column.\n",
    );
    page
}

/// The comment lines describing an entry (`indented`: right after its `.TP` line) or a table
/// (a plain paragraph after its heading).
fn flush_entry(page: &mut String, pending: &mut Vec<Line<'_>>, indented: bool) {
    let para = if indented { ".IP\n" } else { ".PP\n" };
    let mut in_literal = false;
    // An entry's first paragraph is the body of its `.TP`.
    let mut para_open = indented;
    // In a list item: an indented line continues it.
    let mut in_item = false;
    for line in pending.drain(..) {
        match line {
            Line::Literal(text) if in_item => {
                writeln!(page, "{}", escape(text)).unwrap();
            }
            Line::Literal(text) => {
                if !in_literal {
                    page.push_str(para);
                    page.push_str(".nf\n");
                    in_literal = true;
                }
                writeln!(page, "{}", escape(text)).unwrap();
                para_open = false;
            }
            Line::Text(text) => {
                if in_literal {
                    page.push_str(".fi\n");
                    in_literal = false;
                }
                in_item = text.starts_with("- ");
                if let Some(item) = text.strip_prefix("- ") {
                    page.push_str(".IP \\(bu 2\n");
                    writeln!(page, "{}", escape(item)).unwrap();
                    para_open = false;
                } else {
                    if !para_open {
                        page.push_str(para);
                        para_open = true;
                    }
                    writeln!(page, "{}", escape(text)).unwrap();
                }
            }
            Line::Blank | Line::Break => {
                if in_literal {
                    page.push_str(".fi\n");
                    in_literal = false;
                }
                para_open = false;
                in_item = false;
            }
            Line::Table { .. } | Line::Key { .. } => {}
        }
    }
    if in_literal {
        page.push_str(".fi\n");
    }
}

/// The comment block at the top of the file as the DESCRIPTION.
fn flush_description(page: &mut String, pending: &mut Vec<Line<'_>>) {
    let mut in_literal = false;
    for line in pending.drain(..) {
        match line {
            Line::Literal(text) => {
                if !in_literal {
                    page.push_str(".PP\n.nf\n.RS\n");
                    in_literal = true;
                }
                writeln!(page, "{}", escape(text)).unwrap();
            }
            Line::Text(text) => {
                if in_literal {
                    page.push_str(".RE\n.fi\n.PP\n");
                    in_literal = false;
                }
                writeln!(page, "{}", escape(text)).unwrap();
            }
            Line::Blank | Line::Break => {
                if in_literal {
                    page.push_str(".RE\n.fi\n");
                    in_literal = false;
                }
                page.push_str(".PP\n");
            }
            Line::Table { .. } | Line::Key { .. } => {}
        }
    }
    if in_literal {
        page.push_str(".RE\n.fi\n");
    }
}

/// Text lines as one unindented paragraph (list items as bullets).
fn flush_plain(page: &mut String, lines: &mut Vec<Line<'_>>) {
    // After a list item, a plain line starts a new paragraph; an indented one continues it.
    let mut in_item = false;
    for line in lines.drain(..) {
        match line {
            Line::Text(text) if text.starts_with("- ") => {
                page.push_str(".IP \\(bu 2\n");
                writeln!(page, "{}", escape(text.trim_start_matches("- "))).unwrap();
                in_item = true;
            }
            Line::Text(text) => {
                if in_item {
                    page.push_str(".PP\n");
                    in_item = false;
                }
                writeln!(page, "{}", escape(text)).unwrap();
            }
            Line::Literal(text) => {
                writeln!(page, "{}", escape(text)).unwrap();
            }
            Line::Break => {
                page.push_str(".PP\n");
                in_item = false;
            }
            Line::Blank | Line::Table { .. } | Line::Key { .. } => {}
        }
    }
}

/// Compares `generated` with the checked-in page `name`, or rewrites it when blessing.
fn check(name: &str, generated: &str) {
    let path = man_dir().join(name);
    if std::env::var_os(BLESS).is_some() {
        std::fs::create_dir_all(man_dir()).unwrap();
        std::fs::write(&path, generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        let first = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "{} is out of date (first difference at line {}): its source changed (the clap \
             definition in gateway/src/main.rs, or config/sensorgate.toml). Refresh it with\n  \
             {REFRESH}\nand commit the result.",
            path.display(),
            first + 1
        );
    }
}

#[test]
fn sensorgate_8_matches_the_checked_in_page() {
    check("sensorgate.8", &sensorgate_8());
}

#[test]
fn sensorgate_toml_5_matches_the_checked_in_page() {
    let reference = std::fs::read_to_string(reference_config()).unwrap();
    check("sensorgate.toml.5", &sensorgate_toml_5(&reference));
}

#[test]
fn every_key_of_the_reference_config_is_on_the_page() {
    let reference = std::fs::read_to_string(reference_config()).unwrap();
    let page = sensorgate_toml_5(&reference);
    let mut keys = 0;
    for line in reference.lines() {
        match classify(line) {
            Line::Key { key, .. } => {
                keys += 1;
                assert!(
                    page.contains(&format!("\\fB{}\\fR = ", escape(key))),
                    "{key} is missing"
                );
            }
            Line::Table { name, .. } => {
                assert!(page.contains(&format!(".SS \"{}", escape(name))), "{name}");
            }
            // Anything else at the top level would be shown as a literal line; the reference
            // config has none.
            Line::Literal(text) => assert!(line.starts_with('#'), "unexpected line {text:?}"),
            _ => {}
        }
    }
    assert!(keys > 100, "only {keys} keys found");
}

#[test]
fn every_command_and_option_is_on_the_page() {
    let page = sensorgate_8();
    let cmd = Cli::command();
    for sub in cmd.get_subcommands() {
        let name = format!(".SS \"sensorgate {}\"", escape(sub.get_name()));
        assert!(page.contains(&name), "{name}");
        for arg in sub.get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(page.contains(&escape(&format!("--{long}"))), "--{long}");
            }
        }
    }
    assert!(page.contains("78  configuration error"));
}

#[test]
fn config_lines_are_classified() {
    assert_eq!(
        classify("state_dir = \"/var/lib/sensorgate\""),
        Line::Key {
            key: "state_dir",
            value: "\"/var/lib/sensorgate\"",
            example: false
        }
    );
    assert_eq!(
        classify("# username = \"gateway\""),
        Line::Key {
            key: "username",
            value: "\"gateway\"",
            example: true
        }
    );
    assert_eq!(
        classify("# [[serial]]"),
        Line::Table {
            name: "[[serial]]",
            example: true
        }
    );
    assert_eq!(classify("# # The device."), Line::Text("The device."));
    assert_eq!(
        classify("# Log filter: error"),
        Line::Text("Log filter: error")
    );
    assert_eq!(
        classify("#   sensorgate check-config -c x"),
        Line::Literal("sensorgate check-config -c x")
    );
    assert_eq!(classify("#"), Line::Break);
    assert_eq!(classify("# #"), Line::Break);
    assert_eq!(classify(""), Line::Blank);
    assert_eq!(escape(".x -y \\"), "\\&.x \\-y \\e");
}
