//! The standard Prometheus process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, ...), read from `/proc/self` on every scrape.
//!
//! prometheus-client has no process collector of its own, and the published ones are built
//! for other registries, so this is a small [`Collector`] with the names and meanings of the
//! Go client's. On other systems it reports nothing.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// A registry holding only the process collector, for the metrics endpoint.
pub fn process_registry() -> Registry {
    let mut registry = Registry::with_prefix("process");
    registry.register_collector(Box::new(ProcessCollector));
    registry
}

/// One reading of the process' resources. A field is `None` when it could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// Soft limit; `None` also when unlimited.
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
    pub threads: Option<u64>,
}

#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stats = ProcessStats::read();
        if let Some(v) = stats.cpu_seconds {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(
                "cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?)?;
        }
        let gauges: [(&str, &str, Option<u64>); 5] = [
            (
                "resident_memory_bytes",
                "Resident memory size in bytes",
                stats.resident_memory_bytes,
            ),
            (
                "virtual_memory_bytes",
                "Virtual memory size in bytes",
                stats.virtual_memory_bytes,
            ),
            ("open_fds", "Number of open file descriptors", stats.open_fds),
            (
                "max_fds",
                "Maximum number of open file descriptors",
                stats.max_fds,
            ),
            ("threads", "Number of OS threads in the process", stats.threads),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        if let Some(v) = stats.start_time_seconds {
            let g = ConstGauge::new(v);
            g.encode(encoder.encode_descriptor(
                "start_time_seconds",
                "Start time of the process since the Unix epoch in seconds",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

impl ProcessStats {
    /// Reads the current process' figures (Linux); elsewhere everything is `None`.
    #[cfg(target_os = "linux")]
    pub fn read() -> ProcessStats {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let ticks = rustix::param::clock_ticks_per_second();
        let page = rustix::param::page_size() as u64;
        let mut stats = read("/proc/self/stat")
            .and_then(|s| {
                let boot_time = read("/proc/stat").and_then(|s| parse_boot_time(&s));
                parse_stat(&s, ticks, page, boot_time)
            })
            .unwrap_or_default();
        stats.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.filter(|e| e.is_ok()).count() as u64);
        stats.max_fds = read("/proc/self/limits").and_then(|s| parse_max_open_files(&s));
        stats
    }

    #[cfg(not(target_os = "linux"))]
    pub fn read() -> ProcessStats {
        ProcessStats::default()
    }
}

/// Parses `/proc/[pid]/stat` (proc(5)): utime (14), stime (15), num_threads (20),
/// starttime (22), vsize (23), rss (24). The command name (2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(
    stat: &str,
    ticks_per_second: u64,
    page_size: u64,
    boot_time: Option<u64>,
) -> Option<ProcessStats> {
    let after = &stat[stat.rfind(')')? + 1..];
    // `after` starts with field 3 (state).
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
    let ticks = ticks_per_second.max(1) as f64;
    let cpu_seconds = match (field(14), field(15)) {
        (Some(u), Some(s)) => Some((u + s) as f64 / ticks),
        _ => None,
    };
    let start_time_seconds = match (boot_time, field(22)) {
        (Some(boot), Some(start)) => Some(boot as f64 + start as f64 / ticks),
        _ => None,
    };
    Some(ProcessStats {
        cpu_seconds,
        resident_memory_bytes: field(24).map(|pages| pages.saturating_mul(page_size)),
        virtual_memory_bytes: field(23),
        open_fds: None,
        max_fds: None,
        start_time_seconds,
        threads: field(20),
    })
}

/// The `btime` line of `/proc/stat`: boot time in seconds since the epoch.
fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of the "Max open files" row of `/proc/[pid]/limits`.
fn parse_max_open_files(limits: &str) -> Option<u64> {
    let row = limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?;
    row.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    // A real line, with a command name that contains a space and a parenthesis.
    const STAT: &str = "4242 (oxs (erve) x) S 1 4242 4242 0 -1 4194560 2365 0 0 0 \
        150 50 0 0 20 0 7 0 360000 123456789 2048 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0";

    #[test]
    fn parses_proc_stat() {
        let s = parse_stat(STAT, 100, 4096, Some(1_700_000_000)).expect("parses");
        assert_eq!(s.cpu_seconds, Some(2.0));
        assert_eq!(s.threads, Some(7));
        assert_eq!(s.virtual_memory_bytes, Some(123_456_789));
        assert_eq!(s.resident_memory_bytes, Some(2048 * 4096));
        assert_eq!(s.start_time_seconds, Some(1_700_003_600.0));
        assert_eq!(
            parse_stat(STAT, 100, 4096, None).and_then(|s| s.start_time_seconds),
            None
        );
        assert_eq!(parse_stat("garbage", 100, 4096, None), None);
        let short = parse_stat("1 (x) S 1 2", 100, 4096, None).expect("parses");
        assert_eq!((short.cpu_seconds, short.threads), (None, None));
    }

    #[test]
    fn parses_boot_time_and_limits() {
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(parse_boot_time("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max cpu time              unlimited            unlimited            seconds\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        assert_eq!(
            parse_max_open_files(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let s = ProcessStats::read();
        assert!(s.cpu_seconds.is_some_and(|v| v >= 0.0), "{s:?}");
        assert!(s.resident_memory_bytes.is_some_and(|v| v > 0), "{s:?}");
        assert!(s.open_fds.is_some_and(|v| v >= 3), "{s:?}");
        assert!(s.threads.is_some_and(|v| v >= 1), "{s:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        // Started in the past, and not before the test binary could have been built.
        assert!(
            s.start_time_seconds
                .is_some_and(|t| t <= now + 1.0 && t > now - 86_400.0),
            "{s:?}"
        );
    }

    #[test]
    fn encodes_standard_names() {
        let registry = process_registry();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        if cfg!(target_os = "linux") {
            for name in [
                "# TYPE process_cpu_seconds counter",
                "process_cpu_seconds_total ",
                "process_resident_memory_bytes ",
                "process_virtual_memory_bytes ",
                "process_open_fds ",
                "process_start_time_seconds ",
                "process_threads ",
            ] {
                assert!(text.contains(name), "{name} missing from\n{text}");
            }
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
