//! Which worker gets a request, and the FIFO of requests waiting for one: the state machine of
//! a pool's dispatch, shared by both hosts. No Python: a [`Queued`] request carries its waiter
//! as an opaque `T` (the Python parent's future, the Rust host's sender).
//!
//! A request pinned to a worker (a CALL on its remote objects) waits in that worker's own
//! FIFO instead: it is sent when that worker has room (ready or retiring), before the general
//! FIFO's requests, and a full worker's pinned requests hold up no one else.

use crate::link::{Link, LinkState, Slot};
use crate::sys::Segments;
use std::collections::{HashMap, VecDeque};
use std::time::Instant;

/// How much work (by its recent answers) a busy worker is sent ahead: enough that it never
/// waits for the parent between short requests, little enough that nothing waits long behind
/// a request that turns out long while another worker could take it.
pub const PREFETCH_BUDGET_NS: u64 = 1_000_000;

/// An encoded request not yet sent (or sent to a worker that died before starting it).
pub struct Queued<T> {
    /// Its correlation id.
    pub id: u64,
    /// The encoded frame.
    pub frame: Vec<u8>,
    /// The shared-memory segments it refers to.
    pub segs: Segments,
    /// Who waits for the answer.
    pub target: T,
    /// How many more times it may run elsewhere if its worker dies after taking it up.
    pub retries: u32,
    /// The worker it must run on (by id), if pinned.
    pub pin: Option<u32>,
}

/// The queue and the choice of worker (see the module doc).
pub struct Scheduler<T> {
    queue: VecDeque<Queued<T>>,
    /// Pinned requests waiting for their worker, by worker id.
    pinned: HashMap<u32, VecDeque<Queued<T>>>,
    /// How many requests `pinned` holds (0: the pool never pinned, nothing to look at).
    pinned_len: usize,
    /// Requests a worker runs at once (max_concurrency).
    concurrency: usize,
    /// This many more are sent ahead to a busy worker; with `adaptive` at most this many, by
    /// how long its requests take (see [`Link::ahead`]).
    prefetch: usize,
    adaptive: bool,
    /// Requests submitted since the pool started.
    pub asks: u64,
}

impl<T> Scheduler<T> {
    /// Nothing queued; a worker runs `concurrency` requests at once, and is sent up to
    /// `prefetch` ahead (with `adaptive`, by how long its requests take).
    pub fn new(concurrency: usize, prefetch: usize, adaptive: bool) -> Self {
        Scheduler {
            queue: VecDeque::new(),
            pinned: HashMap::new(),
            pinned_len: 0,
            concurrency: concurrency.max(1),
            prefetch,
            adaptive,
            asks: 0,
        }
    }

    /// Requests waiting for a worker.
    pub fn len(&self) -> usize {
        self.queue.len() + self.pinned_len
    }

    /// No request waits for a worker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pinned requests waiting for worker `worker_id`.
    #[inline]
    pub fn pinned_waiting(&self, worker_id: u32) -> usize {
        if self.pinned_len == 0 {
            return 0;
        }
        self.pinned.get(&worker_id).map_or(0, VecDeque::len)
    }

    /// Whether `l` can take one more request: it runs `concurrency` at once, plus those sent
    /// ahead (see [`Self::pick`]).
    #[inline]
    fn has_room(&self, l: &Link<T>, now: Instant) -> bool {
        let ahead = if self.adaptive {
            l.ahead(now, self.prefetch, PREFETCH_BUDGET_NS)
        } else {
            self.prefetch
        };
        l.in_flight() < self.concurrency + ahead
    }

    /// Whether a pinned request may be sent to `l` now: ready or retiring (its sessions go
    /// on until they end), with room.
    fn pinned_room(&self, l: &Link<T>, now: Instant) -> bool {
        matches!(l.state, LinkState::Ready | LinkState::Draining) && self.has_room(l, now)
    }

