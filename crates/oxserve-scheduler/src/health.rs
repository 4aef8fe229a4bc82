//! Counting instance failures against the [`RestartPolicy`], free of threads and clocks so it can
//! be tested with made-up instants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::types::RestartPolicy;

/// What to do after an instance failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Re-create the instance after this wait.
    Restart { after: Duration },
    /// Too many failures within the window: the version stops serving.
    GiveUp { failures: usize },
}

/// The failures of one version's instances within the policy's window.
#[derive(Debug)]
pub(crate) struct FailureWindow {
    policy: RestartPolicy,
    failures: VecDeque<Instant>,
}

impl FailureWindow {
    pub fn new(policy: RestartPolicy) -> Self {
        FailureWindow {
            policy,
            failures: VecDeque::new(),
        }
    }

    /// Records a failure at `now` and says what follows.
    pub fn record(&mut self, now: Instant) -> Verdict {
        while let Some(&first) = self.failures.front() {
            if now.saturating_duration_since(first) >= self.policy.window {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        self.failures.push_back(now);
        let failures = self.failures.len();
        if failures >= self.policy.max_failures.max(1) {
            return Verdict::GiveUp { failures };
        }
        // 1st failure: backoff, 2nd: twice that, ... capped.
        let doublings = u32::try_from(failures - 1).unwrap_or(u32::MAX).min(16);
        let after = self
            .policy
            .backoff
            .checked_mul(1 << doublings)
            .unwrap_or(self.policy.max_backoff)
            .min(self.policy.max_backoff);
        Verdict::Restart { after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_failures: usize, window_s: u64) -> RestartPolicy {
        RestartPolicy {
            max_failures,
            window: Duration::from_secs(window_s),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(150),
        }
    }

    #[test]
    fn gives_up_at_the_limit_within_the_window() {
        let t = Instant::now();
        let mut w = FailureWindow::new(policy(3, 60));
        assert_eq!(
            w.record(t),
            Verdict::Restart {
                after: Duration::from_millis(50)
            }
        );
        assert_eq!(
            w.record(t + Duration::from_secs(1)),
            Verdict::Restart {
                after: Duration::from_millis(100)
            }
        );
        assert_eq!(
            w.record(t + Duration::from_secs(2)),
            Verdict::GiveUp { failures: 3 }
        );
    }

    #[test]
    fn failures_older_than_the_window_are_forgotten() {
        let t = Instant::now();
        let mut w = FailureWindow::new(policy(3, 60));
        w.record(t);
        w.record(t + Duration::from_secs(30));
        // The first failure is 60 s old now: two in the window, not three.
        assert!(matches!(
            w.record(t + Duration::from_secs(60)),
            Verdict::Restart { .. }
        ));
        assert_eq!(
            w.record(t + Duration::from_secs(61)),
            Verdict::GiveUp { failures: 3 }
        );
    }

    #[test]
    fn backoff_is_capped_and_one_failure_may_be_the_limit() {
        let t = Instant::now();
        let mut w = FailureWindow::new(policy(10, 60));
        let waits: Vec<Verdict> = (0..4).map(|_| w.record(t)).collect();
        assert_eq!(
            waits[3],
            Verdict::Restart {
                after: Duration::from_millis(150)
            }
        );
        let mut strict = FailureWindow::new(policy(1, 60));
        assert_eq!(strict.record(t), Verdict::GiveUp { failures: 1 });
        let mut zero = FailureWindow::new(policy(0, 60));
        assert_eq!(zero.record(t), Verdict::GiveUp { failures: 1 });
    }
}
