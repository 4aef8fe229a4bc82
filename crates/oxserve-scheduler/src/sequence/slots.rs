//! The sequence batcher's bookkeeping, free of threads: which sequence holds which slot of
//! which instance, the requests each sequence has waiting, its implicit state, and the backlog
//! of sequences waiting for a slot.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use oxserve_core::Tensor;
use tokio::sync::oneshot;

use super::{CorrelationId, Outcome};

/// A request waiting in its sequence.
pub(crate) struct Pending {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<String>,
    pub start: bool,
    pub end: bool,
    pub reply: oneshot::Sender<Outcome>,
    pub enqueued: Instant,
    pub span: tracing::Span,
}

pub(crate) enum Admission {
    Queued,
    /// Not a live sequence, and the request does not START one.
    NotStarted,
}

/// A slot of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seat {
    pub instance: usize,
    pub slot: usize,
}

struct Sequence {
    /// `None` while the sequence waits in the backlog for a slot.
    seat: Option<Seat>,
    pending: VecDeque<Pending>,
    /// One of its requests is running (a sequence runs one request at a time).
    running: bool,
    /// Takes requests without START: its last accepted request did not END it.
    open: bool,
    /// The state rows the last request left, in the order of the configured states; `None`
    /// means the initial state.
    state: Option<Vec<Tensor>>,
    last_active: Instant,
}

/// A request taken to run, with its sequence's state.
pub(crate) struct Taken {
    pub id: CorrelationId,
    pub slot: usize,
    pub request: Pending,
    /// `None`: the initial state (always for a request that starts its sequence).
    pub state: Option<Vec<Tensor>>,
}

/// A sequence of an instance with a request ready to run: its slot, when its request arrived,
/// and the request's input shapes (requests batch together only when they agree).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Candidate {
    pub slot: usize,
    pub enqueued: Instant,
    pub shapes: Vec<Vec<i64>>,
}

pub(crate) struct Slots {
    sequences: HashMap<CorrelationId, Sequence>,
    /// `seats[instance][slot]`: the sequence holding it.
    seats: Vec<Vec<Option<CorrelationId>>>,
    backlog: VecDeque<CorrelationId>,
    /// Requests waiting to run, over all sequences.
    pub queued: usize,
    pub stopping: bool,
    /// The version gave up after repeated instance failures.
    pub failed: bool,
}

impl Slots {
    pub fn new(instances: usize, per_instance: usize) -> Self {
        Slots {
            sequences: HashMap::new(),
            seats: vec![vec![None; per_instance.max(1)]; instances.max(1)],
            backlog: VecDeque::new(),
            queued: 0,
            stopping: false,
            failed: false,
        }
    }

    /// Queues a request in its sequence, starting the sequence (with a slot, or in the
    /// backlog) on START. A START for a live sequence restarts it after its queued requests:
    /// the request runs with the initial state, as Triton ends the old sequence early.
    pub fn admit(&mut self, id: CorrelationId, request: Pending) -> Admission {
        let now = Instant::now();
        match self.sequences.get_mut(&id) {
            Some(seq) if seq.open || request.start => {
                seq.open = !request.end;
                seq.pending.push_back(request);
            }
            _ if !request.start => return Admission::NotStarted,
            _ => {
                let seat = self.free_seat();
                match seat {
                    Some(s) => self.seats[s.instance][s.slot] = Some(id.clone()),
                    None => self.backlog.push_back(id.clone()),
                }
                self.sequences.insert(
                    id,
                    Sequence {
                        seat,
                        open: !request.end,
                        pending: VecDeque::from([request]),
                        running: false,
                        state: None,
                        last_active: now,
                    },
                );
            }
        }
        self.queued += 1;
        Admission::Queued
    }

