//! Output for people and scripts. The CLI is the one place that writes to stdout directly: its output
//! is the product. Everything the commands show goes through here: plain lines, aligned tables,
//! label/value blocks, JSON documents and JSON lines, messages on stderr, and progress bars (drawn on
//! stderr, and only when stderr is a terminal).
#![allow(clippy::print_stdout)]

use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// Writes a line to stdout (ignoring a closed pipe, as `chipgate … | head` would cause).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

/// Writes a line to stderr (diagnostics, hints and errors: never part of a command's output).
pub fn note(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Writes one JSON document to stdout, pretty-printed.
pub fn json(doc: &Value) {
    let text = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "null".to_string());
    say(&text);
}

/// Writes one JSON document on one line (JSON lines, for watch and follow commands).
pub fn json_line(doc: &Value) {
    let text = serde_json::to_string(doc).unwrap_or_else(|_| "null".to_string());
    say(&text);
    let _ = std::io::stdout().lock().flush();
}

/// Writes one JSON document to stderr (errors in `--output json` mode).
pub fn json_err(doc: &Value) {
    let text = serde_json::to_string_pretty(doc).unwrap_or_else(|_| "null".to_string());
    note(&text);
}

/// How a table column is aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Figures.
    Right,
}

/// An aligned text table: a header row, rows of cells, two spaces between columns, figures right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers; a header starting with '>' is right-aligned (the '>' is dropped).
    pub fn new(headers: &[&str]) -> Self {
        let columns = headers
            .iter()
            .map(|h| match h.strip_prefix('>') {
                Some(rest) => (rest.to_string(), Align::Right),
                None => ((*h).to_string(), Align::Left),
            })
            .collect();
        Table { columns, rows: Vec::new() }
    }

    /// Adds a row (missing cells are blank, extra cells are dropped).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as lines of text.
    pub fn render(&self) -> Vec<String> {
        let n = self.columns.len();
        let mut widths: Vec<usize> = self.columns.iter().map(|(h, _)| width(h)).collect();
        for r in &self.rows {
            for (i, c) in r.iter().take(n).enumerate() {
                widths[i] = widths[i].max(width(c));
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let mut s = String::new();
            for (i, (_, align)) in self.columns.iter().enumerate() {
                let cell = cells.get(i).copied().unwrap_or("");
                let pad = widths[i].saturating_sub(width(cell));
                let last = i + 1 == n;
                if i > 0 {
                    s.push_str("  ");
                }
                match align {
                    Align::Right => {
                        s.push_str(&" ".repeat(pad));
                        s.push_str(cell);
                    }
                    Align::Left => {
                        s.push_str(cell);
                        if !last {
                            s.push_str(&" ".repeat(pad));
                        }
                    }
                }
            }
            s.trim_end().to_string()
        };
        let mut out = vec![line(self.columns.iter().map(|(h, _)| h.as_str()).collect())];
        for r in &self.rows {
            out.push(line(r.iter().map(String::as_str).collect()));
        }
        out
    }

    /// Prints the table to stdout (or `empty` when it has no rows).
    pub fn print_or(&self, empty: &str) {
        if self.rows.is_empty() {
            say(empty);
        } else {
            for l in self.render() {
                say(&l);
            }
        }
    }
}

fn width(s: &str) -> usize {
    s.chars().count()
}

/// Prints label/value pairs with the values aligned.
pub fn fields(pairs: &[(&str, String)]) {
    let w = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    for (k, v) in pairs {
        say(&format!("{k:<w$}  {v}"));
    }
}

/// A number with thousands separators: 2000000 → "2,000,000".
pub fn thousands(v: u64) -> String {
    let digits = v.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A progress bar on stderr with a length, drawn only when stderr is a terminal.
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>12} [{bar:40.cyan/blue}] {human_pos}/{human_len} ({per_sec}, {elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_get_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(2_000_000), "2,000,000");
        assert_eq!(thousands(12_345_678), "12,345,678");
    }

    #[test]
    fn tables_align() {
        let mut t = Table::new(&["NAME", ">UNITS", "NOTE"]);
        t.row(vec!["bytedance".into(), "1,000".into(), "x".into()]);
        t.row(vec!["ali".into(), "5".into()]);
        assert_eq!(t.render(), vec!["NAME       UNITS  NOTE", "bytedance  1,000  x", "ali            5"]);
    }
}
