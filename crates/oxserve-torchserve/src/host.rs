//! TorchServe's host gauges on its metrics API (`CPUUtilization`, `MemoryUsed`,
//! `MemoryAvailable`, `MemoryUtilization`, `DiskUsage`, `DiskUtilization`, `DiskAvailable`, with
//! `{Level="Host",Hostname=...}`), computed as TorchServe's psutil calls compute them: CPU busy
//! share since the previous scrape (since boot at the first), memory from `/proc/meminfo`
//! (used = total - free - buffers - cached), the root filesystem from statvfs.

use std::fmt::Write as _;

use parking_lot::Mutex;

/// The previous `/proc/stat` CPU totals, (busy, all) jiffies, and the share computed then.
static LAST_CPU: Mutex<Option<(u64, u64, f64)>> = Mutex::new(None);

fn cpu_percent() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let all: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    let busy = all.saturating_sub(idle);
    let mut last = LAST_CPU.lock();
    let (prev_busy, prev_all, prev_share) = last.unwrap_or((0, 0, 0.0));
    let total = all.saturating_sub(prev_all);
    if total == 0 {
        // Two scrapes within one clock tick: nothing new to measure, so the gauge keeps the
        // share it last showed (it never drops out of the page).
        return Some(prev_share);
    }
    let share = busy.saturating_sub(prev_busy) as f64 * 100.0 / total as f64;
    *last = Some((busy, all, share));
    Some(share)
}

/// `/proc/meminfo` in kB by key.
fn meminfo() -> Option<std::collections::HashMap<String, u64>> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.to_string(), v.split_whitespace().next()?.parse().ok()?))
            })
            .collect(),
    )
}

/// The gauges as Prometheus text, TorchServe's families and labels.
pub fn gauges_text(hostname: &str) -> String {
    let mut rows: Vec<(&str, &str, f64)> = Vec::new();
    if let Some(cpu) = cpu_percent() {
        rows.push(("CPUUtilization", "Percent", cpu));
    }
    if let Some(m) = meminfo() {
        let kb = |k: &str| m.get(k).copied().unwrap_or(0) as f64;
        let total = kb("MemTotal");
        let available = kb("MemAvailable");
        let used = total - kb("MemFree") - kb("Buffers") - kb("Cached") - kb("SReclaimable");
        rows.push(("MemoryUsed", "Megabytes", used.max(0.0) / 1024.0));
        rows.push(("MemoryAvailable", "Megabytes", available / 1024.0));
        if total > 0.0 {
            rows.push((
                "MemoryUtilization",
                "Percent",
                (total - available) * 100.0 / total,
            ));
        }
    }
    if let Ok(fs) = rustix::fs::statvfs("/") {
        let gb = 1024.0 * 1024.0 * 1024.0;
        let block = fs.f_frsize as f64;
        let total = fs.f_blocks as f64 * block;
        let free = fs.f_bfree as f64 * block;
        let available = fs.f_bavail as f64 * block;
        let used = total - free;
        rows.push(("DiskUsage", "Gigabytes", used / gb));
        rows.push(("DiskAvailable", "Gigabytes", available / gb));
        // psutil's percent: used over what non-root users can have.
        if used + available > 0.0 {
            rows.push(("DiskUtilization", "Percent", used * 100.0 / (used + available)));
        }
    }
    let host = serde_json::Value::String(hostname.to_string());
    let mut out = String::new();
    for (family, unit, value) in rows {
        let _ = write!(
            out,
            "# HELP {family} Torchserve prometheus gauge metric with unit: {unit}\n# TYPE {family} gauge\n\
             {family}{{Level=\"Host\",Hostname={host},}} {value:?}\n"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_gauge_stays_in_back_to_back_scrapes() {
        // Scrapes closer than a clock tick apart saw no elapsed jiffies and used to drop the
        // family from the page.
        for _ in 0..200 {
            assert!(super::gauges_text("h").contains("# TYPE CPUUtilization gauge\n"));
        }
    }

    #[test]
    fn host_gauges_have_torchserves_families() {
        let text = super::gauges_text("h");
        for family in [
            "CPUUtilization",
            "MemoryUsed",
            "MemoryAvailable",
            "MemoryUtilization",
            "DiskUsage",
            "DiskAvailable",
            "DiskUtilization",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} gauge\n")),
                "{family}: {text}"
            );
            assert!(
                text.contains(&format!("{family}{{Level=\"Host\",Hostname=\"h\",}} ")),
                "{text}"
            );
        }
    }
}
