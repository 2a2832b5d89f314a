//! The store's own runtime: the ScyllaDB driver and the persisters that call it run on a few
//! threads of their own (`scylla.store_threads`, 1 by default), apart from the runtime that
//! consumes Kafka.
//!
//! Why: a CQL request passes between three tasks (the caller, the connection's writer, its
//! reader), so on a shared multi-threaded runtime each request wakes tasks parked on other
//! threads, and each such wake-up is a futex call and a context switch. On two cores that was
//! about 40% of the driver's CPU per request (`examples/driver_cost.rs`: 10.3-12.3 µs per
//! request with the default runtime, 6.0-7.5 µs with the caller and the driver on one thread;
//! README). With both on one store thread, a request's wake-ups stay on it; a batch crosses
//! runtimes twice (handed to a persister, answered to its partition), whatever its size. One
//! thread is at most one core of write work: pods of many cores want more (`store_threads`).
//!
//! The commit-after-write invariant does not depend on where a write runs: a batch is still
//! answered only once it is durable, and the answer travels the same channel.

use std::time::Duration;

use tokio::runtime::{Builder, Handle, Runtime};

/// How long stopping waits for the store's threads once the pipeline has ended (every write
/// is answered by then; what is left are the driver's own connection tasks).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(1);

/// A runtime of `threads` worker threads named `vault-store`, shut down when dropped: waiting
/// up to `SHUTDOWN_WAIT` (1 s) for its threads, or, dropped in async code (where waiting would
/// block a runtime's thread, and dropping a `Runtime` panics), without waiting.
pub struct StoreRuntime(Option<Runtime>);

impl StoreRuntime {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("vault-store")
            .enable_all()
            .build()
            .map(|runtime| StoreRuntime(Some(runtime)))
    }

    pub fn handle(&self) -> &Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for StoreRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            match Handle::try_current() {
                Ok(_) => runtime.shutdown_background(),
                Err(_) => runtime.shutdown_timeout(SHUTDOWN_WAIT),
            }
        }
    }
}
