//! A pool's configuration, with the Python pool's defaults.

use std::time::Duration;

use crate::callbacks::Registry;

/// A pool's configuration (set through `Pool::builder`).
#[derive(Clone)]
pub(crate) struct Config {
    pub target: String,
    pub size: usize,
    pub python: String,
    pub env: Vec<(String, Option<String>)>,
    pub cwd: Option<String>,
    pub callbacks: Registry,
    pub max_concurrency: u32,
    pub stream_window: u32,
    pub max_frame_bytes: usize,
    pub shm_threshold: Option<u64>,
    pub startup_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub heartbeat_timeout: Duration,
    pub cancel_grace: Duration,
    pub close_grace: Duration,
    pub retries: u32,
    pub name: String,
    pub forward_logs: bool,
    pub prefetch: usize,
}

impl Config {
    pub fn new(target: &str) -> Config {
        Config {
            target: target.to_string(),
            size: 1,
            python: "python3".into(),
            env: Vec::new(),
            cwd: None,
            callbacks: Registry::default(),
            max_concurrency: 1,
            stream_window: 256,
            max_frame_bytes: 64 << 20,
            shm_threshold: Some(1 << 20),
            startup_timeout: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(1),
            heartbeat_timeout: Duration::from_secs(10),
            cancel_grace: Duration::from_secs(2),
            close_grace: Duration::from_secs(5),
            retries: 0,
            name: "kameo".into(),
            forward_logs: false,
            prefetch: 64,
        }
    }
}
