//! The host against real Python workers: asks, streams, callbacks, errors, crashes, timeouts,
//! close, start-up failures, traceparents, stats, and no process left behind.
//!
//! The workers run `tests/workers/hostw.py` (put on the workers' `PYTHONPATH`); the
//! interpreter is `KAMEO_TEST_PYTHON` (set by `make test`), with kameo importable. Without it
//! the tests print a notice and pass. Every test is bounded by `DEADLINE`.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kameo_host::{
    CallOptions, CallbackError, CallbackHandler, Error, ItemStream, Pool, PoolBuilder, Value,
    WorkerStream,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// Every test finishes within this, or fails.
const DEADLINE: Duration = Duration::from_secs(60);

/// The variable that makes `orphan_child_process` (run in a child process by
/// `no_orphan_after_host_sigkill`) start its pool; its value is the file to report pids in.
const ORPHAN_ENV: &str = "KAMEO_HOST_TEST_ORPHAN_OUT";

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

// ------------------------------------------------------------------------------ helpers

/// The interpreter, or None (with a notice) when KAMEO_TEST_PYTHON is not set.
fn python() -> Option<String> {
    match std::env::var("KAMEO_TEST_PYTHON") {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            println!("KAMEO_TEST_PYTHON is not set: skipping the tests through Python workers");
            None
        }
    }
}

fn workers_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/workers").to_string()
}

/// A builder for a pool running `hostw:<function>`, or None without an interpreter.
fn builder(function: &str) -> Option<PoolBuilder> {
    let py = python()?;
    Some(
        Pool::builder(&format!("hostw:{function}"))
            .python(py)
            .env("PYTHONPATH", workers_dir()),
    )
}

/// Run `f` within `DEADLINE`.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("the test did not finish within its deadline")
}

