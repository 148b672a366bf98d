//! The one markdown table the benchmark prints.

use std::fmt::Write as _;

use anyhow::{ensure, Result};

/// What a number measures; decides its formatting and which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Requests, events or keys per second.
    Rate,
    /// Megabytes (10^6 bytes) per second.
    MBps,
    /// A quotient of two sizes, such as a compression ratio; higher is
    /// better.
    Factor,
    Seconds,
    Millis,
    MiB,
    Count,
}

impl Unit {
    fn lower_is_better(self) -> bool {
        !matches!(self, Unit::Rate | Unit::MBps | Unit::Factor)
    }

    /// A NaN value is one the system has no such number for: "-".
    fn format(self, value: f64) -> String {
        if value.is_nan() {
            return "-".to_string();
        }
        match self {
            Unit::Rate | Unit::Count => format!("{value:.0}"),
            Unit::MBps | Unit::MiB => format!("{value:.1}"),
            Unit::Factor | Unit::Seconds => format!("{value:.2}"),
            // Sub-millisecond latencies need the extra digits to compare.
            Unit::Millis => format!("{value:.3}"),
        }
    }
}

/// One row's value for one system.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Row label including the unit, e.g. "put 16 clients (req/s)".
    pub name: String,
    pub unit: Unit,
    pub value: f64,
}

impl Metric {
    pub fn new(name: impl Into<String>, unit: Unit, value: f64) -> Metric {
        Metric {
            name: name.into(),
            unit,
            value,
        }
    }

    /// A row the system has no number for (printed "-"), so that both
    /// systems' lists still line up.
    pub fn none(name: impl Into<String>, unit: Unit) -> Metric {
        Metric::new(name, unit, f64::NAN)
    }
}

/// Context printed above the table, so a pasted result says where it came from.
pub struct Header {
    pub date: String,
    pub cores: usize,
    pub etcd_version: String,
    pub tern_version: String,
    /// The flags that shaped the load, in words.
    pub load: String,
}

/// Renders the table. Both systems ran the same workloads in the same order,
/// so their metric lists must line up row by row.
pub fn render(header: &Header, etcd: &[Metric], tern: &[Metric]) -> Result<String> {
    ensure!(
        etcd.len() == tern.len(),
        "etcd produced {} metrics but tern {}",
        etcd.len(),
        tern.len()
    );
    let mut out = String::new();
    // Writing to a String cannot fail, hence the ignored results.
    let _ = writeln!(out, "Tern vs etcd, {} cores, {}", header.cores, header.date);
    let _ = writeln!(
        out,
        "etcd: {}; tern: {}",
        header.etcd_version, header.tern_version
    );
    let _ = writeln!(out, "Load: {}", header.load);
    let _ = writeln!(out);
    let _ = writeln!(out, "| metric | etcd | tern | ratio (tern/etcd) |");
    let _ = writeln!(out, "|---|---:|---:|---:|");
    for (e, t) in etcd.iter().zip(tern) {
        ensure!(
            e.name == t.name && e.unit == t.unit,
            "row mismatch: etcd has {:?}, tern has {:?}",
            e.name,
            t.name
        );
        let marker = if e.unit.lower_is_better() { " *" } else { "" };
        let _ = writeln!(
            out,
            "| {}{} | {} | {} | {} |",
            e.name,
            marker,
            e.unit.format(e.value),
            t.unit.format(t.value),
            ratio(t.value, e.value)
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Ratio is tern/etcd in every row. Unmarked rows are throughput: higher is better, \
         so a ratio above 1 favours tern. * Lower is better (latency, time, size, RSS, \
         errors): a ratio below 1 favours tern. \"-\": the system has no such number."
    );
    Ok(out)
}

fn ratio(tern: f64, etcd: f64) -> String {
    if tern.is_nan() || etcd.is_nan() {
        "-".to_string()
    } else if etcd == 0.0 {
        // Only the error rows are normally zero; 0/0 means "both clean".
        if tern == 0.0 { "-" } else { "n/a" }.to_string()
    } else {
        format!("{:.2}", tern / etcd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            date: "2025-01-01T00:00:00Z".into(),
            cores: 2,
            etcd_version: "3.4".into(),
            tern_version: "0.1".into(),
            load: "test".into(),
        }
    }

    #[test]
    fn renders_ratio_and_marks_lower_is_better_rows() {
        let etcd = [
            Metric::new("put (req/s)", Unit::Rate, 1000.0),
            Metric::new("put p99 (ms)", Unit::Millis, 2.0),
            Metric::new("errors", Unit::Count, 0.0),
        ];
        let tern = [
            Metric::new("put (req/s)", Unit::Rate, 1500.0),
            Metric::new("put p99 (ms)", Unit::Millis, 1.0),
            Metric::new("errors", Unit::Count, 0.0),
        ];
        let table = render(&header(), &etcd, &tern).expect("rows line up");
        assert!(
            table.contains("| put (req/s) | 1000 | 1500 | 1.50 |"),
            "{table}"
        );
        assert!(
            table.contains("| put p99 (ms) * | 2.000 | 1.000 | 0.50 |"),
            "{table}"
        );
        assert!(table.contains("| errors * | 0 | 0 | - |"), "{table}");
    }

    #[test]
    fn a_row_one_system_lacks_prints_dashes() {
        let etcd = [
            Metric::new("backup (s)", Unit::Seconds, 2.0),
            Metric::new("throughput (MB/s)", Unit::MBps, 100.0),
            Metric::none("compression ratio", Unit::Factor),
        ];
        let tern = [
            Metric::new("backup (s)", Unit::Seconds, 3.0),
            Metric::new("throughput (MB/s)", Unit::MBps, 50.0),
            Metric::new("compression ratio", Unit::Factor, 4.5),
        ];
        let table = render(&header(), &etcd, &tern).expect("rows line up");
        assert!(
            table.contains("| backup (s) * | 2.00 | 3.00 | 1.50 |"),
            "{table}"
        );
        assert!(
            table.contains("| throughput (MB/s) | 100.0 | 50.0 | 0.50 |"),
            "{table}"
        );
        assert!(
            table.contains("| compression ratio | - | 4.50 | - |"),
            "{table}"
        );
    }

    #[test]
    fn refuses_mismatched_rows() {
        let etcd = [Metric::new("a", Unit::Rate, 1.0)];
        let tern = [Metric::new("b", Unit::Rate, 1.0)];
        assert!(render(&header(), &etcd, &tern).is_err());
    }
}