    /// A free slot on the instance with the most free slots (sequences spread over the
    /// instances), its lowest slot first.
    fn free_seat(&self) -> Option<Seat> {
        self.seats
            .iter()
            .enumerate()
            .filter_map(|(instance, slots)| {
                let free = slots.iter().filter(|s| s.is_none()).count();
                let slot = slots.iter().position(Option::is_none)?;
                Some((free, instance, slot))
            })
            .max_by_key(|&(free, instance, _)| (free, std::cmp::Reverse(instance)))
            .map(|(_, instance, slot)| Seat { instance, slot })
    }

    /// The sequences of `instance` with a request ready to run, by slot.
    pub fn candidates(&self, instance: usize, batched: bool) -> Vec<Candidate> {
        let Some(slots) = self.seats.get(instance) else {
            return Vec::new();
        };
        slots
            .iter()
            .enumerate()
            .filter_map(|(slot, id)| {
                let seq = self.sequences.get(id.as_ref()?)?;
                if seq.running {
                    return None;
                }
                let front = seq.pending.front()?;
                Some(Candidate {
                    slot,
                    enqueued: front.enqueued,
                    shapes: crate::instances::row_shapes(&front.inputs, batched),
                })
            })
            .collect()
    }

    /// Takes the next request of the sequence in `slot` of `instance` to run.
    pub fn take(&mut self, instance: usize, slot: usize) -> Option<Taken> {
        let id = self.seats.get(instance)?.get(slot)?.clone()?;
        let seq = self.sequences.get_mut(&id)?;
        let request = seq.pending.pop_front()?;
        seq.running = true;
        self.queued = self.queued.saturating_sub(1);
        let state = if request.start { None } else { seq.state.clone() };
        Some(Taken {
            id,
            slot,
            request,
            state,
        })
    }

    /// Records that a request of the sequence ran: its new state (`None` when the run failed:
    /// the state stays as it was), and, after the sequence's END with nothing queued behind
    /// it, releases its slot. True when a slot was released.
    pub fn finish(
        &mut self,
        id: &CorrelationId,
        end: bool,
        state: Option<Vec<Tensor>>,
        now: Instant,
    ) -> bool {
        let Some(seq) = self.sequences.get_mut(id) else {
            return false;
        };
        seq.running = false;
        seq.last_active = now;
        if let Some(state) = state {
            seq.state = Some(state);
        }
        if end && seq.pending.is_empty() {
            self.release(id);
            return true;
        }
        false
    }

    /// Ends a sequence: its slot goes to the oldest sequence of the backlog.
    fn release(&mut self, id: &CorrelationId) {
        let Some(seq) = self.sequences.remove(id) else {
            return;
        };
        let Some(seat) = seq.seat else {
            self.backlog.retain(|b| b != id);
            return;
        };
        self.seats[seat.instance][seat.slot] = None;
        while let Some(next) = self.backlog.pop_front() {
            if let Some(waiting) = self.sequences.get_mut(&next) {
                waiting.seat = Some(seat);
                self.seats[seat.instance][seat.slot] = Some(next);
                break;
            }
        }
    }

