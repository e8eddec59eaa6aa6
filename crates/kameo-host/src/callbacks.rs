//! Callbacks: handlers in the host that workers call as `kameo.<module>.<Type>(data)`.
//!
//! A handler implements [`CallbackHandler`] (an `async fn` in the trait) and answers with an
//! [`ItemStream`]: one item, a list, or any `Stream` of items. The pool runs each call in a
//! task of its own, so callbacks are served concurrently with each other and with the pool's
//! calls; items go out as the worker's credit allows (at most `stream_window` ahead of the
//! worker's loop), and a worker that stops iterating (CANCEL) or dies stops the task.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Serialize;

use crate::error::CallbackError;

/// A handler of the host that workers call back (`kameo.trading.DataFetch(req)` in a worker
/// calls the handler registered as `"trading.DataFetch"`).
///
/// ```
/// use kameo_host::{CallbackError, CallbackHandler, ItemStream};
///
/// struct Double;
/// impl CallbackHandler for Double {
///     type Request = i64;
///     type Item = i64;
///     async fn handle(&self, x: i64) -> Result<ItemStream<i64>, CallbackError> {
///         Ok(ItemStream::once(2 * x))
///     }
/// }
/// ```
pub trait CallbackHandler: Send + Sync + 'static {
    /// What the worker passes (decoded from its Python value).
    type Request: DeserializeOwned + Send + 'static;
    /// What the worker iterates (encoded to Python values).
    type Item: Serialize + Send + 'static;

    /// Answer one call: the items the worker's `for`/`async for` sees, or an error it raises.
    fn handle(
        &self,
        req: Self::Request,
    ) -> impl Future<Output = Result<ItemStream<Self::Item>, CallbackError>> + Send;
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, CallbackError>> + Send>>;

/// The items a callback answers with: one ([`ItemStream::once`]), a list
/// ([`ItemStream::iter`]) or a stream ([`ItemStream::new`]) whose `Err` item ends the call
/// with that error in the worker, after the items before it.
pub struct ItemStream<T> {
    inner: Inner<T>,
}

enum Inner<T> {
    Once(Option<T>),
    Iter(std::vec::IntoIter<T>),
    Stream(BoxStream<T>),
}

impl<T: Send + 'static> ItemStream<T> {
    /// A single item (the worker's iteration yields it and ends).
    pub fn once(item: T) -> Self {
        ItemStream {
            inner: Inner::Once(Some(item)),
        }
    }

    /// These items, in order.
    pub fn iter(items: impl IntoIterator<Item = T>) -> Self {
        ItemStream {
            inner: Inner::Iter(items.into_iter().collect::<Vec<_>>().into_iter()),
        }
    }

    /// The items of a stream, produced as the worker consumes them (backpressure: the stream
    /// is polled only while the worker has credit).
    pub fn new(stream: impl Stream<Item = Result<T, CallbackError>> + Send + 'static) -> Self {
        ItemStream {
            inner: Inner::Stream(Box::pin(stream)),
        }
    }

    /// No items.
    pub fn empty() -> Self {
        Self::iter(Vec::new())
    }

    /// Its one item, if it was made by [`ItemStream::once`].
    pub(crate) fn into_once(self) -> Result<T, Self> {
        match self.inner {
            Inner::Once(Some(item)) => Ok(item),
            inner => Err(ItemStream { inner }),
        }
    }
}

impl<T> Unpin for ItemStream<T> {}

impl<T> Stream for ItemStream<T> {
    type Item = Result<T, CallbackError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match &mut self.get_mut().inner {
            Inner::Once(item) => Poll::Ready(item.take().map(Ok)),
            Inner::Iter(items) => Poll::Ready(items.next().map(Ok)),
            Inner::Stream(s) => s.as_mut().poll_next(cx),
        }
    }
}

/// An encoded item of a callback's answer, or its error.
pub(crate) type EncodedStream = ItemStream<Vec<u8>>;

/// A handler behind its type: decodes the request and encodes the items.
pub(crate) trait ErasedHandler: Send + Sync {
    fn call(
        self: Arc<Self>,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<EncodedStream, CallbackError>> + Send>>;
}

struct Typed<H>(H);

impl<H: CallbackHandler> ErasedHandler for Typed<H> {
    fn call(
        self: Arc<Self>,
        body: Vec<u8>,
    ) -> Pin<Box<dyn Future<Output = Result<EncodedStream, CallbackError>> + Send>> {
        Box::pin(async move {
            let (_, req, _): (IgnoredAny, H::Request, IgnoredAny) =
                crate::serde_py::from_wire(&body).map_err(|e| {
                    CallbackError::new("TypeError", format!("the callback's request: {e}"))
                })?;
            let items = self.0.handle(req).await?;
            Ok(match items.into_once() {
                // One item stays one: the pool sends it as a single final ITEM.
                Ok(item) => ItemStream::once(encode_item(&item)?),
                Err(items) => ItemStream::new(Encode { items }),
            })
        })
    }
}

fn encode_item<T: Serialize>(item: &T) -> Result<Vec<u8>, CallbackError> {
    crate::serde_py::to_wire(item)
        .map_err(|e| CallbackError::new("TypeError", format!("the callback's item: {e}")))
}

struct Encode<T> {
    items: ItemStream<T>,
}

impl<T: Serialize> Stream for Encode<T> {
    type Item = Result<Vec<u8>, CallbackError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = self.get_mut();
        match Pin::new(&mut me.items).poll_next(cx) {
            Poll::Ready(Some(Ok(item))) => Poll::Ready(Some(encode_item(&item))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The handlers of a pool, by path.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    handlers: Vec<(String, Arc<dyn ErasedHandler>)>,
}

impl Registry {
    pub fn add<H: CallbackHandler>(&mut self, path: &str, handler: H) -> Result<(), String> {
        validate_path(path)?;
        if self.get(path).is_some() {
            return Err(format!("callback path {path:?} is already registered"));
        }
        self.handlers
            .push((path.to_string(), Arc::new(Typed(handler))));
        Ok(())
    }

    pub fn get(&self, path: &str) -> Option<Arc<dyn ErasedHandler>> {
        self.handlers
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
    }

    pub fn paths(&self) -> Vec<&str> {
        self.handlers.iter().map(|(p, _)| p.as_str()).collect()
    }
}

/// Names a callback module may not take: `kameo.<module>` must not shadow kameo's own API
/// (the Python parent's list).
const RESERVED: [&str; 7] = [
    "errors",
    "pool",
    "callbacks",
    "callback_handle",
    "current_traceparent",
    "encode",
    "decode",
];

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

fn validate_path(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.len() != 2 || !parts.iter().all(|p| is_identifier(p)) {
        return Err(format!(
            "callback path must be 'module.Type' (two identifiers), got {path:?}"
        ));
    }
    if RESERVED.contains(&parts[0]) || parts[0].starts_with('_') {
        return Err(format!(
            "callback path {path:?}: module name {:?} is reserved by kameo",
            parts[0]
        ));
    }
    Ok(())
}
