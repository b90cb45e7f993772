//! A command's CPU work runs on rayon's worker threads instead of handing each operation to
//! them.
//!
//! burn-flex's operations, `gemm`'s products and Lanner's own CPU kernels split their work over
//! rayon's global pool. An operation started on a thread outside the pool (`main`, the server's
//! inference thread) queues its work there and puts its thread to sleep until the pool is done,
//! so every operation costs wake-ups and two context switches. A training step of a small
//! network runs thousands of operations of a few microseconds each: on 2 cores, that hand-off
//! took a quarter of the README's main job (about 9 s of kernel time, mostly the scheduler, in
//! a 25 s run). Started on a worker, an operation splits where it is: that worker does its own
//! share, and only idle workers are woken.

/// Runs `work` on one of rayon's workers (at once when the caller is one) and returns its
/// result; a panic in `work` resumes on the calling thread.
///
/// `work` holds its worker until it returns, so it must not wait for threads outside the pool
/// that queue work there themselves: data-parallel replica threads do, and with one core (a
/// pool of one worker) their operations would never run.
pub fn run_on_worker<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn work_runs_on_a_worker_and_its_parallel_operations_finish() {
        assert_eq!(rayon::current_thread_index(), None);
        let (index, sum) = run_on_worker(|| {
            let sum: u64 = (0..10_000u64).into_par_iter().sum();
            (rayon::current_thread_index(), sum)
        });
        assert!(index.is_some(), "the work ran outside the pool");
        assert_eq!(sum, 49_995_000);
        // Already on a worker: it runs there, on the same thread.
        let nested = run_on_worker(|| {
            let outer = rayon::current_thread_index();
            (outer, run_on_worker(rayon::current_thread_index))
        });
        assert_eq!(nested.0, nested.1);
    }

    #[test]
    fn a_panic_in_the_work_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| run_on_worker(|| panic!("bad batch")));
        let message = caught.unwrap_err();
        assert_eq!(message.downcast_ref::<&str>(), Some(&"bad batch"));
    }
}
