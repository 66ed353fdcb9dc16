//! When a group commit that would carry a single item waits for others.
//!
//! A transaction's fixed cost (its round trips, the commit and its flush)
//! is paid once per group, so an item that would commit alone can save CPU
//! by waiting briefly for company. Only when items arrive densely does
//! company come in time; at low rates the wait would be pure latency. So a
//! lone item waits only while recent arrivals have been, on average, no
//! further apart than the wait itself, or than a group commit takes: items
//! that arrive more often than commits finish are, on average, at least one
//! per commit, and a machine near its limit (commits slowing down) lingers
//! sooner than an idle one.
//!
//! The wait ends as soon as company arrives ([`Arrivals`]): the first
//! companion halves the group's fixed cost per item, and each later one
//! saves less while every item in the group waits on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Each new value (a gap, a commit's duration) counts for this fraction of
/// its running mean.
const NEW_WEIGHT: f64 = 1.0 / 8.0;

/// How long a lone item waits for company, from when items arrive (see the
/// module docs). Used by the participant's command batches and by stores
/// that group commits.
#[derive(Clone, Debug)]
pub struct Linger {
    limit: Duration,
    last_arrival: Option<Instant>,
    /// Running mean of the gaps between arrivals, in seconds; infinite
    /// until two have arrived.
    mean_gap: f64,
    /// Running mean of how long a group commit took, in seconds.
    mean_run: f64,
}

impl Linger {
    /// Waits of up to `limit`; `ZERO` never waits.
    pub fn new(limit: Duration) -> Self {
        Self {
            limit,
            last_arrival: None,
            mean_gap: f64::INFINITY,
            mean_run: 0.0,
        }
    }

    /// Records an item arriving at `at`.
    pub fn arrived(&mut self, at: Instant) {
        if let Some(last) = self.last_arrival.replace(at) {
            let gap = at.saturating_duration_since(last).as_secs_f64();
            self.mean_gap = if self.mean_gap.is_finite() {
                self.mean_gap + (gap - self.mean_gap) * NEW_WEIGHT
            } else {
                gap
            };
        }
    }

    /// Records a group commit that took `took`.
    pub fn ran(&mut self, took: Duration) {
        self.mean_run += (took.as_secs_f64() - self.mean_run) * NEW_WEIGHT;
    }

    /// How long a group commit that took `taken` items, with room for
    /// `most`, waits for more: the limit if it is a lone item with room for
    /// company and items arrive on average no further apart than the limit
    /// or than a group commit takes (both running means), else nothing.
    pub fn wait(&self, taken: usize, most: usize) -> Duration {
        let lone = taken == 1 && most > 1;
        let dense = self.limit.as_secs_f64().max(self.mean_run);
        if lone && !self.limit.is_zero() && self.mean_gap <= dense {
            self.limit
        } else {
            Duration::ZERO
        }
    }
}

/// Ends a lone item's wait for company (see [`Linger`]) when company
/// arrives. Shared by whoever queues items and the runners that linger; it
/// lives outside the queue's lock, so a runner waits without holding it.
#[derive(Debug, Default)]
pub struct Arrivals {
    notify: Notify,
    /// Runners waiting for company now.
    lingering: AtomicUsize,
}

impl Arrivals {
    /// Tells the lingering runners that an item was queued. Call it once
    /// the item is in the queue.
    pub fn arrived(&self) {
        if self.lingering.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Waits up to `limit`, or until `joined` (which reads the queue) says
    /// company has arrived, whichever comes first.
    pub async fn wait_for_company(&self, limit: Duration, mut joined: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        let _lingering = Lingering::count(&self.lingering);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the queue is read: an item queued after
            // that read wakes this wait.
            notified.as_mut().enable();
            if joined() {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = notified => {}
            }
        }
    }
}

/// Counts a runner among the lingering ones while it lives, however its
/// wait ends (a dropped wait included).
struct Lingering<'a>(&'a AtomicUsize);

