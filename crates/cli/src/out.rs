//! Output for people and scripts. The CLI is the one place that writes to stdout directly: its output
//! is the product.

use std::io::Write;

/// Writes a line to stdout (ignoring a closed pipe, as `chipgate … | head` would cause).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}
