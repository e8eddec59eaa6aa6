//! Which worker gets a request, and the FIFO of requests waiting for one. No Python: a
//! [`Queued`] request carries its waiter as an opaque [`Target`].

use crate::codec::Segments;
use crate::link::{Link, LinkState, Slot, Target};
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// How much work (by its recent answers) a busy worker is sent ahead: enough that it never
/// waits for the parent between short requests, little enough that nothing waits long behind
/// a request that turns out long while another worker could take it.
pub const PREFETCH_BUDGET_NS: u64 = 1_000_000;

/// An encoded request not yet sent (or sent to a worker that died before starting it).
pub struct Queued {
    pub id: u64,
    pub frame: Vec<u8>,
    pub segs: Segments,
    pub target: Target,
    pub retries: u32,
}

pub struct Scheduler {
    queue: VecDeque<Queued>,
    /// Requests a worker runs at once (max_concurrency).
    concurrency: usize,
    /// This many more are sent ahead to a busy worker; with `adaptive` at most this many, by
    /// how long its requests take (see [`Link::ahead`]).
    prefetch: usize,
    adaptive: bool,
    /// Requests submitted since the pool started.
    pub asks: u64,
}

impl Scheduler {
    pub fn new(concurrency: usize, prefetch: usize, adaptive: bool) -> Self {
        Scheduler {
            queue: VecDeque::new(),
            concurrency: concurrency.max(1),
            prefetch,
            adaptive,
            asks: 0,
        }
    }

