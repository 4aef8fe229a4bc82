//! The batching decision, kept free of threads and clocks so it can be tested exhaustively:
//! priority levels with FIFO inside each, queue timeouts (reject or delay), and Triton's
//! dynamic batcher (preferred sizes, maximum queue delay, compatible shapes only).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::types::{DynamicBatching, TimeoutAction};

/// What the batcher needs to know about a waiting request.
#[derive(Debug)]
pub(crate) struct Entry<T> {
    pub item: T,
    /// Rows it contributes to a batch (1 for models without a batch dimension).
    pub rows: usize,
    /// Requests batch together only when their keys (non-batch dims of every input) match.
    pub key: Vec<Vec<i64>>,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub timeout_action: TimeoutAction,
    /// 0-based: 0 is the highest priority.
    pub level: usize,
}

/// The outcome of one look at the queue.
#[derive(Debug)]
pub(crate) enum Decision<T> {
    /// Run these now, in this order.
    Run(Vec<Entry<T>>),
    /// Nothing to run before this instant (unless a request arrives).
    WaitUntil(Instant),
    /// The queue is empty.
    Idle,
}

#[derive(Debug)]
pub(crate) struct BatchQueue<T> {
    /// Per level: requests in arrival order.
    normal: Vec<VecDeque<Entry<T>>>,
    /// Per level: requests whose timeout passed with action DELAY.
    delayed: Vec<VecDeque<Entry<T>>>,
    len: usize,
}

