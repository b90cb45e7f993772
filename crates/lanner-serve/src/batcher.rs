//! Dynamic batching: requests that arrive close together share one forward pass.
//!
//! Request handlers put a [`Job`] (one or more preprocessed images and a reply channel) on a
//! bounded queue; one inference thread owns the model and runs [`run_batcher`]: it takes the
//! oldest job, waits at most `max_delay` after that job arrived for more, up to
//! `max_batch_size` images, runs them as one batch and sends each job its rows. With no delay
//! (`lanner serve`'s default) a pass takes the jobs already queued when the model is free: a
//! lone request never waits for company, and under load the requests that arrive during one
//! pass share the next. A job larger than `max_batch_size` runs alone, in passes of at most
//! `max_batch_size`. Jobs whose client gave up (the reply channel is closed) are dropped
//! without inference.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tokio::sync::oneshot;

/// Predictions for a job's images, in order, or why inference failed.
pub type JobResult = Result<Vec<Vec<f32>>, String>;

/// Images to predict and where to send the predictions.
pub struct Job {
    /// `count` images, each `pixels_per_image` floats, back to back.
    pub pixels: Vec<f32>,
    /// Images in `pixels`.
    pub count: usize,
    /// When the job was queued.
    pub queued_at: Instant,
    /// The waiting request.
    pub reply: oneshot::Sender<JobResult>,
}

/// How jobs are grouped.
#[derive(Clone, Copy, Debug)]
pub struct BatchingConfig {
    /// Images in one forward pass at most.
    pub max_batch_size: usize,
    /// How long the oldest job waits for company.
    pub max_delay: Duration,
    /// Jobs waiting at most; beyond that [`JobQueue::submit`] refuses.
    pub max_queue: usize,
}

/// The sending side of the queue, cheap to clone, with its current depth.
#[derive(Clone)]
pub struct JobQueue {
    sender: Sender<Job>,
    depth: Arc<AtomicUsize>,
}

/// The queue is full: the caller should answer 503 and ask the client to retry.
#[derive(Debug, PartialEq, Eq)]
pub struct QueueFull;

/// The receiving side, for [`run_batcher`].
pub struct JobReceiver {
    receiver: Receiver<Job>,
    depth: Arc<AtomicUsize>,
}

/// A queue of at most `max_queue` jobs.
pub fn job_queue(max_queue: usize) -> (JobQueue, JobReceiver) {
    let (sender, receiver) = crossbeam_channel::bounded(max_queue.max(1));
    let depth = Arc::new(AtomicUsize::new(0));
    (
        JobQueue {
            sender,
            depth: Arc::clone(&depth),
        },
        JobReceiver { receiver, depth },
    )
}

impl JobQueue {
    /// Queues `job`, or refuses at once when the queue is full (or the batcher has stopped).
    pub fn submit(&self, job: Job) -> Result<(), QueueFull> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.sender.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(QueueFull)
            }
        }
    }

    /// Jobs waiting now.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

impl JobReceiver {
    fn take(&self, job: Result<Job, RecvTimeoutError>) -> Result<Job, RecvTimeoutError> {
        if job.is_ok() {
            self.depth.fetch_sub(1, Ordering::SeqCst);
        }
        job
    }
}