/// Wait (at most `within`) until `cond` holds; whether it did.
async fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A directory of the test's own, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kameo-host-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn file(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `kill(pid, 0)` fails with ESRCH: no such process (not even a zombie).
fn pid_gone(pid: u32) -> bool {
    // SAFETY: a plain syscall; signal 0 only checks.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// The process exists and is not a zombie (for processes that are not our children, whose
/// reaping is up to whoever inherited them).
fn pid_alive(pid: u32) -> bool {
    if pid_gone(pid) {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: a plain syscall.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn worker_pids(pool: &Pool) -> Vec<u32> {
    pool.workers().iter().map(|w| w.pid).collect()
}

/// Wait until `path` exists and holds something; its contents.
async fn read_when_written(path: &str, within: Duration) -> String {
    let p = Path::new(path);
    assert!(
        wait_until(within, || p.exists()).await,
        "{path} was not written within {within:?}"
    );
    std::fs::read_to_string(p).unwrap()
}

// ------------------------------------------------------------------------------ callbacks

#[derive(Deserialize)]
struct FetchReq {
    symbol: String,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Tick {
    symbol: String,
    price: f64,
}

/// Sets its flag when dropped: the host dropped the stream that owns it.
struct DropGuard(Arc<AtomicBool>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// `trading.DataFetch`: what it answers depends on the symbol.
#[derive(Clone, Default)]
struct DataFetch {
    /// The ENDLESS stream was dropped.
    dropped: Arc<AtomicBool>,
    /// Items the ENDLESS stream produced.
    produced: Arc<AtomicUsize>,
    /// Calls served.
    calls: Arc<AtomicUsize>,
}

impl CallbackHandler for DataFetch {
    type Request = FetchReq;
    type Item = Tick;

    async fn handle(&self, req: FetchReq) -> Result<ItemStream<Tick>, CallbackError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let sym = req.symbol.clone();
        let tick = move |price: f64| Tick {
            symbol: sym.clone(),
            price,
        };
        match req.symbol.as_str() {
            "ONE" => Ok(ItemStream::once(tick(1.5))),
            "LIST" => Ok(ItemStream::iter(vec![tick(1.0), tick(2.0), tick(3.0)])),
            "EMPTY" => Ok(ItemStream::empty()),
            // A real stream: each item after an await.
            "STREAM" => Ok(ItemStream::new(futures::stream::unfold(0u32, move |i| {
                let tick = tick.clone();
                async move {
                    if i == 5 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Some((Ok(tick(f64::from(i))), i + 1))
                }
            }))),
            "ENDLESS" => {
                let state = (0u64, DropGuard(self.dropped.clone()), self.produced.clone());
                Ok(ItemStream::new(futures::stream::unfold(
                    state,
                    move |(i, guard, produced)| {
                        let tick = tick.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            produced.fetch_add(1, Ordering::SeqCst);
                            Some((Ok(tick(i as f64)), (i + 1, guard, produced)))
                        }
                    },
                )))
            }
            "BAD" => Err(CallbackError::new("ValueError", "no such symbol: BAD")),
            // Two items, then an error.
            "HALF" => Ok(ItemStream::new(futures::stream::iter(vec![
                Ok(tick(1.0)),
                Ok(tick(2.0)),
                Err(CallbackError::new("KeyError", "half of the ticks")),
            ]))),
            other => Err(CallbackError::msg(format!("unknown symbol {other}"))),
        }
    }
}

// ------------------------------------------------------------------------------ asks

#[derive(Serialize)]
struct AddMsg {
    a: i64,
    b: i64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Order {
    symbol: String,
    qty: u32,
    price: f64,
    tags: Vec<String>,
    note: Option<String>,
    filled: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_round_trip_typed() {
    let Some(b) = builder("add") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        assert_eq!(pool.target(), "hostw:add");
        let r: i64 = pool.ask(&AddMsg { a: 40, b: 2 }).await.unwrap();
        assert_eq!(r, 42);
        let r: i64 = pool
            .ask(&AddMsg {
                a: i64::MAX - 1,
                b: 1,
            })
            .await
            .unwrap();
        assert_eq!(r, i64::MAX);
        pool.close().await.unwrap();

        let pool = builder("echo").unwrap().start().await.unwrap();
        let order = Order {
            symbol: "ACME".into(),
            qty: 5,
            price: 12.25,
            tags: vec!["a".into(), "ü€".into()],
            note: None,
            filled: true,
        };
        let back: Order = pool.ask(&order).await.unwrap();
        assert_eq!(back, order);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_round_trip_untyped() {
    let Some(b) = builder("call") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        // serde_json::Value in and out.
        let r: serde_json::Value = pool
            .ask(&("add", serde_json::json!({"a": 1, "b": 2})))
            .await
            .unwrap();
        assert_eq!(r, serde_json::json!(3));
        let doc = serde_json::json!({
            "s": "text", "n": [1, -2, 2.5, null, true], "m": {"k": {"deep": []}}
        });
        let back: serde_json::Value = pool.ask(&("echo", &doc)).await.unwrap();
        assert_eq!(back, doc);

        // kameo_host::Value in and out, with types JSON has not.
        let v = Value::Dict(vec![
            (Value::from("a"), Value::Int(1)),
            (Value::from("b"), Value::Int(2)),
        ]);
        let r: Value = pool.ask(&("add", &v)).await.unwrap();
        assert_eq!(r, Value::Int(3));
        let v = Value::List(vec![
            Value::None,
            Value::Bool(false),
            Value::Float(-0.5),
            Value::from(i128::MAX),
            Value::Bytes(vec![0, 255, 7]),
            Value::Tuple(vec![Value::from("x"), Value::Int(-7)]),
            Value::Dict(vec![(Value::Int(5), Value::from("five"))]),
        ]);
        let back: Value = pool.ask(&("echo", &v)).await.unwrap();
        assert_eq!(back, v);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answers_come_through_shared_memory() {
    let Some(b) = builder("blobs") else { return };
    let pattern = |n: usize| (0..n).map(|i| (i % 256) as u8).collect::<Vec<u8>>();
    bounded(async {
        // Frames of at most 1 MiB: 3 MiB of answer only fit through shared memory.
        let pool = b
            .max_frame_bytes(1 << 20)
            .shm_threshold(Some(64 << 10))
            .start()
            .await
            .unwrap();
        let sizes = [3 << 20, 100, (1 << 20) + 7];
        let back: Vec<serde_bytes::ByteBuf> = pool.ask(&sizes).await.unwrap();
        assert_eq!(back.len(), 3);
        for (buf, n) in back.iter().zip(sizes) {
            assert_eq!(buf.len(), n);
            assert!(buf.as_slice() == pattern(n).as_slice(), "{n} bytes differ");
        }
        let back: Value = pool.ask(&[2 << 20]).await.unwrap();
        assert_eq!(back, Value::List(vec![Value::Bytes(pattern(2 << 20))]));
        pool.close().await.unwrap();

        // Without shared memory the same answer is too large for a frame: a typed error,
        // and the worker still serves.
        let pool = builder("blobs")
            .unwrap()
            .max_frame_bytes(1 << 20)
            .shm_threshold(None)
            .start()
            .await
            .unwrap();
        let err = pool.ask::<_, Value>(&[3 << 20]).await.unwrap_err();
        assert!(
            matches!(&err, Error::Protocol { message } if message.contains("max_frame_bytes")),
            "{err:?}"
        );
        let back: Vec<serde_bytes::ByteBuf> = pool.ask(&[10]).await.unwrap();
        assert_eq!(back[0].as_slice(), pattern(10).as_slice());
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_asks_on_two_workers() {
    let Some(b) = builder("whoami") else { return };
    bounded(async {
        let pool = b.size(2).start().await.expect("the pool starts");
        let workers = pool.workers();
        assert_eq!(workers.len(), 2, "{workers:?}");
        assert!(workers.iter().all(|w| w.ready), "{workers:?}");
        let pids: BTreeSet<u32> = workers.iter().map(|w| w.pid).collect();
        assert_eq!(pids.len(), 2);

        let answers: Vec<Result<(u32, u64), Error>> =
            futures::future::join_all((0..100u64).map(|i| {
                let pool = &pool;
                async move { pool.ask(&i).await }
            }))
            .await;
        let mut seen = BTreeSet::new();
        for (i, a) in answers.into_iter().enumerate() {
            let (pid, x) = a.unwrap_or_else(|e| panic!("ask {i}: {e}"));
            assert_eq!(x, i as u64, "ask {i} got another ask's answer");
            seen.insert(pid);
        }
        assert_eq!(seen, pids, "both workers serve");
        // Clones share the pool.
        let other = pool.clone();
        let (pid, x): (u32, String) = other.ask(&"clone").await.unwrap();
        assert_eq!(x, "clone");
        assert!(pids.contains(&pid));
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_timeout_on_a_sync_handler_and_the_pool_serves_after() {
    let Some(b) = builder("call") else { return };
    bounded(async {
        let pool = b
            .cancel_grace(Duration::from_millis(500))
            .start()
            .await
            .expect("the pool starts");
        let t0 = Instant::now();
        let r: Result<f64, Error> = pool
            .ask_with(&("sleep", 30.0), Some(Duration::from_millis(300)))
            .await;
        let took = t0.elapsed();
        match r {
            Err(Error::Timeout { after }) => assert_eq!(after, Duration::from_millis(300)),
            other => panic!("expected Error::Timeout, got {other:?}"),
        }
        assert!(
            took < Duration::from_secs(5),
            "the timeout came after {took:?}"
        );
        // time.sleep does not see the cancel: the worker is killed after cancel_grace and
        // replaced; the pool serves again either way.
        let r: String = pool.ask(&("echo", "after")).await.unwrap();
        assert_eq!(r, "after");
        // ask_opts with a timeout, too.
        let r: Result<f64, Error> = pool
            .ask_opts(
                &("sleep", 30.0),
                CallOptions::new().timeout(Duration::from_millis(200)),
            )
            .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        let r: i64 = pool.ask(&("echo", 5)).await.unwrap();
        assert_eq!(r, 5);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_timeout_on_an_async_handler_keeps_the_worker() {
    let Some(b) = builder("acall") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let pid = worker_pids(&pool)[0];
        let r: Result<f64, Error> = pool
            .ask_with(&("asleep", 30.0), Some(Duration::from_millis(200)))
            .await;
        assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
        let r: f64 = pool.ask(&("asleep", 0.01)).await.unwrap();
        assert_eq!(r, 0.01);
        // The cancel reached the coroutine: its worker did not have to be killed.
        let now: u32 = pool.ask(&("pid", ())).await.unwrap();
        assert_eq!(
            now, pid,
            "the worker was replaced after a cancelled async call"
        );
        // A timeout that is not reached changes nothing.
        let r: f64 = pool
            .ask_with(&("asleep", 0.01), Some(Duration::from_secs(20)))
            .await
            .unwrap();
        assert_eq!(r, 0.01);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_does_not_decode_is_a_serialization_error() {
    let Some(b) = builder("echo") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let r: Result<i64, Error> = pool.ask(&"not a number").await;
        match r {
            Err(Error::Serialization { path, message }) => {
                assert_eq!(path, "$");
                assert!(!message.is_empty());
            }
            other => panic!("expected Error::Serialization, got {other:?}"),
        }
        let r: String = pool.ask(&"fine").await.unwrap();
        assert_eq!(r, "fine");
        pool.close().await.unwrap();
    })
    .await;
}

// ------------------------------------------------------------------------------ streams

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_of_a_thousand_items_in_order() {
    let Some(b) = builder("count") else { return };
    bounded(async {
        let pool = b.stream_window(16).start().await.expect("the pool starts");
        let s: WorkerStream<i64> = pool.stream(&1000).await.unwrap();
        let items: Vec<i64> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(items, (0..1000).collect::<Vec<_>>());
        // An empty stream ends at once.
        let mut s: WorkerStream<i64> = pool.stream(&0).await.unwrap();
        assert!(s.next().await.is_none());
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_keeps_the_socket_full_is_read_to_the_end() {
    // Items each with a shared-memory segment (a descriptor per frame: one frame per
    // recvmsg), sent as fast as the worker can with a wide window: the driver's read turns
    // run out of budget with more to read, turn after turn. It must go on reading (a driver
    // that stopped would leave the stream waiting until the heartbeat timeout killed the
    // worker).
    let Some(b) = builder("big_items") else {
        return;
    };
    bounded(async {
        let pool = b
            .shm_threshold(Some(64))
            .stream_window(1024)
            .heartbeat_timeout(Duration::from_secs(3))
            .start()
            .await
            .unwrap();
        for round in 0..3 {
            let s: WorkerStream<serde_bytes::ByteBuf> = pool.stream(&(3000, 100)).await.unwrap();
            let items: Vec<serde_bytes::ByteBuf> = s.map(|r| r.unwrap()).collect().await;
            assert_eq!(items.len(), 3000, "round {round}");
            for (i, item) in items.iter().enumerate() {
                assert_eq!(item.len(), 100);
                assert!(item.iter().all(|&b| b == (i % 256) as u8), "item {i}");
            }
        }
        assert_eq!(pool.stats().crashes, 0);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_error_after_items() {
    let Some(b) = builder("count_then_fail") else {
        return;
    };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let mut s: WorkerStream<i64> = pool.stream(&3).await.unwrap();
        for i in 0..3 {
            assert_eq!(s.next().await.unwrap().unwrap(), i);
        }
        match s.next().await {
            Some(Err(e)) => {
                assert!(e.is_remote("ValueError"), "{e:?}");
                assert!(e.to_string().contains("failed after 3 items"), "{e}");
            }
            other => panic!("expected the generator's ValueError, got {other:?}"),
        }
        assert!(s.next().await.is_none(), "the stream ends after its error");
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_endless_stream_cancels_it_in_the_worker() {
    let Some(b) = builder("endless") else { return };
    let dir = TempDir::new("endless");
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let pid = worker_pids(&pool)[0];
        for round in 0..2 {
            let path = dir.file(&format!("finally-{round}"));
            let mut s: WorkerStream<i64> = pool.stream(&path).await.unwrap();
            for i in 0..5 {
                assert_eq!(s.next().await.unwrap().unwrap(), i);
            }
            drop(s);
            let text = read_when_written(&path, Duration::from_secs(10)).await;
            // The generator's finally ran in the pool's worker, which lives on.
            assert_eq!(text.trim(), format!("finally {pid}"), "round {round}");
            assert_eq!(worker_pids(&pool), vec![pid]);
        }
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_traceparent() {
    let Some(b) = builder("trace_gen") else {
        return;
    };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let s: WorkerStream<Option<String>> = pool
            .stream_opts(&3, CallOptions::new().traceparent(TRACEPARENT))
            .await
            .unwrap();
        let seen: Vec<Option<String>> = s.map(|r| r.unwrap()).collect().await;
        assert_eq!(seen, vec![Some(TRACEPARENT.to_string()); 3]);
        pool.close().await.unwrap();
    })
    .await;
}

// ------------------------------------------------------------------------------ callbacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_single_item_list_and_stream() {
    let Some(b) = builder("acall") else { return };
    bounded(async {
        let handler = DataFetch::default();
        let calls = handler.calls.clone();
        let pool = b
            .size(2)
            .callback("trading.DataFetch", handler)
            .start()
            .await
            .expect("the pool starts");
        let r: Vec<f64> = pool.ask(&("fetch", "ONE")).await.unwrap();
        assert_eq!(r, vec![1.5]);
        let r: Vec<f64> = pool.ask(&("fetch", "LIST")).await.unwrap();
        assert_eq!(r, vec![1.0, 2.0, 3.0]);
        let r: Vec<f64> = pool.ask(&("fetch", "EMPTY")).await.unwrap();
        assert_eq!(r, Vec::<f64>::new());
        let r: Vec<f64> = pool.ask(&("fetch", "STREAM")).await.unwrap();
        assert_eq!(r, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        // `async for` in an async handler.
        let r: Vec<f64> = pool.ask(&("afetch", "STREAM")).await.unwrap();
        assert_eq!(r, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        // Many at once, from both workers.
        let answers: Vec<Result<Vec<f64>, Error>> = futures::future::join_all((0..20).map(|i| {
            let pool = &pool;
            let f = if i % 2 == 0 { "fetch" } else { "afetch" };
            async move { pool.ask(&(f, "STREAM")).await }
        }))
        .await;
        for a in answers {
            assert_eq!(a.unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 25);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_breaking_out_of_a_callback_drops_the_host_stream() {
    let Some(b) = builder("fetch_first") else {
        return;
    };
    bounded(async {
        let handler = DataFetch::default();
        let dropped = handler.dropped.clone();
        let produced = handler.produced.clone();
        let pool = b
            .stream_window(8)
            .callback("trading.DataFetch", handler)
            .start()
            .await
            .expect("the pool starts");
        let first: Tick = pool.ask(&"ENDLESS").await.unwrap();
        assert_eq!(
            first,
            Tick {
                symbol: "ENDLESS".into(),
                price: 0.0
            }
        );
        assert!(
            wait_until(Duration::from_secs(10), || dropped.load(Ordering::SeqCst)).await,
            "the host's stream was not dropped after the worker stopped iterating \
             ({} items produced)",
            produced.load(Ordering::SeqCst)
        );
        let n = produced.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(produced.load(Ordering::SeqCst), n, "the stream still runs");
        // The pool serves on.
        let again: Tick = pool.ask(&"ONE").await.unwrap();
        assert_eq!(again.price, 1.5);
        pool.close().await.unwrap();
    })
    .await;
}

#[derive(Deserialize, Debug)]
struct Caught {
    #[serde(rename = "type")]
    type_name: Option<String>,
    #[serde(default)]
    is_value_error: bool,
    #[serde(default)]
    is_remote_error: bool,
    #[serde(default)]
    mro: Vec<String>,
    #[serde(default)]
    message: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_error_is_raised_in_the_worker() {
    let Some(b) = builder("fetch_error") else {
        return;
    };
    bounded(async {
        let pool = b
            .callback("trading.DataFetch", DataFetch::default())
            .start()
            .await
            .expect("the pool starts");
        let c: Caught = pool.ask(&"BAD").await.unwrap();
        assert!(c.type_name.is_some(), "the worker saw no error: {c:?}");
        assert!(c.is_value_error, "not a ValueError in the worker: {c:?}");
        assert!(
            c.is_remote_error,
            "not a kameo.RemoteError in the worker: {c:?}"
        );
        assert!(c.message.contains("no such symbol: BAD"), "{c:?}");

        // An error after two items: a KeyError.
        let c: Caught = pool.ask(&"HALF").await.unwrap();
        assert!(c.mro.iter().any(|t| t == "KeyError"), "{c:?}");
        assert!(!c.is_value_error, "{c:?}");
        assert!(c.message.contains("half of the ticks"), "{c:?}");

        // CallbackError::msg: a RuntimeError.
        let c: Caught = pool.ask(&"NOPE").await.unwrap();
        assert!(c.mro.iter().any(|t| t == "RuntimeError"), "{c:?}");
        assert!(c.message.contains("unknown symbol NOPE"), "{c:?}");
        pool.close().await.unwrap();
    })
    .await;
}

// ------------------------------------------------------------------------------ errors

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_exception_is_a_remote_error() {
    let Some(b) = builder("fail") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let w = pool.workers().remove(0);
        let err = pool
            .ask::<_, Value>(&"bad input 7")
            .await
            .expect_err("fail raises");
        match &err {
            Error::Remote {
                type_name,
                message,
                traceback,
                worker_id,
                pid,
            } => {
                assert!(type_name.ends_with("ValueError"), "{type_name}");
                assert_eq!(message, "bad input 7");
                assert!(traceback.contains("in fail"), "{traceback}");
                assert!(traceback.contains("ValueError"), "{traceback}");
                assert_eq!(*worker_id, w.id);
                assert_eq!(*pid, w.pid);
            }
            other => panic!("expected Error::Remote, got {other:?}"),
        }
        assert!(err.is_remote("ValueError"));
        assert!(err.is_remote("builtins.ValueError"));
        assert!(!err.is_remote("KeyError"));
        assert_eq!(err.worker_id(), Some(w.id));
        assert!(err.to_string().contains("bad input 7"), "{err}");
        // A handler's exception does not cost the worker.
        let err = pool.ask::<_, Value>(&"again").await.unwrap_err();
        assert!(
            matches!(&err, Error::Remote { pid, .. } if *pid == w.pid),
            "{err:?}"
        );
        assert_eq!(worker_pids(&pool), vec![w.pid]);
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_worker_is_reported_and_replaced() {
    let Some(b) = builder("call") else { return };
    let dir = TempDir::new("sigkill");
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let w = pool.workers().remove(0);
        let mark = dir.file("started");
        let p = pool.clone();
        let m = mark.clone();
        let call = tokio::spawn(async move { p.ask::<_, f64>(&("sleep_marked", (m, 5.0))).await });
        let started: u32 = read_when_written(&mark, Duration::from_secs(20))
            .await
            .parse()
            .unwrap();
        assert_eq!(started, w.pid);
        kill(w.pid, libc::SIGKILL);
        let r = call.await.unwrap();
        match r {
            Err(Error::WorkerCrashed {
                worker_id,
                pid,
                exit_code,
                signal,
                ..
            }) => {
                assert_eq!(worker_id, w.id);
                assert_eq!(pid, w.pid);
                assert_eq!(signal, Some(9));
                assert_eq!(exit_code, None);
            }
            other => panic!("expected Error::WorkerCrashed, got {other:?}"),
        }
        // A new worker takes its place.
        let replaced = wait_until(Duration::from_secs(30), || {
            let ws = pool.workers();
            ws.len() == 1 && ws[0].ready && ws[0].pid != w.pid
        })
        .await;
        assert!(replaced, "not replaced: {:?}", pool.workers());
        let new_pid = worker_pids(&pool)[0];
        let now: u32 = pool.ask(&("pid", ())).await.unwrap();
        assert_eq!(now, new_pid);
        assert!(pool.stats().crashes >= 1, "{:?}", pool.stats());
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_exit_code_is_reported() {
    let Some(b) = builder("call") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let w = pool.workers().remove(0);
        let r: Result<Value, Error> = pool.ask(&("die", 3)).await;
        match r {
            Err(Error::WorkerCrashed {
                worker_id,
                pid,
                exit_code,
                signal,
                ..
            }) => {
                assert_eq!((worker_id, pid), (w.id, w.pid));
                assert_eq!(exit_code, Some(3));
                assert_eq!(signal, None);
            }
            other => panic!("expected Error::WorkerCrashed, got {other:?}"),
        }
        let r: String = pool.ask(&("echo", "alive")).await.unwrap();
        assert_eq!(r, "alive");
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_carries_the_stderr_tail() {
    let Some(b) = builder("stderr_then_die") else {
        return;
    };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let err = pool.ask::<_, Value>(&()).await.unwrap_err();
        match &err {
            Error::WorkerCrashed {
                exit_code,
                stderr_tail,
                ..
            } => {
                assert_eq!(*exit_code, Some(7));
                assert!(
                    stderr_tail
                        .iter()
                        .any(|l| l.contains("hostw: about to exit with code 7")),
                    "{stderr_tail:?}"
                );
                assert!(
                    stderr_tail
                        .iter()
                        .any(|l| l.contains("hostw stderr line 0")),
                    "{stderr_tail:?}"
                );
            }
            other => panic!("expected Error::WorkerCrashed, got {other:?}"),
        }
        assert!(
            err.to_string().contains("about to exit with code 7"),
            "{err}"
        );
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_worker_is_killed_by_the_heartbeat() {
    let Some(b) = builder("call") else { return };
    let dir = TempDir::new("heartbeat");
    bounded(async {
        let pool = b
            .heartbeat_interval(Duration::from_millis(100))
            .heartbeat_timeout(Duration::from_millis(1500))
            .start()
            .await
            .expect("the pool starts");
        let w = pool.workers().remove(0);
        let mark = dir.file("started");
        let p = pool.clone();
        let m = mark.clone();
        let call = tokio::spawn(async move { p.ask::<_, f64>(&("sleep_marked", (m, 30.0))).await });
        read_when_written(&mark, Duration::from_secs(20)).await;
        kill(w.pid, libc::SIGSTOP);
        let t0 = Instant::now();
        let r = call.await.unwrap();
        let took = t0.elapsed();
        if !pid_gone(w.pid) {
            kill(w.pid, libc::SIGCONT);
        }
        match r {
            Err(Error::WorkerCrashed { pid, .. }) => assert_eq!(pid, w.pid),
            other => panic!("expected Error::WorkerCrashed, got {other:?}"),
        }
        assert!(took < Duration::from_secs(15), "noticed after {took:?}");
        let r: i64 = pool.ask(&("echo", 1)).await.unwrap();
        assert_eq!(r, 1);
        pool.close().await.unwrap();
    })
    .await;
}

// ------------------------------------------------------------------------------ close

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_work_in_flight() {
    let Some(b) = builder("call") else { return };
    let dir = TempDir::new("close");
    bounded(async {
        let pool = b.size(2).start().await.expect("the pool starts");
        let pids = worker_pids(&pool);
        let marks: Vec<String> = (0..2).map(|i| dir.file(&format!("started-{i}"))).collect();
        let mut started = Vec::new();
        for m in &marks {
            let p = pool.clone();
            let m = m.clone();
            started.push(tokio::spawn(async move {
                p.ask::<_, f64>(&("sleep_marked", (m, 0.5))).await
            }));
        }
        let mut queued = Vec::new();
        for _ in 0..4 {
            let p = pool.clone();
            queued.push(tokio::spawn(async move {
                p.ask::<_, f64>(&("sleep", 0.5)).await
            }));
        }
        for m in &marks {
            read_when_written(m, Duration::from_secs(20)).await;
        }
        pool.close().await.expect("close returns Ok");
        // Calls that had started finish within close_grace (5 s by default).
        for t in started {
            assert_eq!(t.await.unwrap().expect("a started call completes"), 0.5);
        }
        // The others complete or fail; none is left waiting.
        for t in queued {
            match t.await.unwrap() {
                Ok(x) => assert_eq!(x, 0.5),
                Err(e) => println!("a queued call failed at close: {e}"),
            }
        }
        for pid in &pids {
            assert!(pid_gone(*pid), "worker {pid} is still there after close");
        }
        let r: Result<Value, Error> = pool.ask(&("echo", 1)).await;
        assert!(matches!(r, Err(Error::Closed)), "{r:?}");
        let r = pool.stream::<_, Value>(&("echo", 1)).await;
        assert!(matches!(r, Err(Error::Closed)), "stream after close");
        // Closing again is harmless.
        let _ = pool.close().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_kills_and_reaps_the_workers() {
    let Some(b) = builder("echo") else { return };
    bounded(async {
        let pool = b.size(2).start().await.expect("the pool starts");
        let pids = worker_pids(&pool);
        let r: i64 = pool.ask(&1).await.unwrap();
        assert_eq!(r, 1);
        let clone = pool.clone();
        drop(pool);
        let r: i64 = clone.ask(&2).await.unwrap();
        assert_eq!(r, 2, "a clone keeps the pool");
        drop(clone);
        let gone = wait_until(Duration::from_secs(5), || pids.iter().all(|p| pid_gone(*p))).await;
        assert!(
            gone,
            "workers left (or not reaped) after the last handle was dropped: {pids:?}"
        );
    })
    .await;
}

// ------------------------------------------------------------------------------ start-up

async fn startup_error(b: PoolBuilder) -> (Error, Duration) {
    let t0 = Instant::now();
    let r = b.startup_timeout(Duration::from_secs(30)).start().await;
    let took = t0.elapsed();
    match r {
        Err(e) => (e, took),
        Ok(pool) => {
            let _ = pool.close().await;
            panic!("the pool started")
        }
    }
}

fn startup_text(e: &Error) -> String {
    match e {
        Error::Startup {
            message,
            traceback,
            stderr_tail,
            ..
        } => format!("{message}\n{traceback}\n{}", stderr_tail.join("\n")),
        other => panic!("expected Error::Startup, got {other:?}"),
    }
}

/// A start-up error names the worker's pid, and that process is gone (killed and reaped).
async fn assert_failed_worker_gone(e: &Error) {
    let Error::Startup { pid: Some(pid), .. } = *e else {
        panic!("the start-up error names no pid: {e:?}");
    };
    assert!(
        wait_until(Duration::from_secs(5), || pid_gone(pid)).await,
        "the worker {pid} that failed to start is still there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_error_when_the_target_does_not_import() {
    let Some(py) = python() else { return };
    bounded(async {
        let b = Pool::builder("hostw_broken:handler")
            .python(py)
            .env("PYTHONPATH", workers_dir())
            .size(2);
        let (e, took) = startup_error(b).await;
        let text = startup_text(&e);
        assert!(text.contains("hostw_missing_dependency"), "{text}");
        assert!(
            text.contains("ModuleNotFoundError") || text.contains("ImportError"),
            "{text}"
        );
        assert!(e.to_string().contains("hostw_missing_dependency"), "{e}");
        assert!(
            took < Duration::from_secs(15),
            "the error came after {took:?}"
        );
        assert_failed_worker_gone(&e).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_error_for_a_missing_module_or_function() {
    let Some(py) = python() else { return };
    bounded(async {
        let b = Pool::builder("hostw_no_such_module:f")
            .python(py.clone())
            .env("PYTHONPATH", workers_dir());
        let (e, took) = startup_error(b).await;
        let text = startup_text(&e);
        assert!(text.contains("hostw_no_such_module"), "{text}");
        assert!(
            took < Duration::from_secs(15),
            "the error came after {took:?}"
        );
        assert_failed_worker_gone(&e).await;

        let (e, took) = startup_error(builder("no_such_function").unwrap()).await;
        let text = startup_text(&e);
        assert!(text.contains("no_such_function"), "{text}");
        assert!(
            took < Duration::from_secs(15),
            "the error came after {took:?}"
        );
        assert_failed_worker_gone(&e).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_error_for_a_missing_interpreter() {
    let Some(b) = builder("echo") else { return };
    bounded(async {
        let (e, took) = startup_error(b.python("/nonexistent/bin/python3")).await;
        let text = startup_text(&e);
        assert!(
            text.contains("/nonexistent/bin/python3") || e.to_string().contains("/nonexistent"),
            "the error does not name the interpreter: {e}"
        );
        assert!(
            took < Duration::from_secs(10),
            "the error came after {took:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_timeout_when_the_import_hangs() {
    let Some(py) = python() else { return };
    bounded(async {
        let t0 = Instant::now();
        let r = Pool::builder("hostw_hang:handler")
            .python(py)
            .env("PYTHONPATH", workers_dir())
            .startup_timeout(Duration::from_millis(1000))
            .start()
            .await;
        let took = t0.elapsed();
        let e = match r {
            Err(e) => e,
            Ok(_) => panic!("a worker whose import hangs became ready"),
        };
        assert!(matches!(e, Error::Startup { .. }), "{e:?}");
        assert!(
            took < Duration::from_secs(6),
            "startup_timeout=1s, error after {took:?}"
        );
        assert_failed_worker_gone(&e).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_builder_options_are_startup_errors() {
    let Some(b) = builder("echo") else { return };
    bounded(async {
        let r = b
            .callback("errors.Thing", DataFetch::default())
            .start()
            .await;
        assert!(
            matches!(&r, Err(Error::Startup { message, .. }) if message.contains("reserved")),
            "{:?}",
            r.as_ref().err()
        );
        let r = builder("echo")
            .unwrap()
            .callback("nodot", DataFetch::default())
            .start()
            .await;
        assert!(matches!(r, Err(Error::Startup { .. })));
        let r = builder("echo").unwrap().size(0).start().await;
        assert!(matches!(r, Err(Error::Startup { .. })));
    })
    .await;
}

// ------------------------------------------------------------------------------ tracing, stats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_reaches_the_worker() {
    let Some(b) = builder("traceparent") else {
        return;
    };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let seen: Option<String> = pool
            .ask_opts(&(), CallOptions::new().traceparent(TRACEPARENT))
            .await
            .unwrap();
        assert_eq!(seen.as_deref(), Some(TRACEPARENT));
        // It belongs to that call only.
        let seen: Option<String> = pool.ask(&()).await.unwrap();
        assert_ne!(seen.as_deref(), Some(TRACEPARENT));
        pool.close().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_completed_errors_and_crashes() {
    let Some(b) = builder("call") else { return };
    bounded(async {
        let pool = b.start().await.expect("the pool starts");
        let s0 = pool.stats();
        assert_eq!(
            (s0.completed, s0.errors, s0.crashes, s0.retries),
            (0, 0, 0, 0),
            "{s0:?}"
        );
        for i in 0..3 {
            let r: i64 = pool.ask(&("echo", i)).await.unwrap();
            assert_eq!(r, i);
        }
        for _ in 0..2 {
            let r: Result<Value, Error> = pool.ask(&("fail", "x")).await;
            assert!(r.unwrap_err().is_remote("ValueError"));
        }
        let r: Result<Value, Error> = pool.ask(&("die", 3)).await;
        assert!(matches!(r, Err(Error::WorkerCrashed { .. })), "{r:?}");
        let s = pool.stats();
        assert_eq!(s.errors, 2, "{s:?}");
        assert_eq!(s.crashes, 1, "{s:?}");
        // As in the Python pool, `completed` counts the requests a worker answered, with a
        // value or an error; a host that counts values only would say 3.
        assert!(s.completed == 5 || s.completed == 3, "{s:?}");
        assert_eq!((s.queued, s.in_flight), (0, 0), "{s:?}");
        pool.close().await.unwrap();
    })
    .await;
}

// ------------------------------------------------------------------------------ no orphans

/// Not a test by itself: run by `no_orphan_after_host_sigkill` in a child process (with
/// `ORPHAN_ENV` set), it starts a pool whose worker starts a grandchild, reports both pids,
/// and waits to be killed. Without `ORPHAN_ENV` it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_child_process() {
    let Some(out) = std::env::var_os(ORPHAN_ENV) else {
        return;
    };
    let out = out.into_string().unwrap();
    let Some(b) = builder("spawn_child") else {
        return;
    };
    let pool = b.start().await.expect("the pool starts");
    let worker = worker_pids(&pool)[0];
    let grandchild_file = format!("{out}.grandchild");
    let p = pool.clone();
    let g = grandchild_file.clone();
    tokio::spawn(async move {
        let _: Result<Value, Error> = p.ask(&g).await;
    });
    let grandchild = read_when_written(&grandchild_file, Duration::from_secs(30)).await;
    let tmp = format!("{out}.tmp");
    std::fs::write(&tmp, format!("{worker} {}", grandchild.trim())).unwrap();
    std::fs::rename(&tmp, &out).unwrap();
    // The parent test SIGKILLs this process long before this ends.
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphan_after_host_sigkill() {
    let Some(py) = python() else { return };
    let dir = TempDir::new("orphan");
    let out = dir.file("pids");
    let stderr = std::fs::File::create(dir.file("stderr")).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "orphan_child_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ORPHAN_ENV, &out)
        .env("KAMEO_TEST_PYTHON", py)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("the test binary runs");
    let child_stderr = || std::fs::read_to_string(dir.file("stderr")).unwrap_or_default();
    let pids: Vec<u32> = bounded(async {
        let end = Instant::now() + Duration::from_secs(45);
        while !Path::new(&out).exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the host process ended ({status}) early:\n{}",
                    child_stderr()
                );
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the host process reported no pids:\n{}", child_stderr());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::read_to_string(&out)
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect()
    })
    .await;
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(
        pids.iter().all(|p| pid_alive(*p)),
        "worker and grandchild run: {pids:?}"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let gone = wait_until(Duration::from_secs(10), || {
        pids.iter().all(|p| !pid_alive(*p))
    })
    .await;
    let left: Vec<u32> = pids.iter().copied().filter(|p| pid_alive(*p)).collect();
    for p in &left {
        kill(*p, libc::SIGKILL); // do not leave them behind either way
    }
    assert!(
        gone,
        "alive 10 s after the host was SIGKILLed (worker, grandchild = {pids:?}): {left:?}"
    );
}

// ------------------------------------------------------------------------------ proptest

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Leaf {
    k: String,
    v: Option<f64>,
    #[serde(with = "serde_bytes")]
    b: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Nested {
    name: String,
    id: i64,
    score: f64,
    flag: bool,
    #[serde(with = "serde_bytes")]
    blob: Vec<u8>,
    tags: Vec<String>,
    maybe: Option<i64>,
    map: HashMap<String, Vec<i64>>,
    leaves: Vec<Leaf>,
    extra: Option<Leaf>,
    nested: Vec<Vec<Option<bool>>>,
}

fn finite() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("NaN is not equal to itself", |f| !f.is_nan())
}

fn leaf() -> impl Strategy<Value = Leaf> {
    (
        "\\PC{0,8}",
        proptest::option::of(finite()),
        proptest::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(|(k, v, b)| Leaf { k, v, b })
}

fn nested() -> impl Strategy<Value = Nested> {
    (
        (
            "\\PC{0,16}",
            any::<i64>(),
            finite(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec("\\PC{0,6}", 0..4),
        ),
        (
            proptest::option::of(any::<i64>()),
            proptest::collection::hash_map(
                "\\PC{0,6}",
                proptest::collection::vec(any::<i64>(), 0..4),
                0..4,
            ),
            proptest::collection::vec(leaf(), 0..3),
            proptest::option::of(leaf()),
            proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(any::<bool>()), 0..3),
                0..3,
            ),
        ),
    )
        .prop_map(
            |((name, id, score, flag, blob, tags), (maybe, map, leaves, extra, nested))| Nested {
                name,
                id,
                score,
                flag,
                blob,
                tags,
                maybe,
                map,
                leaves,
                extra,
                nested,
            },
        )
}

#[test]
fn echo_round_trip_through_a_worker_is_identity() {
    let Some(b) = builder("echo") else { return };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let pool = rt
        .block_on(async { tokio::time::timeout(DEADLINE, b.size(2).start()).await })
        .expect("the pool started in time")
        .expect("the pool starts");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 32,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&nested(), |v| {
        let back: Nested = rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(20), pool.ask(&v)).await })
            .map_err(|_| TestCaseError::fail("the echo did not come back in 20 s"))?
            .map_err(|e| TestCaseError::fail(format!("echo failed: {e}")))?;
        prop_assert_eq!(back, v);
        Ok(())
    });
    rt.block_on(async { tokio::time::timeout(DEADLINE, pool.close()).await })
        .expect("close in time")
        .unwrap();
    result.unwrap();
}