impl<T> BatchQueue<T> {
    pub fn new(levels: usize) -> Self {
        let levels = levels.max(1);
        BatchQueue {
            normal: (0..levels).map(|_| VecDeque::new()).collect(),
            delayed: (0..levels).map(|_| VecDeque::new()).collect(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Requests waiting at a level (0-based).
    pub fn len_at(&self, level: usize) -> usize {
        self.normal.get(level).map_or(0, VecDeque::len) + self.delayed.get(level).map_or(0, VecDeque::len)
    }

    pub fn push(&mut self, entry: Entry<T>) {
        let level = entry.level.min(self.normal.len() - 1);
        self.normal[level].push_back(entry);
        self.len += 1;
    }

    /// Removes requests that should not run: whose client is gone (`gone`), or whose REJECT
    /// timeout passed; DELAY timeouts move behind their level.
    pub fn sweep(&mut self, now: Instant, gone: impl Fn(&T) -> bool) -> Vec<(Entry<T>, Swept)> {
        let mut out = Vec::new();
        for level in 0..self.normal.len() {
            let queue = std::mem::take(&mut self.normal[level]);
            for e in queue {
                if gone(&e.item) {
                    out.push((e, Swept::Gone));
                } else if e.deadline.is_some_and(|d| d <= now) {
                    match e.timeout_action {
                        TimeoutAction::Reject => out.push((e, Swept::TimedOut)),
                        TimeoutAction::Delay => self.delayed[level].push_back(e),
                    }
                } else {
                    self.normal[level].push_back(e);
                }
            }
            let delayed = std::mem::take(&mut self.delayed[level]);
            for e in delayed {
                if gone(&e.item) {
                    out.push((e, Swept::Gone));
                } else {
                    self.delayed[level].push_back(e);
                }
            }
        }
        self.len -= out.len();
        out
    }

    /// Queues in service order: level 1 on time, level 1 delayed, level 2 on time, ...
    fn order(&self) -> impl Iterator<Item = (usize, bool, &Entry<T>)> {
        (0..self.normal.len()).flat_map(move |l| {
            let normal = self.normal[l].iter().map(move |e| (l, false, e));
            let delayed = self.delayed[l].iter().map(move |e| (l, true, e));
            normal.chain(delayed)
        })
    }

    /// Takes the next batch to run, or says how long to wait for a fuller one.
    /// `max_batch_size` 0 or `batching` None: one request at a time.
    pub fn next(
        &mut self,
        now: Instant,
        max_batch_size: usize,
        batching: Option<&DynamicBatching>,
    ) -> Decision<T> {
        let Some((_, _, seed)) = self.order().next() else {
            return Decision::Idle;
        };
        let Some(batching) = batching.filter(|_| max_batch_size > 0) else {
            return Decision::Run(self.take(1));
        };
        // Gather compatible requests in service order until one does not fit.
        let mut counts = Vec::new();
        let mut rows = 0usize;
        let mut blocked = false;
        for (_, _, e) in self.order() {
            if e.key != seed.key || rows + e.rows > max_batch_size {
                blocked = true;
                break;
            }
            rows += e.rows;
            counts.push(rows);
        }
        if rows == 0 {
            // A single request larger than the batch limit cannot happen (validation rejects
            // it); run it alone rather than stall.
            return Decision::Run(self.take(1));
        }
        let oldest = seed.enqueued;
        let full = dispatch_now(rows, max_batch_size, blocked, &batching.preferred_batch_sizes);
        let waited_enough = batching.max_queue_delay.is_zero() || now >= oldest + batching.max_queue_delay;
        if !full && !waited_enough {
            let mut until = oldest + batching.max_queue_delay;
            if let Some(d) = self.order().filter_map(|(_, _, e)| e.deadline).min() {
                until = until.min(d);
            }
            return Decision::WaitUntil(until);
        }
        // Send the largest preferred size that the gathered requests make exactly, else all.
        let take = batching
            .preferred_batch_sizes
            .iter()
            .filter_map(|&p| counts.iter().position(|&c| c == p))
            .max()
            .map_or(counts.len(), |i| i + 1);
        Decision::Run(self.take(take))
    }

    /// Removes the first `n` requests in service order.
    fn take(&mut self, mut n: usize) -> Vec<Entry<T>> {
        let mut out = Vec::with_capacity(n);
        for l in 0..self.normal.len() {
            for q in [0, 1] {
                let queue = if q == 0 {
                    &mut self.normal[l]
                } else {
                    &mut self.delayed[l]
                };
                while n > 0 {
                    let Some(e) = queue.pop_front() else { break };
                    out.push(e);
                    n -= 1;
                }
            }
        }
        self.len -= out.len();
        out
    }

    /// The earliest deadline among waiting requests, so a sleeping instance wakes to expire it.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.normal.iter().flatten().filter_map(|e| e.deadline).min()
    }

    /// Empties the queue (shutdown of a scheduler whose instances are gone).
    pub fn drain(&mut self) -> Vec<Entry<T>> {
        let mut out = Vec::with_capacity(self.len);
        for q in self.normal.iter_mut().chain(self.delayed.iter_mut()) {
            out.extend(q.drain(..));
        }
        self.len = 0;
        out
    }
}

/// Why `sweep` removed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Swept {
    Gone,
    TimedOut,
}

/// Effective queue deadline of a request.
pub(crate) fn deadline(
    now: Instant,
    default_timeout: Option<Duration>,
    allow_override: bool,
    requested: Option<Duration>,
) -> Option<Instant> {
    let timeout = match (default_timeout, requested) {
        (Some(d), Some(r)) if allow_override => Some(d.min(r)),
        (None, Some(r)) if allow_override => Some(r),
        (d, _) => d,
    };
    timeout.map(|t| now + t)
}

/// Triton's dynamic batcher: the pending `rows` go at once when they reach `max_batch_size`,
/// when the next request cannot join them (`blocked`), when they make a preferred batch size,
/// or when waiting cannot make a larger preferred size (they already exceed every preferred
/// size that fits the model); otherwise the batcher may wait up to the queue delay for more.
/// Without preferred sizes, waiting aims at `max_batch_size`.
fn dispatch_now(rows: usize, max_batch_size: usize, blocked: bool, preferred: &[usize]) -> bool {
    if rows >= max_batch_size || blocked {
        return true;
    }
    let usable = || preferred.iter().copied().filter(|&p| p <= max_batch_size);
    if usable().next().is_none() {
        return false;
    }
    usable().any(|p| p == rows) || usable().all(|p| p < rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn entry(id: usize, rows: usize, key: i64, level: usize, at: Instant) -> Entry<usize> {
        Entry {
            item: id,
            rows,
            key: vec![vec![key]],
            enqueued: at,
            deadline: None,
            timeout_action: TimeoutAction::Reject,
            level,
        }
    }

    fn ids(d: Decision<usize>) -> Vec<usize> {
        match d {
            Decision::Run(v) => v.into_iter().map(|e| e.item).collect(),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    fn batching(delay_us: u64, preferred: &[usize]) -> DynamicBatching {
        DynamicBatching {
            preferred_batch_sizes: preferred.to_vec(),
            max_queue_delay: Duration::from_micros(delay_us),
            preserve_ordering: false,
        }
    }

    #[test]
    fn without_delay_everything_waiting_runs_at_once() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1);
        for i in 0..5 {
            q.push(entry(i, 1, 0, 0, t));
        }
        assert_eq!(ids(q.next(t, 4, Some(&batching(0, &[])))), vec![0, 1, 2, 3]);
        assert_eq!(ids(q.next(t, 4, Some(&batching(0, &[])))), vec![4]);
        assert!(matches!(q.next(t, 4, Some(&batching(0, &[]))), Decision::Idle));
    }

    #[test]
    fn delay_waits_for_a_fuller_batch_then_sends() {
        let t = Instant::now();
        let b = batching(1000, &[]);
        let mut q = BatchQueue::new(1);
        q.push(entry(0, 1, 0, 0, t));
        match q.next(t, 4, Some(&b)) {
            Decision::WaitUntil(until) => assert_eq!(until, t + Duration::from_micros(1000)),
            other => panic!("{other:?}"),
        }
        for i in 1..4 {
            q.push(entry(i, 1, 0, 0, t));
        }
        // Full: no need to wait.
        assert_eq!(ids(q.next(t, 4, Some(&b))), vec![0, 1, 2, 3]);
        q.push(entry(4, 1, 0, 0, t));
        assert_eq!(ids(q.next(t + Duration::from_millis(2), 4, Some(&b))), vec![4]);
    }

    #[test]
    fn preferred_sizes_pick_the_largest_exact_prefix() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1);
        for i in 0..7 {
            q.push(entry(i, 1, 0, 0, t));
        }
        let b = batching(0, &[2, 4]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![0, 1, 2, 3]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![4, 5]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![6]);
    }

