//! [`WorkerStream`]: the items of a `pool.stream()` call as a `futures` `Stream`. Each poll
//! takes every item buffered so far (crediting the worker for the batch before, so it runs at
//! most `stream_window` ahead); dropping it before the end cancels the call in the worker.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use kameo_core::frames::raw_frame;
use kameo_core::streams::Take;
use kameo_proto::frame::{self, Kind};
use serde::de::DeserializeOwned;

use crate::error::Error;
use crate::state::{Entry, Shared};

/// The items of a stream call (see [`crate::Pool::stream`]): `Result<T, Error>`, ending
/// after the last item or the first error.
pub struct WorkerStream<T> {
    shared: Arc<Shared>,
    id: u64,
    buf: VecDeque<Entry>,
    done: bool,
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    span: tracing::Span,
    _item: PhantomData<fn() -> T>,
}

impl<T> WorkerStream<T> {
    pub(crate) fn new(
        shared: Arc<Shared>,
        id: u64,
        timeout: Option<Duration>,
        span: tracing::Span,
    ) -> Self {
        WorkerStream {
            shared,
            id,
            buf: VecDeque::new(),
            done: false,
            deadline: timeout.map(|d| (Box::pin(tokio::time::sleep(d)), d)),
            span,
            _item: PhantomData,
        }
    }

    /// Stop the call in the worker (as dropping the stream does).
    fn cancel(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.buf.clear();
        let grace = self.shared.cfg.cancel_grace;
        let mut st = self.shared.lock();
        if let Some(wid) = st.streams.cancel(self.id) {
            st.cancel_call(wid, self.id, grace);
        }
    }
}

impl<T> Unpin for WorkerStream<T> {}

impl<T: DeserializeOwned> Stream for WorkerStream<T> {
    type Item = Result<T, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = self.get_mut();
        let span = me.span.clone();
        let _enter = span.enter();
        loop {
            match me.buf.pop_front() {
                Some(Entry::Item(body)) => return Poll::Ready(Some(body.decode())),
                Some(Entry::Failed(e)) => {
                    me.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Some(Entry::Waker(_)) => continue,
                None => {}
            }
            if me.done {
                return Poll::Ready(None);
            }
            if let Some((sleep, after)) = &mut me.deadline {
                if sleep.as_mut().poll(cx).is_ready() {
                    let after = *after;
                    me.cancel();
                    return Poll::Ready(Some(Err(Error::Timeout { after })));
                }
            }
            let mut st = me.shared.lock();
            let Ok((taken, grant)) = st.streams.take(me.id, |d| d.collect::<VecDeque<_>>()) else {
                me.done = true;
                return Poll::Ready(None);
            };
            if let Some(g) = grant {
                let credit = raw_frame(Kind::Credit as u8, me.id, &frame::credit_body(g.credit));
                st.send_control(g.worker, &credit);
            }
            match taken {
                Take::Items(items) => me.buf = items,
                Take::Finished(Ok(())) => {
                    me.done = true;
                    return Poll::Ready(None);
                }
                Take::Finished(Err(Entry::Failed(e))) => {
                    me.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Take::Finished(Err(_)) => {
                    me.done = true;
                    return Poll::Ready(None);
                }
                Take::Pending => match st.streams.wait(me.id, Entry::Waker(cx.waker().clone())) {
                    Ok(None) => return Poll::Pending,
                    Ok(Some(_)) => continue,
                    Err(_) => {
                        me.done = true;
                        return Poll::Ready(None);
                    }
                },
            }
        }
    }
}

impl<T> Drop for WorkerStream<T> {
    fn drop(&mut self) {
        self.cancel();
    }
}
