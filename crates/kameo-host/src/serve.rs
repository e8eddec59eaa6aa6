//! Serving the workers' callbacks: a task per call, whose items go out as the worker's credit
//! allows (a semaphore of `stream_window` permits, topped up by its CREDIT frames), stopped
//! by the worker's CANCEL or its death (the task is aborted: the handler's stream is dropped).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;

use futures_core::Stream;
use kameo_core::frames::{encode_frame_with, raw_frame, Head};
use kameo_proto::frame::Kind;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::bodies::{CallbackErrorInfo, CallbackPath};
use crate::callbacks::{EncodedStream, ErasedHandler};
use crate::error::CallbackError;
use crate::state::{Serving, Shared};

/// Worker `wid` called back (CALLBACK `cid` with `body`).
pub(crate) fn start(shared: &Arc<Shared>, wid: u32, cid: u64, body: Vec<u8>) {
    let path = match crate::serde_py::from_wire::<CallbackPath>(&body) {
        Ok((path, _, _)) => path,
        Err(e) => {
            let e = CallbackError::new("TypeError", format!("malformed CALLBACK body: {e}"));
            let frame = error_frame(cid, &CallbackErrorInfo::of(&e));
            shared.lock().send_control(wid, &frame);
            return;
        }
    };
    let Some(handler) = shared.callbacks.get(&path) else {
        let message = format!(
            "no callback handler is registered at {path:?} in the Rust host (register it with PoolBuilder::callback)"
        );
        let frame = error_frame(cid, &CallbackErrorInfo::not_found(&message));
        shared.lock().send_control(wid, &frame);
        return;
    };
    let credit = Arc::new(Semaphore::new(shared.cfg.stream_window as usize));
    {
        let mut st = shared.lock();
        if st.index_of(wid).is_none() {
            return;
        }
        st.serving.insert(
            (wid, cid),
            Serving {
                credit: credit.clone(),
                task: None,
            },
        );
    }
    let span = tracing::info_span!("kameo.callback", path = %path, worker = wid);
    let task = tokio::spawn(tracing::Instrument::instrument(
        run(shared.clone(), wid, cid, handler, body, credit),
        span,
    ));
    let mut st = shared.lock();
    match st.serving.get_mut(&(wid, cid)) {
        Some(s) => s.task = Some(task.abort_handle()),
        None => task.abort(), // cancelled (or its worker gone) meanwhile
    }
}

async fn run(
    shared: Arc<Shared>,
    wid: u32,
    cid: u64,
    handler: Arc<dyn ErasedHandler>,
    body: Vec<u8>,
    credit: Arc<Semaphore>,
) {
    let max = shared.cfg.max_frame_bytes;
    let items = match handler.call(body).await {
        Ok(items) => items,
        Err(e) => {
            return finish(
                &shared,
                wid,
                cid,
                error_frame(cid, &CallbackErrorInfo::of(&e)),
            )
        }
    };
    let mut items: EncodedStream = match items.into_once() {
        Ok(item) => return finish(&shared, wid, cid, item_frame(cid, &item, true, max)),
        Err(items) => items,
    };
    loop {
        let next = poll_fn(|cx| Pin::new(&mut items).poll_next(cx)).await;
        match next {
            None => return finish(&shared, wid, cid, raw_frame(Kind::End as u8, cid, b"")),
            Some(Err(e)) => {
                return finish(
                    &shared,
                    wid,
                    cid,
                    error_frame(cid, &CallbackErrorInfo::of(&e)),
                )
            }
            Some(Ok(item)) => {
                match credit.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
                let frame = item_frame(cid, &item, false, max);
                let mut st = shared.lock();
                if !st.serving.contains_key(&(wid, cid)) || !st.send_control(wid, &frame) {
                    return; // cancelled, or the worker is gone
                }
            }
        }
    }
}

/// The call's last frame, unless it was cancelled meanwhile.
fn finish(shared: &Shared, wid: u32, cid: u64, frame: Vec<u8>) {
    let mut st = shared.lock();
    if st.serving.remove(&(wid, cid)).is_some() {
        st.send_control(wid, &frame);
    }
}

fn item_frame(cid: u64, item: &[u8], is_final: bool, max: usize) -> Vec<u8> {
    let head = Head::new(Kind::Item as u8, cid).is_final(is_final);
    match encode_frame_with(head, max, |buf, _| {
        buf.extend_from_slice(item);
        Ok::<(), ()>(())
    }) {
        Ok((frame, _, ())) => frame,
        Err(_) => {
            let e = CallbackError::new(
                "ValueError",
                format!(
                    "the callback's item is {} bytes, over max_frame_bytes={max}",
                    item.len()
                ),
            );
            error_frame(cid, &CallbackErrorInfo::of(&e))
        }
    }
}

fn error_frame(cid: u64, info: &impl Serialize) -> Vec<u8> {
    let body = crate::serde_py::to_wire(info).unwrap_or_default();
    raw_frame(Kind::Error as u8, cid, &body)
}