    /// Requests waiting for a worker.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Least-loaded ready worker with room in its window: what it runs at once, plus the
    /// requests sent ahead (`prefetch`, or with `adaptive` about [`PREFETCH_BUDGET_NS`] of its
    /// work, at most `prefetch`). The first of equally loaded ones.
    #[inline]
    pub fn pick(&self, links: &[Link]) -> Option<usize> {
        let now = Instant::now();
        let mut best: Option<(usize, usize)> = None;
        for (i, l) in links.iter().enumerate() {
            if l.state == LinkState::Ready {
                let n = l.in_flight();
                let ahead = if self.adaptive {
                    l.ahead(now, self.prefetch, PREFETCH_BUDGET_NS)
                } else {
                    self.prefetch
                };
                if best.is_none_or(|(_, b)| n < b) && n < self.concurrency + ahead {
                    best = Some((i, n));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// A new request: returned with the worker to send it to if one has room and nothing
    /// waits before it, else queued (FIFO).
    #[inline]
    pub fn admit(&mut self, links: &[Link], q: Queued) -> Option<(usize, Queued)> {
        self.asks += 1;
        if self.queue.is_empty() {
            if let Some(idx) = self.pick(links) {
                return Some((idx, q));
            }
        }
        self.queue.push_back(q);
        None
    }

    /// The first queued request, with the worker to send it to, while one has room.
    #[inline]
    pub fn next(&mut self, links: &[Link]) -> Option<(usize, Queued)> {
        if self.queue.is_empty() {
            return None;
        }
        let idx = self.pick(links)?;
        self.queue.pop_front().map(|q| (idx, q))
    }

    /// Put requests back at the front of the queue, in their order (ahead of newer ones).
    pub fn requeue_front(&mut self, again: Vec<Queued>) {
        for q in again.into_iter().rev() {
            self.queue.push_front(q);
        }
    }

    /// Empty the queue (no worker can take its requests).
    pub fn drain(&mut self) -> impl Iterator<Item = Queued> + '_ {
        self.queue.drain(..)
    }
}

/// What becomes of the requests in flight on a worker that is gone.
pub struct Loss {
    /// To send again, in their order: those it never started, and those that may have run
    /// but have retries left (one fewer now).
    pub again: Vec<Queued>,
    /// Those that may have run and have no retries left: they fail.
    pub failed: Vec<(u64, Target)>,
    /// How many of `again` are retries (may have run).
    pub retried: u64,
}

/// Sort out the requests in flight on a lost worker. It recorded that it took up the first
/// `taken` requests sent to it (by `seq`): those may have run, and run again only if they have
/// retries left; the rest never started and go back as they were.
pub fn requeue_after_loss(slots: HashMap<u64, Slot>, taken: u64) -> Loss {
    let mut slots: Vec<(u64, Slot)> = slots.into_iter().collect();
    slots.sort_by_key(|(_, s)| s.seq);
    let mut loss = Loss {
        again: Vec::new(),
        failed: Vec::new(),
        retried: 0,
    };
    for (id, slot) in slots {
        let maybe_started = slot.seq < taken;
        let retries = if !maybe_started {
            slot.retries
        } else if slot.retries > 0 {
            loss.retried += 1;
            slot.retries - 1
        } else {
            loss.failed.push((id, slot.target));
            continue;
        };
        loss.again.push(Queued {
            id,
            frame: slot.frame,
            segs: slot.segs,
            target: slot.target,
            retries,
        });
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    fn link(id: u32, state: LinkState, in_flight: u64) -> Link {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        let progress =
            Progress::open(Progress::create_fd().expect("memfd").into_raw_fd()).expect("map");
        let mut l = Link::new(id, std::process::id(), a, progress, 1 << 20);
        l.state = state;
        for seq in 0..in_flight {
            l.slots.insert(1000 * u64::from(id) + seq, slot(seq, 0));
        }
        l
    }

    fn slot(seq: u64, retries: u32) -> Slot {
        Slot {
            target: Target::Stream,
            frame: vec![seq as u8],
            segs: Segments::new(),
            seq,
            retries,
            sent: Instant::now(),
        }
    }

    fn queued(id: u64) -> Queued {
        Queued {
            id,
            frame: Vec::new(),
            segs: Segments::new(),
            target: Target::Stream,
            retries: 0,
        }
    }

    fn ids(q: &Scheduler) -> Vec<u64> {
        q.queue.iter().map(|q| q.id).collect()
    }

    #[test]
    fn pick_prefers_the_least_loaded_ready_worker() {
        let s = Scheduler::new(1, 2, false);
        let links = [
            link(1, LinkState::Ready, 2),
            link(2, LinkState::Loading, 0),
            link(3, LinkState::Ready, 1),
            link(4, LinkState::Draining, 0),
            link(5, LinkState::Ready, 1),
        ];
        assert_eq!(
            s.pick(&links),
            Some(2),
            "the first of the least loaded ready ones"
        );
        assert_eq!(s.pick(&links[..1]), Some(0), "2 in flight < 1 + 2 prefetch");
        assert_eq!(s.pick(&links[1..2]), None, "not ready");
        assert_eq!(s.pick(&[]), None);
    }

    #[test]
    fn pick_respects_concurrency_plus_prefetch() {
        let links = [link(1, LinkState::Ready, 3)];
        assert_eq!(
            Scheduler::new(1, 2, false).pick(&links),
            None,
            "full at 1 + 2"
        );
        assert_eq!(Scheduler::new(2, 2, false).pick(&links), Some(0));
        assert_eq!(Scheduler::new(4, 0, false).pick(&links), Some(0));
        // Adaptive: nothing ahead until the worker's requests are measured.
        let one = [link(1, LinkState::Ready, 1)];
        assert_eq!(Scheduler::new(1, 8, true).pick(&one), None);
        assert_eq!(Scheduler::new(1, 8, false).pick(&one), Some(0));
    }

    #[test]
    fn requests_wait_in_order_and_leave_while_workers_have_room() {
        let mut s = Scheduler::new(1, 0, false);
        let mut links = vec![link(1, LinkState::Loading, 0)];
        for id in 1..=3 {
            assert!(s.admit(&links, queued(id)).is_none(), "no worker ready");
        }
        assert_eq!(s.asks, 3);
        links[0].state = LinkState::Ready;
        // A newer request waits behind the queued ones even though a worker has room.
        assert!(s.admit(&links, queued(4)).is_none());
        assert_eq!(ids(&s), [1, 2, 3, 4]);
        let (idx, q) = s.next(&links).expect("room");
        assert_eq!((idx, q.id), (0, 1));
        links[0].slots.insert(q.id, slot(0, 0));
        assert!(s.next(&links).is_none(), "the worker is full");
        s.requeue_front(vec![queued(10), queued(11)]);
        assert_eq!(ids(&s), [10, 11, 2, 3, 4]);
        assert_eq!(
            s.drain().map(|q| q.id).collect::<Vec<_>>(),
            [10, 11, 2, 3, 4]
        );
        assert_eq!(s.len(), 0);
        links[0].slots.clear();
        let (idx, q) = s.admit(&links, queued(5)).expect("sent at once");
        assert_eq!((idx, q.id), (0, 5));
    }

    #[test]
    fn after_a_loss_unstarted_requests_go_back_in_order_and_started_ones_retry_or_fail() {
        let slots = HashMap::from([
            (14, slot(4, 0)),
            (10, slot(0, 0)), // may have run, no retries: fails
            (11, slot(1, 2)), // may have run, retries: again with one fewer
            (13, slot(3, 1)), // never started: again as it was
            (12, slot(2, 0)), // may have run (taken = 3)
            (15, slot(5, 0)),
        ]);
        let loss = requeue_after_loss(slots, 3);
        let again: Vec<(u64, u32, Vec<u8>)> = loss
            .again
            .iter()
            .map(|q| (q.id, q.retries, q.frame.clone()))
            .collect();
        assert_eq!(
            again,
            [
                (11, 1, vec![1]),
                (13, 1, vec![3]),
                (14, 0, vec![4]),
                (15, 0, vec![5])
            ]
        );
        assert_eq!(
            loss.failed.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            [10, 12]
        );
        assert_eq!(loss.retried, 1);
    }

    #[test]
    fn after_a_loss_before_anything_was_taken_up_everything_goes_back() {
        let slots = HashMap::from([(2, slot(1, 0)), (1, slot(0, 0))]);
        let loss = requeue_after_loss(slots, 0);
        assert_eq!(loss.again.iter().map(|q| q.id).collect::<Vec<_>>(), [1, 2]);
        assert!(loss.failed.is_empty());
        assert_eq!(loss.retried, 0);
    }
}
