//! The result table (plain text on stdout, Markdown in a file).

use std::fmt::Write as _;

/// One measured path.
#[derive(Debug, Clone, Default)]
pub struct Row {
    pub path: String,
    pub rows: Option<u64>,
    pub secs: Option<f64>,
    /// (ratio, what it is relative to)
    pub ratios: Vec<(f64, String)>,
    pub rss_mib: Option<f64>,
    /// Daemon CPU (user + system) per record, µs.
    pub cpu_us: Option<f64>,
    /// State dir bytes per tracked record.
    pub state_bpr: Option<f64>,
    pub notes: String,
}

impl Row {
    pub fn new(path: &str) -> Row {
        Row {
            path: path.to_owned(),
            ..Row::default()
        }
    }

    pub fn measured(path: &str, rows: u64, secs: f64) -> Row {
        Row {
            path: path.to_owned(),
            rows: Some(rows),
            secs: Some(secs),
            ..Row::default()
        }
    }

    pub fn failed(path: &str, why: impl std::fmt::Display) -> Row {
        Row {
            path: path.to_owned(),
            notes: format!("FAILED: {why}"),
            ..Row::default()
        }
    }

    pub fn rate(&self) -> Option<f64> {
        match (self.rows, self.secs) {
            (Some(r), Some(s)) if s > 0.0 => Some(r as f64 / s),
            _ => None,
        }
    }

    pub fn note(mut self, n: impl AsRef<str>) -> Row {
        self.add_note(n);
        self
    }

    pub fn add_note(&mut self, n: impl AsRef<str>) {
        if !self.notes.is_empty() {
            self.notes.push_str("; ");
        }
        self.notes.push_str(n.as_ref());
    }
}

/// A target and whether it was met.
#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub measured: String,
    /// None: could not be evaluated.
    pub met: Option<bool>,
}

pub struct Report {
    pub title: String,
    pub rows: Vec<Row>,
    /// Free-form lines printed after the table (latency, idle CPU…).
    pub extra: Vec<String>,
    pub targets: Vec<Target>,
}

fn fmt_int(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

const COLS: usize = 9;

impl Report {
    fn cells(r: &Row) -> [String; COLS] {
        let opt = |v: Option<f64>, digits: usize| {
            v.map(|x| format!("{x:.digits$}"))
                .unwrap_or_else(|| "-".into())
        };
        [
            r.path.clone(),
            r.rows.map(fmt_int).unwrap_or_else(|| "-".into()),
            opt(r.secs, 2),
            r.rate()
                .map(|x| fmt_int(x.round() as u64))
                .unwrap_or_else(|| "-".into()),
            if r.ratios.is_empty() {
                "-".into()
            } else {
                r.ratios
                    .iter()
                    .map(|(x, what)| format!("{x:.2}× {what}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            opt(r.cpu_us, 2),
            opt(r.rss_mib, 1),
            opt(r.state_bpr, 1),
            r.notes.clone(),
        ]
    }

    const HEAD: [&'static str; COLS] = [
        "path",
        "rows",
        "seconds",
        "rows/s",
        "ratio vs reference",
        "daemon CPU µs/record",
        "peak RSS MiB",
        "state B/record",
        "notes",
    ];

    /// Right-aligned (numeric) columns.
    fn right(i: usize) -> bool {
        matches!(i, 1..=3 | 5..=7)
    }

    pub fn text(&self) -> String {
        let cells: Vec<[String; COLS]> = self.rows.iter().map(Self::cells).collect();
        let mut w = [0usize; COLS];
        for (i, h) in Self::HEAD.iter().enumerate() {
            w[i] = h.chars().count();
        }
        for c in &cells {
            for i in 0..COLS - 1 {
                w[i] = w[i].max(c[i].chars().count());
            }
        }
        let mut out = String::new();
        let _ = writeln!(out, "\n== {} ==\n", self.title);
        let line = |out: &mut String, c: &[String]| {
            for i in 0..COLS {
                let pad = w[i].saturating_sub(c[i].chars().count());
                if Self::right(i) {
                    let _ = write!(out, "{}{}", " ".repeat(pad), c[i]);
                } else if i == COLS - 1 {
                    let _ = write!(out, "{}", c[i]);
                } else {
                    let _ = write!(out, "{}{}", c[i], " ".repeat(pad));
                }
                if i < COLS - 1 {
                    out.push_str(" | ");
                }
            }
            out.push('\n');
        };
        let head: Vec<String> = Self::HEAD.iter().map(|s| s.to_string()).collect();
        line(&mut out, &head);
        let _ = writeln!(
            out,
            "{}",
            w.iter()
                .take(COLS - 1)
                .map(|n| "-".repeat(*n))
                .collect::<Vec<_>>()
                .join("-+-")
                + "-+-------"
        );
        for c in &cells {
            line(&mut out, c);
        }
        out.push('\n');
        for e in &self.extra {
            let _ = writeln!(out, "{e}");
        }
        out.push('\n');
        let _ = writeln!(out, "Targets:");
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "MET",
                Some(false) => "NOT MET",
                None => "n/a",
            };
            let _ = writeln!(out, "  [{verdict:>7}] {} — {}", t.what, t.measured);
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# {}\n", self.title);
        let _ = writeln!(out, "| {} |", Self::HEAD.join(" | "));
        let align: Vec<&str> = (0..COLS)
            .map(|i| if Self::right(i) { "---:" } else { "---" })
            .collect();
        let _ = writeln!(out, "|{}|", align.join("|"));
        for r in &self.rows {
            let c = Self::cells(r);
            let c: Vec<String> = c.iter().map(|s| s.replace('|', "\\|")).collect();
            let _ = writeln!(out, "| {} |", c.join(" | "));
        }
        out.push('\n');
        for e in &self.extra {
            let _ = writeln!(out, "- {e}");
        }
        let _ = writeln!(out, "\n## Targets\n");
        let _ = writeln!(out, "| target | measured | verdict |\n|---|---|---|");
        for t in &self.targets {
            let verdict = match t.met {
                Some(true) => "MET",
                Some(false) => "**NOT MET**",
                None => "n/a",
            };
            let _ = writeln!(out, "| {} | {} | {verdict} |", t.what, t.measured);
        }
        out
    }
}

/// The median of some measurements (they are sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
