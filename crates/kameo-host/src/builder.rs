//! [`PoolBuilder`]: setting a pool's options ([`Config`]) and starting it.

use std::time::Duration;

use crate::callbacks::CallbackHandler;
use crate::config::Config;
use crate::error::Error;
use crate::pool::Pool;

/// Builds a [`Pool`]: `Pool::builder("module:function").size(4).start().await?`.
pub struct PoolBuilder {
    cfg: Config,
    error: Option<String>,
}

impl Pool {
    /// A pool whose workers run `target` (`"module:function"`, imported in each worker).
    pub fn builder(target: &str) -> PoolBuilder {
        PoolBuilder::new(target)
    }
}

impl PoolBuilder {
    pub(crate) fn new(target: &str) -> Self {
        PoolBuilder {
            cfg: Config::new(target),
            error: None,
        }
    }

    /// Worker processes (default 1).
    pub fn size(mut self, n: usize) -> Self {
        self.cfg.size = n;
        self
    }

    /// The interpreter to run (default `python3` on `PATH`); kameo must be importable in it.
    pub fn python(mut self, path: impl Into<String>) -> Self {
        self.cfg.python = path.into();
        self
    }

    /// Set a variable in the workers' environment (which is otherwise this process's).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.cfg.env.push((key.into(), Some(value.into())));
        self
    }

    /// Remove a variable from the workers' environment.
    pub fn env_remove(mut self, key: impl Into<String>) -> Self {
        self.cfg.env.push((key.into(), None));
        self
    }

    /// The workers' working directory (default: this process's).
    pub fn cwd(mut self, dir: impl Into<String>) -> Self {
        self.cfg.cwd = Some(dir.into());
        self
    }

    /// Serve `kameo.<path>(...)` calls of the workers with `handler` (`path` is
    /// `"module.Type"`).
    pub fn callback<H: CallbackHandler>(mut self, path: &str, handler: H) -> Self {
        if let Err(e) = self.cfg.callbacks.add(path, handler) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// Calls a worker runs at once (an async handler; default 1).
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.cfg.max_concurrency = n.max(1);
        self
    }

    /// Items a stream (or a callback's answer) may run ahead of its consumer (default 256).
    pub fn stream_window(mut self, n: u32) -> Self {
        self.cfg.stream_window = n.max(1);
        self
    }

    /// Buffers (`bytes`, arrays) of at least this many bytes in a worker's answers travel in
    /// shared memory rather than through the socket (default 1 MiB, as the Python pool;
    /// `None`: always inline).
    pub fn shm_threshold(mut self, bytes: Option<u64>) -> Self {
        self.cfg.shm_threshold = bytes.map(|n| n.max(1));
        self
    }

    /// The largest frame either side sends (default 64 MiB).
    pub fn max_frame_bytes(mut self, n: usize) -> Self {
        self.cfg.max_frame_bytes = n;
        self
    }

    /// How long a worker may take to become ready (default 30 s).
    pub fn startup_timeout(mut self, d: Duration) -> Self {
        self.cfg.startup_timeout = d;
        self
    }

    /// How often workers send a heartbeat (default 1 s).
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.cfg.heartbeat_interval = d;
        self
    }

    /// A worker silent this long is killed and replaced (default 10 s).
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.cfg.heartbeat_timeout = d;
        self
    }

    /// How long a cancelled call may go on before its worker is killed (default 2 s).
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.cfg.cancel_grace = d;
        self
    }

    /// How long [`Pool::close`] waits for calls in flight (default 5 s).
    pub fn close_grace(mut self, d: Duration) -> Self {
        self.cfg.close_grace = d;
        self
    }

    /// Run a call again on another worker, up to `n` times, if its worker dies while running
    /// it (only for idempotent handlers; default 0). A call its worker never started always
    /// goes to another worker.
    pub fn retries(mut self, n: u32) -> Self {
        self.cfg.retries = n;
        self
    }

    /// The pool's name, in the workers' process titles (default `kameo`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.cfg.name = name.into();
        self
    }

    /// Forward the workers' `logging` records (INFO and above) as `tracing` events.
    pub fn forward_logs(mut self, on: bool) -> Self {
        self.cfg.forward_logs = on;
        self
    }

    /// Start every worker (concurrently) and wait until all are ready.
    pub async fn start(self) -> Result<Pool, Error> {
        if let Some(message) = self.error {
            return Err(Error::Startup {
                message,
                worker_id: None,
                pid: None,
                traceback: String::new(),
                stderr_tail: Vec::new(),
            });
        }
        if self.cfg.size == 0 {
            return Err(Error::Startup {
                message: "size must be at least 1".into(),
                worker_id: None,
                pid: None,
                traceback: String::new(),
                stderr_tail: Vec::new(),
            });
        }
        Pool::start(self.cfg).await
    }
}
