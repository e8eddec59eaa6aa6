//! The buffers of `pool.stream()` calls, between the socket and the consumer, and their
//! credit. No Python: `T` is what the buffer holds (in the Python parent a Python object: items,
//! the waiting future, the exception of a failed stream; in the Rust host its own item and
//! waker types), and waking a waiter is left to the caller, which gets it back from the call
//! that should wake it.

use std::collections::{vec_deque, HashMap, VecDeque};

/// Items of one `pool.stream()` call.
pub struct StreamBuf<T> {
    items: VecDeque<T>,
    waiter: Option<T>,
    /// None while the worker is still producing; Some(Err(exception)) if it failed.
    outcome: Option<Result<(), T>>,
    cancelled: bool,
    /// Items consumed since the last CREDIT.
    taken: u32,
    /// Items handed to the consumer by the last `take`, credited at the next one.
    handed_out: u32,
    /// The worker running it, once sent.
    worker: Option<u32>,
}

impl<T> StreamBuf<T> {
    fn new() -> Self {
        StreamBuf {
            items: VecDeque::new(),
            waiter: None,
            outcome: None,
            cancelled: false,
            taken: 0,
            handed_out: 0,
            worker: None,
        }
    }

    /// Its consumer left while the worker was still producing.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled
    }

    /// An item arrived. Returns the waiter to wake.
    #[inline]
    pub fn push(&mut self, item: T) -> Option<T> {
        self.items.push_back(item);
        self.waiter.take()
    }

    /// The worker finished it (the first outcome counts). Returns the waiter to wake.
    pub fn finish(&mut self, outcome: Result<(), T>) -> Option<T> {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
        }
        self.waiter.take()
    }
}

/// CREDIT to send: `credit` more items of the stream, to the worker running it.
#[derive(Debug, PartialEq, Eq)]
pub struct Grant {
    /// The worker running the stream.
    pub worker: u32,
    /// Items it may send beyond those granted before.
    pub credit: u32,
}

/// What [`Streams::take`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take<R, E> {
    /// The buffered items (as the caller collected them).
    Items(R),
    /// Nothing yet.
    Pending,
    /// No more items: the stream ended (`Ok`) or failed (`Err`); it is forgotten.
    Finished(Result<(), E>),
}

/// What [`Streams::finish`] did.
pub enum Finished<T> {
    /// No such stream (already taken to its end, or cancelled before it was sent).
    Gone,
    /// Its consumer had left: it is forgotten, and the answer is abandoned.
    Cancelled,
    /// The outcome is recorded; the waiter (if any) is to be woken.
    Open(Option<T>),
}

/// No stream of that id.
#[derive(Debug)]
pub struct NoStream;

/// Open streams by request id.
pub struct Streams<T> {
    table: HashMap<u64, StreamBuf<T>>,
    /// Items a worker may send ahead of the consumer.
    window: u32,
}

impl<T> Streams<T> {
    /// No streams yet; each may run `window` items ahead of its consumer (at least 1).
    pub fn new(window: u32) -> Self {
        Streams {
            table: HashMap::new(),
            window: window.max(1),
        }
    }

    /// Streams open (not yet taken to their end, or cancelled and not yet ended).
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// No stream is open.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// A new stream, not yet sent.
    pub fn open(&mut self, id: u64) {
        self.table.insert(id, StreamBuf::new());
    }

    /// The buffer of stream `id`, if open.
    pub fn get_mut(&mut self, id: u64) -> Option<&mut StreamBuf<T>> {
        self.table.get_mut(&id)
    }

    /// Forget stream `id`.
    pub fn remove(&mut self, id: u64) {
        self.table.remove(&id);
    }

    /// Its consumer is gone (cancelled, or never there): a queued request is not sent.
    #[inline]
    pub fn abandoned(&self, id: u64) -> bool {
        self.table.get(&id).is_none_or(|s| s.cancelled)
    }

    /// Stream `id` was sent to `worker` (Some), or went back to the queue (None).
    #[inline]
    pub fn assign(&mut self, id: u64, worker: Option<u32>) {
        if let Some(s) = self.table.get_mut(&id) {
            s.worker = worker;
        }
    }

    /// The worker finished stream `id` (END, a final ITEM, an error, its loss).
    pub fn finish(&mut self, id: u64, outcome: Result<(), T>) -> Finished<T> {
        match self.table.get_mut(&id) {
            Some(s) if s.cancelled => {
                self.table.remove(&id);
                Finished::Cancelled
            }
            Some(s) => Finished::Open(s.finish(outcome)),
            None => Finished::Gone,
        }
    }

