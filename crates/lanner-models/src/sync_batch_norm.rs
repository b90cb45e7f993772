//! BatchNorm statistics over the whole batch when data-parallel replicas each hold a share of
//! it: PyTorch's `SyncBatchNorm`, Keras' `BatchNormalization(synchronized=True)`.
//!
//! Each replica runs its share of a step on a thread of its own. [`join`] makes that thread a
//! member of the step's [`ReplicaGroup`]. A BatchNorm layer there that trains on batch
//! statistics computes its share's per-channel mean and sum of squared deviations, gathers
//! every replica's ([`crate::fused::gather_across_replicas`]) and combines them into the whole
//! batch's mean and variance (Chan, Golub and LeVeque's pairwise update), as PyTorch's
//! `SyncBatchNorm` does with `batch_norm_gather_stats_with_counts`. Backward, the gradients of
//! the gathered statistics are added across the replicas. So each layer meets the other
//! replicas once forward and once backward, every replica normalises with the whole batch's
//! statistics, and the replicas' gradients add up to one device's on the whole batch.
//!
//! Replicas meet at every gather in the same order (their graphs are the same, and burn's
//! autodiff orders its backward steps by the graph alone); each meeting carries a tag, and a
//! mismatch stops the step rather than combining the wrong tensors. When one replica's thread
//! panics, the others stop waiting and panic too, instead of hanging.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Shape, TensorMetadata};
use burn::tensor::Slice;

/// The replicas of one data-parallel step, which meet to exchange tensors.
pub struct ReplicaGroup {
    /// How many replicas take part in every exchange.
    size: usize,
    /// The rows of the whole batch, over all replicas.
    batch_rows: usize,
    rounds: Mutex<Rounds>,
    all_arrived: Condvar,
}

/// The exchange under way and the last one finished.
struct Rounds {
    /// Finished rounds.
    finished: u64,
    /// The tag of the round under way, set by its first arrival.
    tag: Option<u64>,
    /// What each replica gave to the round under way.
    given: Vec<Option<Box<dyn Any + Send>>>,
    /// What the replicas gave to the last finished round, in rank order.
    taken: Vec<Box<dyn Any + Send>>,
    /// A replica failed: nobody waits any more.
    failed: bool,
}

