//! The standard `process_*` metrics every Go program (etcd included)
//! exports, which dashboards expect beside etcd's: CPU time, memory, file
//! descriptors and start time, read from `/proc/self` at scrape time.
//! Off Linux there is no `/proc`, and the metrics are simply absent.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// `/proc/<pid>/stat` counts CPU time in USER_HZ, which Linux fixes at 100
/// for user space whatever the kernel's own tick.
const USER_HZ: f64 = 100.0;

#[derive(Debug)]
pub struct ProcessCollector;

/// One reading of the process's figures.
#[derive(Debug, Default, PartialEq)]
struct Sample {
    cpu_seconds: f64,
    virtual_bytes: f64,
    resident_bytes: f64,
    start_time_seconds: f64,
    open_fds: f64,
    max_fds: f64,
}

impl Sample {
    fn read() -> Option<Sample> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let boot = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count();
        let mut sample = Sample::parse(&stat, &status, &boot, &limits)?;
        sample.open_fds = open_fds as f64;
        Some(sample)
    }

    /// The figures in the text of `/proc/self/stat`, `/proc/self/status`,
    /// `/proc/stat` and `/proc/self/limits`.
    fn parse(stat: &str, status: &str, boot: &str, limits: &str) -> Option<Sample> {
        // The command name may hold spaces and parentheses: fields start
        // after the last ')', with field 3 (state) first.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let ticks = number(11)? + number(12)?;
        let started_ticks = number(19)?;
        let virtual_bytes = number(20)?;
        let resident_kib = status.lines().find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        })?;
        let boot_time = boot
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())?;
        let max_fds = limits
            .lines()
            .find_map(|l| {
                l.strip_prefix("Max open files")?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        Some(Sample {
            cpu_seconds: ticks / USER_HZ,
            virtual_bytes,
            resident_bytes: resident_kib * 1024.0,
            start_time_seconds: boot_time + started_ticks / USER_HZ,
            open_fds: 0.0,
            max_fds,
        })
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = Sample::read() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(s.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                s.resident_bytes,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                s.virtual_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                s.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                s.open_fds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                s.max_fds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_field_by_field() {
        let stat = "4242 (tern (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 \
                    9 0 12345 987654321 2500 18446744073709551615";
        let status = "Name:\ttern\nVmRSS:\t   10000 kB\nThreads:\t9\n";
        let boot = "cpu  1 2 3\nbtime 1700000000\nprocesses 10\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            65536                524288               files\n";
        let s = Sample::parse(stat, status, boot, limits).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.virtual_bytes, 987654321.0);
        assert_eq!(s.resident_bytes, 10000.0 * 1024.0);
        assert_eq!(s.start_time_seconds, 1700000000.0 + 123.45);
        assert_eq!(s.max_fds, 65536.0);
    }

    #[test]
    fn this_process_has_figures() {
        let s = Sample::read().expect("/proc on Linux");
        assert!(s.resident_bytes > 0.0 && s.open_fds > 0.0 && s.max_fds > 0.0);
    }
}