/// Runs until every [`JobQueue`] is dropped: groups jobs, calls `infer(pixels, count)` once per
/// forward pass, answers each job, and reports each pass's size to `on_batch`. A panic inside
/// `infer` fails the jobs of that batch, not the thread.
pub fn run_batcher(
    jobs: JobReceiver,
    config: BatchingConfig,
    mut infer: impl FnMut(Vec<f32>, usize) -> Vec<Vec<f32>>,
    mut on_batch: impl FnMut(usize),
) {
    let max_batch = config.max_batch_size.max(1);
    let mut held: Option<Job> = None;
    loop {
        let first = match held.take() {
            Some(job) => job,
            None => match jobs.take(
                jobs.receiver
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            ) {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        if first.reply.is_closed() {
            continue;
        }
        let deadline = first.queued_at + config.max_delay;
        let mut images = first.count;
        let mut batch = vec![first];
        while images < max_batch {
            match jobs.take(jobs.receiver.recv_deadline(deadline)) {
                Ok(job) if job.reply.is_closed() => {}
                Ok(job) if images + job.count > max_batch => {
                    held = Some(job);
                    break;
                }
                Ok(job) => {
                    images += job.count;
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        run_batch(batch, images, max_batch, &mut infer, &mut on_batch);
    }
}

fn run_batch(
    batch: Vec<Job>,
    images: usize,
    max_batch: usize,
    infer: &mut impl FnMut(Vec<f32>, usize) -> Vec<Vec<f32>>,
    on_batch: &mut impl FnMut(usize),
) {
    let per_image = batch[0].pixels.len() / batch[0].count.max(1);
    let mut replies = Vec::with_capacity(batch.len());
    let mut pixels = Vec::with_capacity(images * per_image);
    for job in batch {
        pixels.extend_from_slice(&job.pixels);
        replies.push((job.count, job.reply));
    }
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let mut rows = Vec::with_capacity(images);
        for (start, chunk) in (0..images)
            .step_by(max_batch)
            .zip(pixels.chunks(max_batch * per_image))
        {
            let count = max_batch.min(images - start);
            on_batch(count);
            rows.extend(infer(chunk.to_vec(), count));
        }
        rows
    }));
    match outcome {
        Ok(rows) if rows.len() == images => {
            let mut rows = rows.into_iter();
            for (count, reply) in replies {
                let _ = reply.send(Ok(rows.by_ref().take(count).collect()));
            }
        }
        _ => {
            for (_, reply) in replies {
                let _ = reply.send(Err(
                    "the model failed on this batch (see the server log)".to_string()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    /// A stand-in model: each image is `[v]`, its prediction `[v * 2]`.
    fn double(pixels: Vec<f32>, count: usize) -> Vec<Vec<f32>> {
        assert_eq!(pixels.len(), count);
        pixels.iter().map(|v| vec![v * 2.0]).collect()
    }

    fn job(values: &[f32]) -> (Job, oneshot::Receiver<JobResult>) {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            pixels: values.to_vec(),
            count: values.len(),
            queued_at: Instant::now(),
            reply,
        };
        (job, answer)
    }

    fn start(
        config: BatchingConfig,
        infer: fn(Vec<f32>, usize) -> Vec<Vec<f32>>,
    ) -> (
        JobQueue,
        Arc<Mutex<Vec<usize>>>,
        std::thread::JoinHandle<()>,
    ) {
        let (queue, receiver) = job_queue(config.max_queue);
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let thread = std::thread::spawn(move || {
            run_batcher(receiver, config, infer, |n| seen.lock().unwrap().push(n))
        });
        (queue, sizes, thread)
    }

    #[test]
    fn jobs_queued_together_share_a_pass_and_get_their_own_rows() {
        let config = BatchingConfig {
            max_batch_size: 8,
            max_delay: Duration::from_millis(200),
            max_queue: 16,
        };
        let (queue, sizes, thread) = start(config, double);
        let answers: Vec<_> = [[1.0, 2.0].as_slice(), &[3.0], &[4.0, 5.0, 6.0]]
            .iter()
            .map(|values| {
                let (job, answer) = job(values);
                queue.submit(job).unwrap();
                answer
            })
            .collect();
        let rows: Vec<_> = answers
            .into_iter()
            .map(|a| a.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(rows[0], vec![vec![2.0], vec![4.0]]);
        assert_eq!(rows[1], vec![vec![6.0]]);
        assert_eq!(rows[2], vec![vec![8.0], vec![10.0], vec![12.0]]);
        assert_eq!(*sizes.lock().unwrap(), vec![6]);
        drop(queue);
        thread.join().unwrap();
    }

    #[test]
    fn a_full_batch_does_not_wait_and_the_next_job_waits_its_turn() {
        let config = BatchingConfig {
            max_batch_size: 4,
            max_delay: Duration::from_secs(30),
            max_queue: 16,
        };
        let (queue, sizes, thread) = start(config, double);
        let started = Instant::now();
        let (a, answer_a) = job(&[1.0, 2.0, 3.0]);
        let (b, answer_b) = job(&[4.0, 5.0]);
        let (c, answer_c) = job(&[6.0]);
        queue.submit(a).unwrap();
        queue.submit(b).unwrap();
        queue.submit(c).unwrap();
        // a (3) + b (2) > 4: a runs with nothing; b + c (3) still wait for more, so close the
        // queue to end the wait.
        assert_eq!(answer_a.blocking_recv().unwrap().unwrap().len(), 3);
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(queue);
        assert_eq!(
            answer_b.blocking_recv().unwrap().unwrap(),
            vec![vec![8.0], vec![10.0]]
        );
        assert_eq!(answer_c.blocking_recv().unwrap().unwrap(), vec![vec![12.0]]);
        thread.join().unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![3, 3]);
    }

    #[test]
    fn a_job_over_the_batch_size_runs_in_passes() {
        let config = BatchingConfig {
            max_batch_size: 2,
            max_delay: Duration::ZERO,
            max_queue: 4,
        };
        let (queue, sizes, thread) = start(config, double);
        let (big, answer) = job(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        queue.submit(big).unwrap();
        assert_eq!(answer.blocking_recv().unwrap().unwrap().len(), 5);
        drop(queue);
        thread.join().unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![2, 2, 1]);
    }

    #[test]
    fn a_full_queue_refuses_and_counts_its_depth() {
        // No batcher runs: the queue fills.
        let (queue, _receiver) = job_queue(2);
        let mut answers = Vec::new();
        for _ in 0..2 {
            let (j, a) = job(&[1.0]);
            queue.submit(j).unwrap();
            answers.push(a);
        }
        assert_eq!(queue.depth(), 2);
        let (j, _a) = job(&[1.0]);
        assert_eq!(queue.submit(j), Err(QueueFull));
        assert_eq!(queue.depth(), 2);
    }

    #[test]
    fn abandoned_jobs_are_skipped_and_a_panic_fails_only_its_batch() {
        fn picky(pixels: Vec<f32>, count: usize) -> Vec<Vec<f32>> {
            assert!(pixels[0] >= 0.0, "negative pixels");
            double(pixels, count)
        }
        let config = BatchingConfig {
            max_batch_size: 1,
            max_delay: Duration::ZERO,
            max_queue: 8,
        };
        let (queue, sizes, thread) = start(config, picky);
        let (gone, answer) = job(&[7.0]);
        drop(answer);
        queue.submit(gone).unwrap();
        let (bad, bad_answer) = job(&[-1.0]);
        queue.submit(bad).unwrap();
        let (good, good_answer) = job(&[1.0]);
        queue.submit(good).unwrap();
        let error = bad_answer.blocking_recv().unwrap().unwrap_err();
        assert!(error.contains("the model failed on this batch"), "{error}");
        assert_eq!(
            good_answer.blocking_recv().unwrap().unwrap(),
            vec![vec![2.0]]
        );
        drop(queue);
        thread.join().unwrap();
        // The abandoned job never reached the model.
        assert_eq!(*sizes.lock().unwrap(), vec![1, 1]);
    }

    #[test]
    fn without_a_delay_a_lone_job_runs_at_once_and_jobs_queued_meanwhile_share_the_next_pass() {
        let config = BatchingConfig {
            max_batch_size: 8,
            max_delay: Duration::ZERO,
            max_queue: 16,
        };
        let (queue, receiver) = job_queue(config.max_queue);
        let (started, pass_started) = crossbeam_channel::unbounded();
        let (go, gate) = crossbeam_channel::unbounded::<()>();
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&sizes);
        let thread = std::thread::spawn(move || {
            let infer = |pixels: Vec<f32>, count: usize| {
                started.send(count).unwrap();
                gate.recv().unwrap();
                double(pixels, count)
            };
            run_batcher(receiver, config, infer, |n| seen.lock().unwrap().push(n))
        });
        let (lone, lone_answer) = job(&[1.0]);
        queue.submit(lone).unwrap();
        // The lone job's pass starts without waiting for company...
        assert_eq!(pass_started.recv().unwrap(), 1);
        // ...and the jobs that arrive while it runs are taken together once it ends.
        let answers: Vec<_> = [[2.0].as_slice(), &[3.0, 4.0], &[5.0]]
            .iter()
            .map(|values| {
                let (job, answer) = job(values);
                queue.submit(job).unwrap();
                answer
            })
            .collect();
        go.send(()).unwrap();
        assert_eq!(
            lone_answer.blocking_recv().unwrap().unwrap(),
            vec![vec![2.0]]
        );
        assert_eq!(pass_started.recv().unwrap(), 4);
        go.send(()).unwrap();
        let rows: Vec<_> = answers
            .into_iter()
            .map(|a| a.blocking_recv().unwrap().unwrap())
            .collect();
        assert_eq!(
            rows,
            vec![
                vec![vec![4.0]],
                vec![vec![6.0], vec![8.0]],
                vec![vec![10.0]]
            ]
        );
        drop(queue);
        thread.join().unwrap();
        assert_eq!(*sizes.lock().unwrap(), vec![1, 4]);
    }
}