impl ReplicaGroup {
    /// A group of `size` replicas sharing a batch of `batch_rows` rows.
    pub fn new(size: usize, batch_rows: usize) -> Arc<Self> {
        assert!(size > 0, "a replica group needs a member");
        Arc::new(Self {
            size,
            batch_rows,
            rounds: Mutex::new(Rounds {
                finished: 0,
                tag: None,
                given: (0..size).map(|_| None).collect(),
                taken: Vec::new(),
                failed: false,
            }),
            all_arrived: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every replica's `value`, in rank order, once all of them have given theirs.
    fn exchange<T: Clone + Send + 'static>(&self, rank: usize, tag: u64, value: T) -> Vec<T> {
        let mut rounds = self.lock();
        if rounds.failed {
            panic!("another replica of this data-parallel step failed");
        }
        if *rounds.tag.get_or_insert(tag) != tag {
            rounds.failed = true;
            self.all_arrived.notify_all();
            panic!(
                "the replicas of a data-parallel step reached their BatchNorm exchanges in \
                 different orders (exchange {tag} against {}); this is a bug in Lanner",
                rounds.tag.unwrap_or_default()
            );
        }
        assert!(rounds.given[rank].is_none(), "replica {rank} gave twice");
        rounds.given[rank] = Some(Box::new(value));
        let round = rounds.finished;
        if rounds.given.iter().all(Option::is_some) {
            rounds.taken = rounds.given.iter_mut().filter_map(Option::take).collect();
            rounds.tag = None;
            rounds.finished += 1;
            self.all_arrived.notify_all();
        } else {
            while rounds.finished == round && !rounds.failed {
                rounds = self
                    .all_arrived
                    .wait(rounds)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if rounds.finished == round {
                panic!("another replica of this data-parallel step failed");
            }
        }
        // The next round cannot finish before this replica gives to it, so `taken` is still
        // this round's.
        rounds
            .taken
            .iter()
            .map(|given| {
                given
                    .downcast_ref::<T>()
                    .expect("the replicas of a step run one backend")
                    .clone()
            })
            .collect()
    }

    fn fail(&self) {
        self.lock().failed = true;
        self.all_arrived.notify_all();
    }
}

impl fmt::Debug for ReplicaGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicaGroup")
            .field("size", &self.size)
            .field("batch_rows", &self.batch_rows)
            .finish()
    }
}

/// This thread's place in a group, while [`join`] runs.
struct Membership {
    group: Arc<ReplicaGroup>,
    rank: usize,
    /// The tag of this thread's next exchange.
    next_tag: Cell<u64>,
}

thread_local! {
    static MEMBERSHIP: RefCell<Option<Membership>> = const { RefCell::new(None) };
}

/// Run `work` (one replica's share of a step: forward and backward) as member `rank` of
/// `group`. A panic in `work` releases the other members.
pub fn join<R>(group: &Arc<ReplicaGroup>, rank: usize, work: impl FnOnce() -> R) -> R {
    assert!(
        rank < group.size,
        "rank {rank} in a group of {}",
        group.size
    );
    struct Leave(Arc<ReplicaGroup>);
    impl Drop for Leave {
        fn drop(&mut self) {
            MEMBERSHIP.with(|membership| membership.borrow_mut().take());
            if std::thread::panicking() {
                self.0.fail();
            }
        }
    }
    MEMBERSHIP.with(|membership| {
        *membership.borrow_mut() = Some(Membership {
            group: group.clone(),
            rank,
            next_tag: Cell::new(0),
        });
    });
    let _leave = Leave(group.clone());
    work()
}

/// Where this thread's BatchNorm layers stand in a split batch, while [`join`] runs.
#[derive(Clone, Copy, Debug)]
pub struct Share {
    /// The rows of the whole batch.
    pub batch_rows: usize,
    /// Whether this is the first replica, the one that updates the running statistics.
    pub first: bool,
}

/// This thread's share of a split batch, or `None` outside [`join`] and in a group of one.
pub fn current_share() -> Option<Share> {
    MEMBERSHIP.with(|membership| {
        let membership = membership.borrow();
        let membership = membership.as_ref()?;
        (membership.group.size > 1).then(|| Share {
            batch_rows: membership.group.batch_rows,
            first: membership.rank == 0,
        })
    })
}

/// One gather across the replicas, forward or backward: what the autodiff keeps for the
/// backward.
#[derive(Clone, Debug)]
pub(crate) struct Exchange {
    group: Arc<ReplicaGroup>,
    rank: usize,
    tag: u64,
}

/// Tags of backward exchanges: the forward gather's tag with the top bit set.
const BACKWARD: u64 = 1 << 63;

impl Exchange {
    /// The next gather of this thread's replica.
    ///
    /// # Panics
    /// Outside [`join`]: only BatchNorm inside a replica's step gathers across replicas.
    pub(crate) fn next() -> Self {
        MEMBERSHIP.with(|membership| {
            let membership = membership.borrow();
            let membership = membership
                .as_ref()
                .expect("a gather across replicas outside a data-parallel step");
            let tag = membership.next_tag.get();
            membership.next_tag.set(tag + 1);
            Self {
                group: membership.group.clone(),
                rank: membership.rank,
                tag,
            }
        })
    }

    /// Every replica's `x` (a vector, the same length on each), moved to `x`'s device, as the
    /// rows of a `[replicas, length]` matrix in rank order.
    pub(crate) fn gather<B: Backend>(&self, x: FloatTensor<B>) -> FloatTensor<B> {
        let device = x.device();
        let row = Shape::new([1, x.shape().num_elements()]);
        let rows = self
            .group
            .exchange(self.rank, self.tag, x)
            .into_iter()
            .map(|given| B::float_reshape(B::float_to_device(given, &device), row.clone()))
            .collect();
        B::float_cat(rows, 0)
    }