    /// Least-loaded ready worker with room in its window: what it runs at once, plus the
    /// requests sent ahead (`prefetch`, or with `adaptive` about [`PREFETCH_BUDGET_NS`] of its
    /// work, at most `prefetch`). The first of equally loaded ones.
    #[inline]
    pub fn pick(&self, links: &[Link<T>]) -> Option<usize> {
        let now = Instant::now();
        let mut best: Option<(usize, usize)> = None;
        for (i, l) in links.iter().enumerate() {
            if l.state == LinkState::Ready {
                let n = l.in_flight();
                if best.is_none_or(|(_, b)| n < b) && self.has_room(l, now) {
                    best = Some((i, n));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// A new request: returned with the worker to send it to if one has room and nothing
    /// waits before it, else queued (FIFO).
    #[inline]
    pub fn admit(&mut self, links: &[Link<T>], q: Queued<T>) -> Option<(usize, Queued<T>)> {
        self.asks += 1;
        if let Some(wid) = q.pin {
            return self.admit_pinned(links, wid, q);
        }
        if self.queue.is_empty() {
            if let Some(idx) = self.pick(links) {
                return Some((idx, q));
            }
        }
        self.queue.push_back(q);
        None
    }

    /// A pinned request: sent now if its worker has room and none of its pinned requests
    /// waits before it, else queued for that worker.
    #[cold]
    fn admit_pinned(
        &mut self,
        links: &[Link<T>],
        wid: u32,
        q: Queued<T>,
    ) -> Option<(usize, Queued<T>)> {
        if self.pinned_waiting(wid) == 0 {
            let now = Instant::now();
            if let Some(idx) = links.iter().position(|l| l.id == wid) {
                if self.pinned_room(&links[idx], now) {
                    return Some((idx, q));
                }
            }
        }
        self.pinned.entry(wid).or_default().push_back(q);
        self.pinned_len += 1;
        None
    }

    /// The next queued request, with the worker to send it to, while one has room: a worker's
    /// pinned requests first, then the general FIFO.
    #[inline]
    pub fn next(&mut self, links: &[Link<T>]) -> Option<(usize, Queued<T>)> {
        if self.pinned_len > 0 {
            if let Some(found) = self.next_pinned(links) {
                return Some(found);
            }
        }
        if self.queue.is_empty() {
            return None;
        }
        let idx = self.pick(links)?;
        self.queue.pop_front().map(|q| (idx, q))
    }

    fn next_pinned(&mut self, links: &[Link<T>]) -> Option<(usize, Queued<T>)> {
        let now = Instant::now();
        for (idx, l) in links.iter().enumerate() {
            if self.pinned_waiting(l.id) > 0 && self.pinned_room(l, now) {
                let queue = self.pinned.get_mut(&l.id)?;
                let q = queue.pop_front()?;
                if queue.is_empty() {
                    self.pinned.remove(&l.id);
                }
                self.pinned_len -= 1;
                return Some((idx, q));
            }
        }
        None
    }

    /// Take the pinned requests waiting for worker `worker_id` (it is gone), in their order.
    pub fn take_pinned(&mut self, worker_id: u32) -> Vec<Queued<T>> {
        if self.pinned_len == 0 {
            return Vec::new();
        }
        let taken: Vec<Queued<T>> = self
            .pinned
            .remove(&worker_id)
            .map(Vec::from)
            .unwrap_or_default();
        self.pinned_len -= taken.len();
        taken
    }

    /// Put requests back at the front of the queue, in their order (ahead of newer ones).
    pub fn requeue_front(&mut self, again: Vec<Queued<T>>) {
        for q in again.into_iter().rev() {
            self.queue.push_front(q);
        }
    }

    /// Empty the queue, pinned requests included (no worker can take its requests).
    pub fn drain(&mut self) -> impl Iterator<Item = Queued<T>> + '_ {
        self.pinned_len = 0;
        let pinned: Vec<Queued<T>> = self.pinned.drain().flat_map(|(_, q)| q).collect();
        self.queue.drain(..).chain(pinned)
    }
}

/// What becomes of the requests in flight on a worker that is gone.
pub struct Loss<T> {
    /// To send again, in their order: those it never started, and those that may have run
    /// but have retries left (one fewer now).
    pub again: Vec<Queued<T>>,
    /// Those that may have run and have no retries left, and every pinned one (it can run on
    /// no other worker): they fail.
    pub failed: Vec<(u64, T)>,
    /// How many of `again` are retries (may have run).
    pub retried: u64,
}

/// Sort out the requests in flight on a lost worker. It recorded that it took up the first
/// `taken` requests sent to it (by `seq`): those may have run, and run again only if they have
/// retries left; the rest never started and go back as they were.
pub fn requeue_after_loss<T>(slots: HashMap<u64, Slot<T>>, taken: u64) -> Loss<T> {
    let mut slots: Vec<(u64, Slot<T>)> = slots.into_iter().collect();
    slots.sort_by_key(|(_, s)| s.seq);
    let mut loss = Loss {
        again: Vec::new(),
        failed: Vec::new(),
        retried: 0,
    };
    for (id, slot) in slots {
        let maybe_started = slot.seq < taken;
        if slot.pinned {
            loss.failed.push((id, slot.target));
            continue;
        }
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
            pin: None,
        });
    }
    loss
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Progress;

    /// The tests' waiters: nobody.
    type Target = ();
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    fn link(id: u32, state: LinkState, in_flight: u64) -> Link<Target> {
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

    fn slot(seq: u64, retries: u32) -> Slot<Target> {
        Slot {
            target: (),
            frame: vec![seq as u8],
            segs: Segments::new(),
            seq,
            retries,
            sent: Instant::now(),
            pinned: false,
        }
    }

    fn queued(id: u64) -> Queued<Target> {
        Queued {
            id,
            frame: Vec::new(),
            segs: Segments::new(),
            target: (),
            retries: 0,
            pin: None,
        }
    }

    fn pinned(id: u64, worker: u32) -> Queued<Target> {
        Queued {
            pin: Some(worker),
            ..queued(id)
        }
    }

    /// Send what the scheduler hands out, as the pool would (a slot per request).
    fn dispatch(s: &mut Scheduler<Target>, links: &mut [Link<Target>]) -> Vec<(u32, u64)> {
        let mut sent = Vec::new();
        while let Some((idx, q)) = s.next(links) {
            let seq = links[idx].slots.len() as u64;
            links[idx].slots.insert(q.id, slot(seq, 0));
            sent.push((links[idx].id, q.id));
        }
        sent
    }

    #[test]
    fn pinned_requests_wait_for_their_worker_and_block_no_one_else() {
        let mut s = Scheduler::new(1, 0, false);
        let mut links = vec![link(1, LinkState::Ready, 0), link(2, LinkState::Ready, 0)];
        // Worker 1 free: a pinned request goes at once.
        let (idx, q) = s.admit(&links, pinned(10, 1)).expect("room");
        assert_eq!((idx, q.id), (0, 10));
        links[0].slots.insert(10, slot(0, 0));
        // Worker 1 full: its pinned requests wait for it, in order.
        assert!(s.admit(&links, pinned(11, 1)).is_none());
        assert!(s.admit(&links, pinned(12, 1)).is_none());
        assert_eq!(
            (s.len(), s.pinned_waiting(1), s.pinned_waiting(2)),
            (2, 2, 0)
        );
        // They hold up neither unpinned requests nor another worker's pinned ones.
        let (idx, q) = s.admit(&links, queued(20)).expect("worker 2 has room");
        assert_eq!((idx, q.id), (1, 20));
        links[1].slots.insert(20, slot(0, 0));
        assert!(s.admit(&links, queued(21)).is_none(), "everyone is full");
        assert!(s.admit(&links, pinned(30, 2)).is_none());
        assert_eq!(dispatch(&mut s, &mut links), []);
        // Worker 2 answers: its pinned request goes before the older general one.
        links[1].slots.clear();
        assert_eq!(dispatch(&mut s, &mut links), [(2, 30)]);
        // Worker 1 answers and retires: pinned requests still go to it, general ones do not.
        links[0].slots.clear();
        links[0].state = LinkState::Draining;
        assert_eq!(dispatch(&mut s, &mut links), [(1, 11)]);
        links[0].slots.clear();
        links[1].slots.clear();
        assert_eq!(dispatch(&mut s, &mut links), [(1, 12), (2, 21)]);
        assert_eq!(s.len(), 0);
        assert_eq!(s.asks, 6);
    }

    #[test]
    fn pinned_requests_wait_while_their_worker_starts_and_leave_with_it() {
        let mut s = Scheduler::new(2, 0, false);
        let mut links = vec![link(1, LinkState::Loading, 0)];
        assert!(s.admit(&links, pinned(1, 1)).is_none(), "starting: wait");
        assert!(s.admit(&links, pinned(2, 1)).is_none());
        assert!(
            s.admit(&links, pinned(3, 7)).is_none(),
            "unknown worker: waits too"
        );
        assert_eq!(dispatch(&mut s, &mut links), []);
        links[0].state = LinkState::Ready;
        // A newer pinned request does not overtake the waiting ones.
        assert!(s.admit(&links, pinned(4, 1)).is_none());
        assert_eq!(dispatch(&mut s, &mut links), [(1, 1), (1, 2)]);
        assert_eq!(
            s.take_pinned(1).iter().map(|q| q.id).collect::<Vec<_>>(),
            [4]
        );
        assert!(s.take_pinned(1).is_empty());
        assert_eq!(s.drain().map(|q| q.id).collect::<Vec<_>>(), [3]);
        assert_eq!((s.len(), s.pinned_waiting(7)), (0, 0));
    }

    #[test]
    fn after_a_loss_pinned_requests_fail_whether_or_not_they_started() {
        let pin = |seq, retries| Slot {
            pinned: true,
            ..slot(seq, retries)
        };
        let slots = HashMap::from([
            (1, pin(0, 0)),  // may have run
            (2, slot(1, 0)), // may have run, unpinned, no retries: fails
            (3, pin(2, 0)),  // never started, pinned: fails all the same
            (4, slot(3, 0)), // never started, unpinned: again
        ]);
        let loss = requeue_after_loss(slots, 2);
        let mut failed: Vec<u64> = loss.failed.iter().map(|(id, _)| *id).collect();
        failed.sort();
        assert_eq!(failed, [1, 2, 3]);
        assert_eq!(loss.again.iter().map(|q| q.id).collect::<Vec<_>>(), [4]);
        assert!(loss.again.iter().all(|q| q.pin.is_none()));
        assert_eq!(loss.retried, 0);
    }

    fn ids(q: &Scheduler<Target>) -> Vec<u64> {
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