impl<'a> Lingering<'a> {
    fn count(lingering: &'a AtomicUsize) -> Self {
        lingering.fetch_add(1, Ordering::SeqCst);
        Self(lingering)
    }
}

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn arrivals(limit: Duration, gaps: &[Duration]) -> Linger {
        let mut linger = Linger::new(limit);
        let mut at = Instant::now();
        linger.arrived(at);
        for gap in gaps {
            at += *gap;
            linger.arrived(at);
        }
        linger
    }

    #[test]
    fn dense_arrivals_wait_and_sparse_ones_do_not() {
        assert_eq!(arrivals(MS, &[MS / 2; 20]).wait(1, 2), MS);
        assert_eq!(
            arrivals(MS, &[MS; 20]).wait(1, 2),
            MS,
            "a mean gap of exactly the limit"
        );
        assert_eq!(arrivals(MS, &[MS * 3; 20]).wait(1, 2), Duration::ZERO);
    }

    #[test]
    fn only_a_lone_item_with_room_for_company_waits() {
        let dense = arrivals(MS, &[MS / 2; 20]);
        assert_eq!(dense.wait(1, 2), MS);
        assert_eq!(dense.wait(2, 64), Duration::ZERO, "it has company");
        assert_eq!(dense.wait(1, 1), Duration::ZERO, "no room for any");
    }

    #[test]
    fn nothing_waits_before_two_arrivals_or_without_a_limit() {
        assert_eq!(Linger::new(MS).wait(1, 2), Duration::ZERO);
        assert_eq!(arrivals(MS, &[]).wait(1, 2), Duration::ZERO);
        assert_eq!(arrivals(Duration::ZERO, &[MS / 10; 20]).wait(1, 2), Duration::ZERO);
    }

    #[test]
    fn commits_slower_than_arrivals_make_sparser_arrivals_dense() {
        let mut linger = arrivals(MS, &[MS * 3; 20]);
        assert_eq!(linger.wait(1, 2), Duration::ZERO, "3 ms apart, commits unrecorded");
        for _ in 0..20 {
            linger.ran(MS * 2);
        }
        assert_eq!(linger.wait(1, 2), Duration::ZERO, "commits of 2 ms");
        for _ in 0..40 {
            linger.ran(MS * 5);
        }
        assert_eq!(
            linger.wait(1, 2),
            MS,
            "commits of 5 ms: an arrival every 3 ms finds company"
        );
        let mut idle = arrivals(Duration::ZERO, &[MS * 3; 20]);
        idle.ran(MS * 50);
        assert_eq!(idle.wait(1, 2), Duration::ZERO, "no limit, no wait");
    }

    #[test]
    fn a_pause_after_a_burst_ends_the_waiting_and_a_new_burst_restores_it() {
        let mut gaps = vec![MS / 4; 20];
        gaps.push(Duration::from_secs(1));
        assert_eq!(
            arrivals(MS, &gaps).wait(1, 2),
            Duration::ZERO,
            "the first item after a pause"
        );
        // The pause weighs 1/8 and decays by 7/8 per arrival: about 50 dense
        // arrivals bring the mean back under the limit.
        gaps.extend([MS / 4; 60]);
        assert_eq!(arrivals(MS, &gaps).wait(1, 2), MS);
    }

    /// `arrivals` and a queue, with an item queued (and announced) after
    /// `after`, or only announced if `queue_it` is false.
    async fn wait_with_arrival(after: Duration, queue_it: bool) -> Duration {
        use std::sync::Arc;
        let arrivals = Arc::new(Arrivals::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let arriving = {
            let (arrivals, queued) = (Arc::clone(&arrivals), Arc::clone(&queued));
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if queue_it {
                    queued.fetch_add(1, Ordering::SeqCst);
                }
                arrivals.arrived();
            })
        };
        let began = Instant::now();
        arrivals
            .wait_for_company(MS * 10, || queued.load(Ordering::SeqCst) > 0)
            .await;
        let waited = began.elapsed();
        arriving.abort();
        waited
    }

    #[tokio::test(start_paused = true)]
    async fn company_ends_the_wait_at_once() {
        let waited = wait_with_arrival(MS * 3, true).await;
        assert!(waited >= MS * 3 && waited < MS * 4, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn without_company_the_wait_lasts_its_limit() {
        assert_eq!(wait_with_arrival(MS * 60, true).await, MS * 10);
        // A wake-up with nothing queued only reads the queue again.
        assert_eq!(wait_with_arrival(MS * 3, false).await, MS * 10);
    }

    #[tokio::test(start_paused = true)]
    async fn company_queued_before_the_wait_ends_it_before_it_begins() {
        let arrivals = Arrivals::default();
        let began = Instant::now();
        arrivals.wait_for_company(MS * 10, || true).await;
        assert_eq!(began.elapsed(), Duration::ZERO);
        // Nobody lingers now: an arrival leaves no wake-up behind for the
        // next wait.
        arrivals.arrived();
        let began = Instant::now();
        arrivals.wait_for_company(MS * 10, || false).await;
        assert_eq!(began.elapsed(), MS * 10);
    }

    #[tokio::test(start_paused = true)]
    async fn one_arrival_ends_every_lingering_runners_wait() {
        use std::sync::Arc;
        let arrivals = Arc::new(Arrivals::default());
        let queued = Arc::new(AtomicUsize::new(0));
        let began = Instant::now();
        let runners: Vec<_> = (0..2)
            .map(|_| {
                let (arrivals, queued) = (Arc::clone(&arrivals), Arc::clone(&queued));
                tokio::spawn(async move {
                    arrivals
                        .wait_for_company(MS * 10, || queued.load(Ordering::SeqCst) > 0)
                        .await;
                    began.elapsed()
                })
            })
            .collect();
        tokio::time::sleep(MS * 3).await;
        queued.fetch_add(1, Ordering::SeqCst);
        arrivals.arrived();
        for runner in runners {
            let waited = runner.await.expect("no panic");
            assert!(waited >= MS * 3 && waited < MS * 4, "{waited:?}");
        }
        assert_eq!(
            arrivals.lingering.load(Ordering::SeqCst),
            0,
            "nobody counted as lingering"
        );
    }
}