    /// The backward pass of [`Exchange::gather`] for this replica's output gradient `grad`
    /// (`[replicas, length]`): the sum over the replicas of their gradients' row for this one,
    /// added in rank order, so that every replica gets the same floats.
    pub(crate) fn gather_backward<B: Backend>(&self, grad: FloatTensor<B>) -> FloatTensor<B> {
        let device = grad.device();
        let length = grad.shape()[1];
        let rank = self.rank as isize;
        let own_row = [Slice::new(rank, Some(rank + 1), 1), Slice::full()];
        let summed = self
            .group
            .exchange(self.rank, self.tag | BACKWARD, grad)
            .into_iter()
            .map(|given| B::float_to_device(B::float_slice(given, &own_row), &device))
            .reduce(B::float_add)
            .expect("a group has a member");
        B::float_reshape(summed, Shape::new([length]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch_norm::BatchNorm2dConfig;
    use crate::test_values::values;
    use burn::module::{Module, Param};
    use burn::tensor::{Device, Tensor, TensorData};

    fn as_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
        tensor.into_data().try_into_vec().unwrap()
    }

    /// Forward and backward of one BatchNorm on rows `rows` of a batch `[4, 3, 5, 5]` (all of
    /// them outside a group): the input's gradient, the weight's and the bias', the running
    /// statistics after the step. The loss weights each output by a fixed value.
    fn batch_norm_step(
        layer: &crate::batch_norm::BatchNorm2d,
        rows: std::ops::Range<usize>,
        offset: f32,
        device: &Device,
    ) -> [Vec<f32>; 3] {
        let per_row = 3 * 5 * 5;
        let row_values =
            |seed| values(4 * per_row, seed)[rows.start * per_row..rows.end * per_row].to_vec();
        let rows_shape = [rows.len(), 3, 5, 5];
        let x = Tensor::<4>::from_data(TensorData::new(row_values(1), rows_shape), device)
            .add_scalar(offset)
            .require_grad();
        let loss_weights =
            Tensor::<4>::from_data(TensorData::new(row_values(2), rows_shape), device);
        let layer = layer.clone().fork(device);
        let loss = (layer.forward(x.clone()) * loss_weights).sum();
        let gradients = loss.backward();
        [
            as_vec(x.grad(&gradients).unwrap()),
            as_vec(layer.weight.val().grad(&gradients).unwrap()),
            as_vec(layer.bias.val().grad(&gradients).unwrap()),
        ]
    }

    /// One BatchNorm step on the whole batch, and on two replicas with a half each: the same
    /// input gradients, parameter gradients (summed over the replicas) and running statistics.
    /// The input is `offset` plus values in -2..2.
    fn halves_normalise_as_the_whole_batch(device: Device, offset: f32) {
        let device = device.autodiff();
        let fresh = || {
            let mut layer = BatchNorm2dConfig::new(3).init(&device);
            layer.weight = Param::from_tensor(Tensor::from_data([0.5f32, -1.0, 2.0], &device));
            layer
        };
        let whole = fresh();
        let [x_grad, weight_grad, bias_grad] = batch_norm_step(&whole, 0..4, offset, &device);

        let split = fresh();
        let group = ReplicaGroup::new(2, 4);
        let halves: Vec<[Vec<f32>; 3]> = std::thread::scope(|scope| {
            let members: Vec<_> = [0..1, 1..4]
                .into_iter()
                .enumerate()
                .map(|(rank, rows)| {
                    let (group, split, device) = (&group, &split, &device);
                    scope.spawn(move || {
                        join(group, rank, || batch_norm_step(split, rows, offset, device))
                    })
                })
                .collect();
            members.into_iter().map(|m| m.join().unwrap()).collect()
        });
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{what}: {g} vs {w}"
                );
            }
        };
        let x_grads: Vec<f32> = halves.iter().flat_map(|h| h[0].clone()).collect();
        close(&x_grads, &x_grad, "input gradient");
        let sum =
            |i: usize| -> Vec<f32> { (0..3).map(|c| halves[0][i][c] + halves[1][i][c]).collect() };
        close(&sum(1), &weight_grad, "weight gradient");
        close(&sum(2), &bias_grad, "bias gradient");
        for (got, want, what) in [
            (&split.running_mean, &whole.running_mean, "running mean"),
            (&split.running_var, &whole.running_var, "running variance"),
        ] {
            close(&as_vec(got.value_sync()), &as_vec(want.value_sync()), what);
        }
        assert_ne!(as_vec(whole.running_mean.value_sync()), vec![0.0; 3]);
    }