    /// Releases the slots of sequences that have had no request for `idle`; their later
    /// requests must START again. True when any was released.
    pub fn expire_idle(&mut self, now: Instant, idle: Duration) -> bool {
        let expired: Vec<CorrelationId> = self
            .sequences
            .iter()
            .filter(|(_, s)| s.seat.is_some() && !s.running && s.pending.is_empty())
            .filter(|(_, s)| now.saturating_duration_since(s.last_active) >= idle)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::debug!(sequence = %id, "sequence idle too long: its slot is released");
            self.release(id);
        }
        !expired.is_empty()
    }

    /// When the next idle sequence would expire.
    pub fn next_expiry(&self, idle: Duration) -> Option<Instant> {
        self.sequences
            .values()
            .filter(|s| s.seat.is_some() && !s.running && s.pending.is_empty())
            .map(|s| s.last_active + idle)
            .min()
    }

    /// Every waiting request, for answering when the scheduler stops or gives up.
    pub fn drain(&mut self) -> Vec<Pending> {
        self.queued = 0;
        self.backlog.clear();
        for slots in &mut self.seats {
            slots.iter_mut().for_each(|s| *s = None);
        }
        self.sequences.drain().flat_map(|(_, s)| s.pending).collect()
    }

    /// Live sequences (seated or in the backlog).
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.sequences.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(start: bool, end: bool) -> (Pending, oneshot::Receiver<Outcome>) {
        let (reply, rx) = oneshot::channel();
        (
            Pending {
                inputs: vec![],
                outputs: vec![],
                start,
                end,
                reply,
                enqueued: Instant::now(),
                span: tracing::Span::none(),
            },
            rx,
        )
    }

    fn id(n: u64) -> CorrelationId {
        CorrelationId::Number(n)
    }

    #[test]
    fn a_sequence_must_start_and_ends_at_end() {
        let mut s = Slots::new(1, 2);
        assert!(matches!(
            s.admit(id(1), request(false, false).0),
            Admission::NotStarted
        ));
        assert!(matches!(
            s.admit(id(1), request(true, false).0),
            Admission::Queued
        ));
        assert!(matches!(
            s.admit(id(1), request(false, true).0),
            Admission::Queued
        ));
        // After END is queued, only a new START is accepted.
        assert!(matches!(
            s.admit(id(1), request(false, false).0),
            Admission::NotStarted
        ));
        let first = s.take(0, 0).unwrap();
        assert!(first.request.start && first.state.is_none());
        // One request of a sequence at a time.
        assert!(s.candidates(0, true).is_empty());
        s.finish(&first.id, false, Some(vec![]), Instant::now());
        let last = s.take(0, 0).unwrap();
        assert!(last.request.end && last.state.is_some());
        assert!(s.finish(&last.id, true, None, Instant::now()));
        assert_eq!(s.live(), 0);
        assert!(matches!(
            s.admit(id(1), request(false, false).0),
            Admission::NotStarted
        ));
    }

    #[test]
    fn sequences_spread_over_instances_and_wait_for_a_slot() {
        let mut s = Slots::new(2, 1);
        for n in 1..=3 {
            assert!(matches!(s.admit(id(n), request(true, true).0), Admission::Queued));
        }
        assert_eq!(s.candidates(0, true).len(), 1);
        assert_eq!(s.candidates(1, true).len(), 1);
        // Sequence 3 is in the backlog until a slot is released.
        let on_0 = s.take(0, 0).unwrap();
        assert_eq!(on_0.id, id(1));
        assert!(s.finish(&on_0.id, true, None, Instant::now()));
        let next = s.take(0, 0).unwrap();
        assert_eq!(next.id, id(3));
    }

    #[test]
    fn idle_sequences_lose_their_slot() {
        let mut s = Slots::new(1, 1);
        s.admit(id(7), request(true, false).0);
        let t = s.take(0, 0).unwrap();
        let then = Instant::now();
        s.finish(&t.id, false, Some(vec![]), then);
        assert!(!s.expire_idle(then, Duration::from_secs(1)));
        assert_eq!(
            s.next_expiry(Duration::from_secs(1)),
            Some(then + Duration::from_secs(1))
        );
        assert!(s.expire_idle(then + Duration::from_secs(1), Duration::from_secs(1)));
        assert!(matches!(
            s.admit(id(7), request(false, false).0),
            Admission::NotStarted
        ));
    }

    #[test]
    fn a_start_on_a_live_sequence_restarts_it_with_the_initial_state() {
        let mut s = Slots::new(1, 1);
        s.admit(id(2), request(true, false).0);
        let t = s.take(0, 0).unwrap();
        s.finish(&t.id, false, Some(vec![]), Instant::now());
        s.admit(id(2), request(true, false).0);
        assert!(s.take(0, 0).unwrap().state.is_none());
    }
}
