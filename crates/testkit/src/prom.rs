//! Scraping `/metrics` in tests: a plain HTTP/1.1 GET over loopback and a parser for the Prometheus /
//! OpenMetrics text format, so tests assert on figures the way a Prometheus server would read them.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample: a series name, its labels, and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Series name (with its `_total`, `_bucket`… suffix).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed scrape.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: family name → type.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// The value of the series `name` whose labels include all of `labels` (summed when several
    /// series match); None when none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
            .map(|s| s.value)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Like [`get`](Self::get), 0 when no series matches (counters not yet touched).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Whether a family (by its base name, as in `# TYPE`) is exposed.
    pub fn has_family(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }
}

/// Why a scrape failed.
pub type Error = String;

/// Parses the text format.
///
/// # Errors
/// On a line that is not a comment and not `name{labels} value`.
pub fn parse(text: &str) -> Result<Scrape, Error> {
    let mut out = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(n), Some(t)) = (parts.next(), parts.next()) {
                out.types.insert(n.to_string(), t.to_string());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match labels_end(line) {
            Some(close) => (&line[..=close], line[close + 1..].trim()),
            None => line.split_once(' ').ok_or_else(|| format!("no value: {line}"))?,
        };
        // A value may be followed by a timestamp or exemplar; the first token is the value.
        let value = value.split_whitespace().next().ok_or_else(|| format!("no value: {line}"))?;
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|e| format!("bad value in {line}: {e}"))?,
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, rest)) => (n.to_string(), parse_labels(rest.strip_suffix('}').unwrap_or(rest))?),
        };
        out.samples.push(Sample { name, labels, value });
    }
    Ok(out)
}

/// Where the label set of a sample line ends: the first `}` outside a quoted label value (values
/// may hold braces, e.g. `chain="{lic}:audit"`), or None when the series has no labels.
fn labels_end(line: &str) -> Option<usize> {
    let open = line.find(['{', ' '])?;
    if line.as_bytes()[open] != b'{' {
        return None;
    }
    let (mut quoted, mut escaped) = (false, false);
    for (i, c) in line.char_indices().skip(open + 1) {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"").ok_or_else(|| format!("bad labels: {s}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("bad escape: {s}")),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated label value: {s}"))?;
        out.insert(k.trim_start_matches(',').trim().to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Ok(out)
}

/// GETs `url` (`http://host:port/path`) and parses the body.
///
/// # Errors
/// When the request fails, the status isn't 200 or the body doesn't parse.
pub async fn scrape(url: &str) -> Result<Scrape, Error> {
    let rest = url.strip_prefix("http://").ok_or_else(|| format!("not an http url: {url}"))?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut conn = tokio::net::TcpStream::connect(host).await.map_err(|e| format!("connect {host}: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8(raw).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no header/body split")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("status: {}", head.lines().next().unwrap_or_default()));
    }
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)?
    } else {
        body.to_string()
    };
    parse(&body)
}

fn dechunk(mut s: &str) -> Result<String, Error> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").ok_or("bad chunk")?;
        let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..n).ok_or("short chunk")?);
        s = rest.get(n + 2..).ok_or("short chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_values_and_types() {
        let text = "# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\nb 2.5\nc_bucket{le=\"+Inf\"} 7\n# EOF\n";
        let s = parse(text).expect("parses");
        assert_eq!(s.get("a_total", &[("x", "1")]), Some(3.0));
        assert_eq!(s.get("a_total", &[("y", "q\"uote")]), Some(3.0));
        assert_eq!(s.get("b", &[]), Some(2.5));
        assert_eq!(s.get("c_bucket", &[("le", "+Inf")]), Some(7.0));
        assert_eq!(s.get("a_total", &[("x", "2")]), None);
        assert!(s.has_family("a"));
        assert!(parse("garbage{").is_err());
        // Braces inside a label value (audit chain names are Redis keys with a hash tag).
        let s = parse("g{chain=\"{lic}:audit\",z=\"a}\"} 4\nh{a=\"1\"} 5 # {trace_id=\"x\"} 1\n").expect("parses");
        assert_eq!(s.get("g", &[("chain", "{lic}:audit"), ("z", "a}")]), Some(4.0));
        assert_eq!(s.get("h", &[("a", "1")]), Some(5.0), "an exemplar after the value is not the label set");
    }
}