    /// Take every buffered item of stream `id`, collected by `collect`; once it has none
    /// left, its outcome. The consumer takes again only once it has used every item handed
    /// out before: that batch is credited now (returned as a [`Grant`] once a quarter of the
    /// window is due), so the worker never runs more than the window ahead.
    #[inline]
    pub fn take<R>(
        &mut self,
        id: u64,
        collect: impl FnOnce(vec_deque::Drain<'_, T>) -> R,
    ) -> Result<(Take<R, T>, Option<Grant>), NoStream> {
        let s = self.table.get_mut(&id).ok_or(NoStream)?;
        let n = s.items.len() as u32;
        s.taken += std::mem::replace(&mut s.handed_out, n);
        let mut grant = None;
        if s.outcome.is_none() && s.taken >= (self.window / 4).max(1) {
            if let Some(worker) = s.worker {
                let credit = std::mem::take(&mut s.taken);
                grant = Some(Grant { worker, credit });
            }
        }
        let taken = if n > 0 {
            Take::Items(collect(s.items.drain(..)))
        } else {
            match s.outcome.take() {
                None => Take::Pending,
                Some(outcome) => {
                    self.table.remove(&id);
                    Take::Finished(outcome)
                }
            }
        };
        Ok((taken, grant))
    }

    /// `waiter` is to be woken when stream `id` has items or has finished. Returns it at once
    /// if that is already so.
    pub fn wait(&mut self, id: u64, waiter: T) -> Result<Option<T>, NoStream> {
        let s = self.table.get_mut(&id).ok_or(NoStream)?;
        s.waiter = Some(waiter);
        if !s.items.is_empty() || s.outcome.is_some() {
            return Ok(s.waiter.take());
        }
        Ok(None)
    }

    /// The consumer left stream `id`: its items go; a stream that finished or was never sent
    /// is forgotten, a running one is marked (items still arriving are dropped) and its worker
    /// returned, to be sent CANCEL.
    pub fn cancel(&mut self, id: u64) -> Option<u32> {
        let s = self.table.get_mut(&id)?;
        s.items.clear();
        if s.outcome.is_some() || s.worker.is_none() {
            self.table.remove(&id);
            return None;
        }
        s.cancelled = true;
        s.worker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(s: &mut Streams<i32>, id: u64) -> (Take<Vec<i32>, i32>, Option<Grant>) {
        s.take(id, |d| d.collect()).expect("open")
    }

    #[test]
    fn taking_a_batch_credits_the_one_before() {
        let mut s = Streams::new(8); // credit is granted once 2 items are due
        s.open(1);
        s.assign(1, Some(7));
        for i in 0..3 {
            assert!(s.get_mut(1).expect("open").push(i).is_none());
        }
        // The first batch is handed out; nothing was consumed before it.
        assert_eq!(take(&mut s, 1), (Take::Items(vec![0, 1, 2]), None));
        assert_eq!(
            take(&mut s, 1),
            (
                Take::Pending,
                Some(Grant {
                    worker: 7,
                    credit: 3
                })
            )
        );
        s.get_mut(1).expect("open").push(3);
        assert_eq!(take(&mut s, 1), (Take::Items(vec![3]), None));
        // One item is due: under a quarter of the window, so it waits for the next batch.
        s.get_mut(1).expect("open").push(4);
        assert_eq!(take(&mut s, 1), (Take::Items(vec![4]), None));
        assert_eq!(
            take(&mut s, 1),
            (
                Take::Pending,
                Some(Grant {
                    worker: 7,
                    credit: 2
                })
            )
        );
    }

    #[test]
    fn no_credit_before_it_is_sent_or_after_it_finished() {
        let mut s = Streams::new(1);
        s.open(1);
        s.get_mut(1).expect("open").push(10);
        assert_eq!(take(&mut s, 1), (Take::Items(vec![10]), None));
        assert_eq!(take(&mut s, 1).1, None, "not sent: no worker to credit");
        s.assign(1, Some(3));
        s.get_mut(1).expect("open").push(11);
        assert!(matches!(s.finish(1, Ok(())), Finished::Open(None)));
        // Items first, then the end; a finished stream gets no credit.
        assert_eq!(take(&mut s, 1), (Take::Items(vec![11]), None));
        assert_eq!(take(&mut s, 1), (Take::Finished(Ok(())), None));
        assert!(s.take(1, |d| d.count()).is_err(), "forgotten at its end");
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn the_first_outcome_counts_and_wakes_the_waiter() {
        let mut s = Streams::new(4);
        s.open(1);
        assert_eq!(s.wait(1, 100).expect("open"), None);
        assert!(matches!(s.finish(1, Err(-1)), Finished::Open(Some(100))));
        assert!(matches!(s.finish(1, Ok(())), Finished::Open(None)));
        assert_eq!(
            s.wait(1, 101).expect("open"),
            Some(101),
            "finished: woken at once"
        );
        assert_eq!(take(&mut s, 1), (Take::Finished(Err(-1)), None));
        assert!(s.wait(1, 102).is_err());
        assert!(matches!(s.finish(1, Ok(())), Finished::Gone));
    }

    #[test]
    fn a_waiter_is_woken_by_the_next_item() {
        let mut s = Streams::new(4);
        s.open(1);
        assert_eq!(s.wait(1, 100).expect("open"), None);
        assert_eq!(s.get_mut(1).expect("open").push(5), Some(100));
        assert_eq!(s.get_mut(1).expect("open").push(6), None);
        assert_eq!(
            s.wait(1, 101).expect("open"),
            Some(101),
            "items: woken at once"
        );
    }

    #[test]
    fn abandoning_a_queued_stream_forgets_it() {
        let mut s = Streams::<i32>::new(4);
        s.open(1);
        assert!(!s.abandoned(1));
        assert_eq!(
            s.cancel(1),
            None,
            "never sent: nothing to cancel in a worker"
        );
        assert!(s.abandoned(1));
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn abandoning_a_running_stream_cancels_it_in_its_worker() {
        let mut s = Streams::new(4);
        s.open(1);
        s.assign(1, Some(2));
        s.get_mut(1).expect("open").push(1);
        assert_eq!(s.cancel(1), Some(2));
        assert!(
            s.abandoned(1),
            "dispatch skips it if it goes back to the queue"
        );
        assert!(s.get_mut(1).expect("kept until its end").is_cancelled());
        // Its end arrives: it is forgotten, the answer counted as abandoned.
        assert!(matches!(s.finish(1, Ok(())), Finished::Cancelled));
        assert_eq!(s.len(), 0);
        // A finished stream is forgotten at once.
        s.open(2);
        s.assign(2, Some(2));
        s.finish(2, Ok(()));
        assert_eq!(s.cancel(2), None);
        assert_eq!(s.len(), 0);
    }
}