    #[test]
    fn a_preferred_size_goes_at_once_however_long_the_delay() {
        // Triton: preferred [2, 6], a 10 s queue delay; a lone 2-row request is a preferred
        // size and a lone 7-row one can reach no larger preferred size: both go at once.
        let t = Instant::now();
        let b = batching(10_000_000, &[2, 6]);
        let mut q = BatchQueue::new(1);
        q.push(entry(0, 2, 0, 0, t));
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![0]);
        q.push(entry(1, 7, 0, 0, t));
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![1]);
        // 3 rows can still become 6 by waiting: wait (at most the delay).
        q.push(entry(2, 3, 0, 0, t));
        assert!(matches!(q.next(t, 8, Some(&b)), Decision::WaitUntil(_)));
        // 3 more rows make 6, a preferred size: at once.
        q.push(entry(3, 3, 0, 0, t));
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![2, 3]);
    }

    #[test]
    fn dispatch_rule_matches_tritons() {
        // (rows, max, blocked, preferred) -> at once?
        assert!(dispatch_now(4, 4, false, &[]));
        assert!(!dispatch_now(3, 4, false, &[]));
        assert!(dispatch_now(1, 4, true, &[]));
        assert!(dispatch_now(2, 8, false, &[2, 6]));
        assert!(!dispatch_now(3, 8, false, &[2, 6]));
        assert!(dispatch_now(6, 8, false, &[2, 6]));
        assert!(dispatch_now(7, 8, false, &[2, 6]));
        // A preferred size above max_batch_size does not count.
        assert!(dispatch_now(3, 4, false, &[2, 16]));
        assert!(!dispatch_now(1, 4, false, &[2, 16]));
        assert!(!dispatch_now(1, 4, false, &[16]));
    }

    #[test]
    fn incompatible_shapes_are_not_batched_together() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1);
        q.push(entry(0, 1, 5, 0, t));
        q.push(entry(1, 1, 6, 0, t));
        q.push(entry(2, 1, 5, 0, t));
        let b = batching(0, &[]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![0]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![1]);
        assert_eq!(ids(q.next(t, 8, Some(&b))), vec![2]);
    }

    #[test]
    fn timeouts_reject_or_delay() {
        let t = Instant::now();
        let mut q = BatchQueue::new(1);
        let mut a = entry(0, 1, 0, 0, t);
        a.deadline = Some(t + Duration::from_micros(10));
        let mut d = entry(1, 1, 0, 0, t);
        d.deadline = Some(t + Duration::from_micros(10));
        d.timeout_action = TimeoutAction::Delay;
        q.push(a);
        q.push(d);
        q.push(entry(2, 1, 0, 0, t));
        let later = t + Duration::from_millis(1);
        let swept = q.sweep(later, |_| false);
        assert_eq!(swept.len(), 1);
        assert_eq!((swept[0].0.item, swept[0].1), (0, Swept::TimedOut));
        // The delayed one runs after the one still on time.
        assert_eq!(ids(q.next(later, 0, None)), vec![2]);
        assert_eq!(ids(q.next(later, 0, None)), vec![1]);
    }

    #[test]
    fn request_timeouts_only_shorten_when_allowed() {
        let t = Instant::now();
        let s = |us| Some(Duration::from_micros(us));
        assert_eq!(
            deadline(t, s(100), false, s(10)),
            Some(t + Duration::from_micros(100))
        );
        assert_eq!(
            deadline(t, s(100), true, s(10)),
            Some(t + Duration::from_micros(10))
        );
        assert_eq!(
            deadline(t, s(100), true, s(1000)),
            Some(t + Duration::from_micros(100))
        );
        assert_eq!(
            deadline(t, None, true, s(10)),
            Some(t + Duration::from_micros(10))
        );
        assert_eq!(deadline(t, None, false, s(10)), None);
    }

    #[derive(Debug, Clone)]
    struct Op {
        rows: usize,
        key: i64,
        level: usize,
        timeout_us: Option<u64>,
        advance_us: u64,
        gone: bool,
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            1usize..4,
            0i64..2,
            0usize..3,
            proptest::option::of(1u64..300),
            0u64..200,
            proptest::bool::weighted(0.1),
        )
            .prop_map(|(rows, key, level, timeout_us, advance_us, gone)| Op {
                rows,
                key,
                level,
                timeout_us,
                advance_us,
                gone,
            })
    }

    proptest! {
        /// Triton's dispatch rule, over any compatible requests with a long queue delay: the
        /// batcher waits exactly when more rows could still make a preferred size (or, without
        /// preferred sizes, fill the batch) and nothing stops them from joining; when it runs at
        /// once, it sends the largest preferred size the requests make exactly, else all.
        #[test]
        fn dispatch_follows_tritons_rule(rows in proptest::collection::vec(1usize..5, 1..6), max_batch in 1usize..10,
                                         preferred in proptest::collection::vec(1usize..10, 0..4)) {
            let t = Instant::now();
            let b = batching(10_000_000, &preferred);
            let mut q: BatchQueue<usize> = BatchQueue::new(1);
            for (i, r) in rows.iter().enumerate() {
                q.push(entry(i, *r, 0, 0, t));
            }
            // What the batcher can gather: requests in order while they fit.
            let mut pending = 0;
            let mut counts = Vec::new();
            for r in &rows {
                if pending + r > max_batch { break; }
                pending += r;
                counts.push(pending);
            }
            let blocked = counts.len() < rows.len();
            let usable: Vec<usize> = preferred.iter().copied().filter(|&p| p <= max_batch).collect();
            let can_grow = if usable.is_empty() {
                pending < max_batch
            } else {
                !usable.contains(&pending) && usable.iter().any(|&p| p > pending)
            };
            match q.next(t, max_batch, Some(&b)) {
                Decision::WaitUntil(_) => prop_assert!(pending > 0 && can_grow && !blocked && pending < max_batch),
                Decision::Run(batch) => {
                    prop_assert!(pending == 0 || !can_grow || blocked || pending >= max_batch,
                                 "ran {} rows that could still grow to a preferred size", pending);
                    let sent: usize = batch.iter().map(|e| e.rows).sum();
                    let expected = usable.iter().copied().filter(|p| counts.contains(p)).max();
                    if pending > 0 {
                        prop_assert_eq!(sent, expected.unwrap_or(pending));
                    }
                }
                Decision::Idle => prop_assert!(false, "idle with requests waiting"),
            }
        }

        /// Whatever arrives, the batcher answers every request exactly once, never exceeds the
        /// batch limit, never mixes shapes, never runs an expired or abandoned request, serves
        /// higher priorities first and keeps FIFO order within a level.
        #[test]
        fn batcher_invariants(ops in proptest::collection::vec(op(), 1..60), max_batch in 1usize..6,
                              delay_us in 0u64..300, preferred in proptest::collection::vec(1usize..6, 0..3)) {
            let start = Instant::now();
            let b = batching(delay_us, &preferred);
            let mut q: BatchQueue<usize> = BatchQueue::new(3);
            let mut now = start;
            let mut gone = HashSet::new();
            let mut answered = HashSet::new();
            let mut ran_order: Vec<Vec<(usize, usize)>> = vec![Vec::new(); 3];
            let mut meta = Vec::new();
            let step = |q: &mut BatchQueue<usize>, now: Instant, gone: &HashSet<usize>, answered: &mut HashSet<usize>,
                            ran_order: &mut Vec<Vec<(usize, usize)>>, meta: &Vec<Op>, deadlines: &Vec<Option<Instant>>| {
                for (e, why) in q.sweep(now, |id| gone.contains(id)) {
                    prop_assert!(answered.insert(e.item), "answered twice");
                    if why == Swept::TimedOut { prop_assert!(deadlines[e.item].is_some_and(|d| d <= now)); }
                }
                if let Decision::Run(batch) = q.next(now, max_batch, Some(&b)) {
                    let rows: usize = batch.iter().map(|e| e.rows).sum();
                    prop_assert!(batch.len() == 1 || rows <= max_batch, "batch of {} rows", rows);
                    prop_assert!(batch.iter().all(|e| e.key == batch[0].key), "mixed shapes");
                    // Nothing waiting at a strictly higher priority than the batch's first.
                    prop_assert!((0..batch[0].level).all(|l| q.len_at(l) == 0), "priority inversion");
                    for e in batch {
                        prop_assert!(!gone.contains(&e.item), "ran an abandoned request");
                        prop_assert!(answered.insert(e.item), "answered twice");
                        ran_order[e.level].push((e.item, usize::from(deadlines[e.item].is_some_and(|d| d <= now))));
                    }
                }
                let _ = meta;
                Ok(())
            };
            let mut deadlines = Vec::new();
            for (id, o) in ops.iter().enumerate() {
                now += Duration::from_micros(o.advance_us);
                let dl = o.timeout_us.map(|t| now + Duration::from_micros(t));
                deadlines.push(dl);
                meta.push(o.clone());
                let mut e = entry(id, o.rows.min(max_batch), o.key, o.level, now);
                e.deadline = dl;
                q.push(e);
                if o.gone { gone.insert(id); }
                step(&mut q, now, &gone, &mut answered, &mut ran_order, &meta, &deadlines)?;
            }
            // Drain: time moves on until the queue is empty.
            for _ in 0..10_000 {
                if q.len() == 0 { break; }
                now += Duration::from_micros(50);
                step(&mut q, now, &gone, &mut answered, &mut ran_order, &meta, &deadlines)?;
            }
            prop_assert_eq!(q.len(), 0);
            prop_assert_eq!(answered.len(), ops.len(), "a request was lost");
            // FIFO within a level among requests that ran on time.
            for level in &ran_order {
                let on_time: Vec<usize> = level.iter().filter(|(_, late)| *late == 0).map(|(id, _)| *id).collect();
                prop_assert!(on_time.windows(2).all(|w| w[0] < w[1]), "FIFO broken: {:?}", on_time);
            }
        }
    }
}
