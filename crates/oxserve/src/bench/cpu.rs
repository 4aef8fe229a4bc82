//! The load generator's own CPU time, so that a point can report the client's CPU per request
//! (the client shares the machine with the server it measures).

use std::time::Duration;

/// Clock ticks per second of `/proc/self/stat` (USER_HZ, fixed at 100 in the Linux ABI).
const USER_HZ: u64 = 100;

/// User + system CPU time of this process, all threads together; `None` where
/// `/proc/self/stat` is not readable (not Linux).
pub(super) fn process_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_stat(&stat)
}

/// utime and stime are fields 14 and 15 of `/proc/PID/stat`; the command name (field 2) is in
/// parentheses and may hold spaces, so fields are counted after its closing parenthesis.
fn parse_stat(stat: &str) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime.checked_add(stime)?;
    Some(Duration::from_millis(ticks.checked_mul(1000 / USER_HZ)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_utime_and_stime_after_the_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 3 0 1";
        assert_eq!(parse_stat(stat), Some(Duration::from_millis(2810)));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert!(process_cpu_time().is_some());
    }
}