    #[test]
    fn halves_on_two_replicas_normalise_as_the_whole_batch_on_burn_flex() {
        halves_normalise_as_the_whole_batch(Device::flex(), 0.0);
    }

    /// A mean 100 times the spread: the variance must not come from subtracting large sums
    /// (Σx² − n·mean² loses all but two digits of it in f32).
    #[test]
    fn halves_normalise_as_the_whole_batch_when_the_mean_dwarfs_the_spread() {
        halves_normalise_as_the_whole_batch(Device::flex(), 100.0);
    }

    #[cfg(feature = "torch")]
    #[test]
    #[allow(
        deprecated,
        reason = "burn 0.22 deprecates burn-tch, the `torch` build"
    )]
    fn halves_on_two_replicas_normalise_as_the_whole_batch_on_libtorch() {
        halves_normalise_as_the_whole_batch(Device::libtorch(), 0.0);
    }

    #[test]
    fn every_member_gets_every_value_in_rank_order_round_after_round() {
        let group = ReplicaGroup::new(3, 6);
        let results: Vec<Vec<Vec<u64>>> = std::thread::scope(|scope| {
            let members: Vec<_> = (0..3)
                .map(|rank| {
                    let group = &group;
                    scope.spawn(move || {
                        (0..50)
                            .map(|round| group.exchange(rank, round, rank as u64 * 100 + round))
                            .collect()
                    })
                })
                .collect();
            members.into_iter().map(|m| m.join().unwrap()).collect()
        });
        for per_member in &results {
            for (round, got) in per_member.iter().enumerate() {
                let round = round as u64;
                assert_eq!(got, &[round, 100 + round, 200 + round]);
            }
        }
    }

    #[test]
    fn a_failing_member_releases_the_others() {
        let group = ReplicaGroup::new(2, 4);
        let outcomes: Vec<bool> = std::thread::scope(|scope| {
            let waiting = scope.spawn(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    join(&group, 0, || group.exchange(0, 0, 1u8))
                }))
                .is_ok()
            });
            let failing = scope.spawn(|| {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    join(&group, 1, || panic!("this replica fails"))
                }))
                .is_ok()
            });
            vec![waiting.join().unwrap(), failing.join().unwrap()]
        });
        assert_eq!(outcomes, [false, false]);
    }

    #[test]
    fn members_that_disagree_on_the_order_stop_instead_of_combining() {
        let group = ReplicaGroup::new(2, 4);
        let outcomes: Vec<bool> = std::thread::scope(|scope| {
            let members: Vec<_> = [(0, 7), (1, 8)]
                .into_iter()
                .map(|(rank, tag)| {
                    let group = &group;
                    scope.spawn(move || {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            join(group, rank, || group.exchange(rank, tag, 1u8))
                        }))
                        .is_ok()
                    })
                })
                .collect();
            members.into_iter().map(|m| m.join().unwrap()).collect()
        });
        assert_eq!(outcomes, [false, false]);
    }

    #[test]
    fn the_share_is_known_inside_a_group_of_several_only() {
        assert!(current_share().is_none());
        let one = ReplicaGroup::new(1, 4);
        assert!(join(&one, 0, current_share).is_none());
        let two = ReplicaGroup::new(2, 4);
        let share = join(&two, 1, current_share).unwrap();
        assert_eq!((share.batch_rows, share.first), (4, false));
        assert!(current_share().is_none());
    }
}
