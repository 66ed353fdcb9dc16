//! What the machine was doing while a run's slowest sagas were sent: the
//! kernel's counters, read every 100 ms through the run (Linux; elsewhere
//! the figures are absent).
//!
//! A tail that queues behind a busy core is spread over the run; one that
//! waits for a stall is bunched into a few windows (see
//! [`Slowest`](super::legs::Slowest)). These counters say which stall: the
//! disk writing back a burst of dirty pages (sectors written, and every task
//! stalled on I/O), the broker or the database busy with periodic work of
//! their own, or this process (their CPU time). Each burst window is
//! compared with a typical window of the run.

use std::path::Path;
use std::time::Duration;

use saga_core::CancellationToken;
use serde::Serialize;

use super::usage;

/// How often the counters are read.
const EVERY: Duration = Duration::from_millis(100);

/// A burst's figures cover its 100 ms window and the next one: a saga sent
/// in the window meets a stall that starts up to its own latency later.
const SPAN_MS: f64 = 200.0;

/// At most this many samples are kept (over 3 hours of a run).
const MOST_SAMPLES: usize = 120_000;

/// The command name of PostgreSQL's processes.
const DATABASE_COMMAND: &str = "postgres";

/// The counters at one moment, as totals so far (since the machine or the
/// process started) in the units of [`MachineLoad`]; a counter the kernel
/// does not offer is `None`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Sample {
    /// Milliseconds of the system clock (the clock the legs use).
    pub unix_ms: f64,
    /// Each counter's total so far.
    pub totals: MachineLoad,
}

/// What the machine did over a span of a run (a [`Sample`] holds the same
/// figures as totals so far).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct MachineLoad {
    /// MiB written to the disks (`/proc/diskstats`).
    pub disk_written_mib: Option<f64>,
    /// Milliseconds in which some task waited on I/O (e.g. a commit's
    /// flush while other processes ran; `/proc/pressure/io`, `some`).
    pub io_waiting_ms: Option<f64>,
    /// Milliseconds in which every non-idle task waited on I/O
    /// (`/proc/pressure/io`, `full`).
    pub io_stalled_ms: Option<f64>,
    /// Milliseconds in which some runnable task waited for a core
    /// (`/proc/pressure/cpu`, `some`).
    pub cpu_waiting_ms: Option<f64>,
    /// The broker's CPU milliseconds (10 ms resolution).
    pub broker_cpu_ms: Option<f64>,
    /// PostgreSQL's CPU milliseconds: the processes it had when the run
    /// began (the services' pooled connections among them).
    pub postgres_cpu_ms: Option<f64>,
    /// This process's CPU milliseconds (the in-process services and the
    /// load generator).
    pub this_process_cpu_ms: Option<f64>,
}

/// Each figure of a [`MachineLoad`]: the one list that the functions going
/// through all of them share.
const FIGURES: [fn(&mut MachineLoad) -> &mut Option<f64>; 7] = [
    |load| &mut load.disk_written_mib,
    |load| &mut load.io_waiting_ms,
    |load| &mut load.io_stalled_ms,
    |load| &mut load.cpu_waiting_ms,
    |load| &mut load.broker_cpu_ms,
    |load| &mut load.postgres_cpu_ms,
    |load| &mut load.this_process_cpu_ms,
];

impl MachineLoad {
    /// Each figure of `self` and `other` put together by `figure`; `None`
    /// where either lacks it.
    fn with(&self, other: &Self, figure: impl Fn(f64, f64) -> f64) -> Self {
        let (mut mine, mut theirs, mut both) = (*self, *other, Self::default());
        for field in FIGURES {
            *field(&mut both) = field(&mut mine).zip(*field(&mut theirs)).map(|(a, b)| figure(a, b));
        }
        both
    }
}

/// The samples of one run, in order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Trace {
    samples: Vec<Sample>,
}

impl Trace {
    #[cfg(test)]
    pub(crate) fn new(samples: Vec<Sample>) -> Self {
        Self { samples }
    }

    /// Reads the counters every 100 ms until `stop` is cancelled, and for
    /// one span after it.
    pub(crate) async fn record(stop: CancellationToken) -> Self {
        // The broker's and the database's processes are found once:
        // scanning `/proc` every 100 ms would cost more than the rest of
        // the sampling.
        let mut broker = Processes::named(usage::BROKER_COMMAND);
        let mut database = Processes::named(DATABASE_COMMAND);
        let disks = whole_disks();
        // The first sample now, not at the interval's first tick: that tick
        // waits for the timer's next millisecond, by when the first order
        // may have gone, leaving a burst at 0.0 s outside the trace.
        let mut samples = vec![read(&disks, &mut broker, &mut database)];
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while samples.len() < MOST_SAMPLES {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => samples.push(read(&disks, &mut broker, &mut database)),
            }
        }
        // The last orders' spans end after the run: sample them out.
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(SPAN_MS / 1000.0);
        loop {
            samples.push(read(&disks, &mut broker, &mut database));
            let now = tokio::time::Instant::now();
            if now >= end {
                break;
            }
            tokio::time::sleep(EVERY.min(end - now)).await;
        }
        Self { samples }
    }

    /// The load over `[from_ms, from_ms + SPAN_MS)` of the system clock:
    /// each counter's change over exactly that span, read between the
    /// samples around its ends as if it grew evenly between them. `None`
    /// unless the trace covers the span.
    pub(crate) fn span(&self, from_ms: f64) -> Option<MachineLoad> {
        let (start, end) = (self.at(from_ms)?, self.at(from_ms + SPAN_MS)?);
        Some(start.with(&end, |then, now| now - then))
    }

    /// The counters at `unix_ms`, between the samples around it.
    fn at(&self, unix_ms: f64) -> Option<MachineLoad> {
        // The samples are in order: found by halving, a long run's spans
        // stay cheap.
        let after = self.samples.partition_point(|s| s.unix_ms < unix_ms);
        let later = self.samples.get(after)?;
        let Some(earlier) = after.checked_sub(1).map(|i| &self.samples[i]) else {
            // Only the first sample can be at or after it: exactly at it.
            return (later.unix_ms == unix_ms).then_some(later.totals);
        };
        let gap = later.unix_ms - earlier.unix_ms;
        let part = if gap > 0.0 {
            (unix_ms - earlier.unix_ms) / gap
        } else {
            1.0
        };
        Some(
            earlier
                .totals
                .with(&later.totals, |then, now| then + (now - then) * part),
        )
    }

    /// Each figure's median over the trace's consecutive spans: what a
    /// burst's figures are to be compared with. `None` for a trace too
    /// short to hold a span.
    pub(crate) fn typical(&self) -> Option<MachineLoad> {
        let first = self.samples.first()?.unix_ms;
        let last = self.samples.last()?.unix_ms;
        let mut spans: Vec<MachineLoad> = std::iter::successors(Some(first), |at| Some(at + SPAN_MS))
            .take_while(|at| at + SPAN_MS <= last)
            .filter_map(|at| self.span(at))
            .collect();
        if spans.is_empty() {
            return None;
        }
        let mut typical = MachineLoad::default();
        for field in FIGURES {
            let mut values: Vec<f64> = spans.iter_mut().filter_map(|span| *field(span)).collect();
            values.sort_by(f64::total_cmp);
            *field(&mut typical) = values.get(values.len() / 2).copied();
        }
        Some(typical)
    }
}

fn read(disks: &[String], broker: &mut Processes, database: &mut Processes) -> Sample {
    let file = |path: &str| std::fs::read_to_string(path).ok();
    let ms = |us: u64| us as f64 / 1000.0;
    let cpu_ms = |cpu: Duration| cpu.as_secs_f64() * 1000.0;
    let io = file("/proc/pressure/io");
    let pressure = |text: Option<&str>, kind| text.and_then(|text| pressure_total(text, kind)).map(ms);
    Sample {
        unix_ms: super::drive::unix_ms(std::time::SystemTime::now()),
        totals: MachineLoad {
            disk_written_mib: file("/proc/diskstats")
                .and_then(|text| sectors_written(&text, disks))
                .map(|sectors| sectors as f64 * 512.0 / (1024.0 * 1024.0)),
            io_waiting_ms: pressure(io.as_deref(), "some"),
            io_stalled_ms: pressure(io.as_deref(), "full"),
            cpu_waiting_ms: pressure(file("/proc/pressure/cpu").as_deref(), "some"),
            broker_cpu_ms: broker.cpu().map(cpu_ms),
            postgres_cpu_ms: database.cpu().map(cpu_ms),
            this_process_cpu_ms: usage::process_cpu(None).map(cpu_ms),
        },
    }
}

/// Processes found by name once, and the CPU time each was last seen with:
/// one that ends keeps counting what it used, so the sum never falls.
struct Processes {
    pids: Vec<u32>,
    last: Vec<Duration>,
}

impl Processes {
    fn named(command: &str) -> Self {
        let pids = usage::pids_of_command(command);
        let last = vec![Duration::ZERO; pids.len()];
        Self { pids, last }
    }

    /// Their CPU time so far; `None` if there were none.
    fn cpu(&mut self) -> Option<Duration> {
        if self.pids.is_empty() {
            return None;
        }
        for (pid, last) in self.pids.iter().zip(&mut self.last) {
            if let Some(cpu) = usage::process_cpu(Some(*pid)) {
                *last = cpu;
            }
        }
        Some(self.last.iter().sum())
    }
}

/// The machine's whole disks (`/sys/block`), without loop and RAM devices,
/// whose writes reach no disk.
fn whole_disks() -> Vec<String> {
    disks_in(Path::new("/sys/block"))
}

/// The block devices listed in `sys_block` that are disks of their own: not
/// loop or RAM devices, and not stacked on other devices (device-mapper,
/// software RAID: their `slaves` folder lists the devices below them), whose
/// writes would count again in those devices'.
fn disks_in(sys_block: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(sys_block) else {
        return Vec::new();
    };
    let stacked = |name: &str| {
        std::fs::read_dir(sys_block.join(name).join("slaves")).is_ok_and(|mut below| below.next().is_some())
    };
    entries
        .flatten()
        .take(10_000)
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| !["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)))
        .filter(|name| !stacked(name))
        .collect()
}

/// Sectors written to `disks`, summed from `/proc/diskstats` (the tenth
/// field); partitions are left out, so nothing counts twice.
fn sectors_written(diskstats: &str, disks: &[String]) -> Option<u64> {
    let mut total = None;
    for line in diskstats.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(written)) = (fields.get(2), fields.get(9)) else {
            continue;
        };
        if disks.iter().any(|disk| disk == name) {
            total = Some(total.unwrap_or(0) + written.parse::<u64>().ok()?);
        }
    }
    total
}

/// The `total=` microseconds of the `kind` line (`some` or `full`) of a
/// `/proc/pressure` file.
fn pressure_total(text: &str, kind: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.split_whitespace().next() == Some(kind))?;
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESSURE: &str = "some avg10=1.50 avg60=0.80 avg300=0.20 total=4286000\n\
                            full avg10=0.70 avg60=0.30 avg300=0.10 total=1200500\n";

    #[test]
    fn pressure_totals_are_read_by_kind() {
        assert_eq!(pressure_total(PRESSURE, "some"), Some(4_286_000));
        assert_eq!(pressure_total(PRESSURE, "full"), Some(1_200_500));
        assert_eq!(pressure_total("some avg10=0.00 total=12\n", "full"), None);
        assert_eq!(pressure_total("", "some"), None);
    }

    #[test]
    fn sectors_written_sum_whole_disks_and_leave_partitions_out() {
        let diskstats = " 253 0 vda 100 0 2000 50 300 10 40000 900 0 700 950\n\
                         \x20253 1 vda1 90 0 1800 45 290 10 39000 880 0 690 925\n\
                         \x20253 16 vdb 5 0 80 1 7 0 600 3 0 4 4\n\
                         \x20  7 0 loop0 9 0 72 0 0 0 0 0 0 1 0\n";
        let disks = ["vda".to_owned(), "vdb".to_owned()];
        assert_eq!(sectors_written(diskstats, &disks), Some(40_600));
        assert_eq!(sectors_written(diskstats, &["sda".to_owned()]), None);
    }

    #[test]
    fn disks_stacked_on_others_and_loop_devices_are_left_out() {
        let root = std::env::temp_dir().join(format!("load-test-sys-block-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (device, below) in [("vda", None), ("sdb", None), ("dm-0", Some("vda")), ("loop0", None)] {
            let slaves = root.join(device).join("slaves");
            std::fs::create_dir_all(&slaves).expect("a scratch folder");
            if let Some(below) = below {
                std::fs::write(slaves.join(below), "").expect("a scratch file");
            }
        }
        let mut disks = disks_in(&root);
        disks.sort();
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(disks, ["sdb", "vda"]);
        assert!(disks_in(&root).is_empty(), "no folder, no disks");
    }

    fn sample(unix_ms: f64, sectors: u64, stalled_us: u64, broker_ms: u64) -> Sample {
        Sample {
            unix_ms,
            totals: MachineLoad {
                disk_written_mib: Some(sectors as f64 * 512.0 / (1024.0 * 1024.0)),
                io_stalled_ms: Some(stalled_us as f64 / 1000.0),
                broker_cpu_ms: Some(broker_ms as f64),
                ..MachineLoad::default()
            },
        }
    }

    /// Samples every 100 ms from 1,000 ms; 2,048 sectors (1 MiB) and 1 ms
    /// of I/O stall each, but 100 MiB and 60 ms between 1,300 and 1,400.
    fn trace() -> Trace {
        let mut samples = Vec::new();
        let (mut sectors, mut stalled, mut broker) = (0, 0, 0);
        for i in 0..=20u32 {
            samples.push(sample(1_000.0 + f64::from(i) * 100.0, sectors, stalled, broker));
            let burst = i == 3;
            sectors += if burst { 204_800 } else { 2_048 };
            stalled += if burst { 60_000 } else { 1_000 };
            broker += 50;
        }
        Trace::new(samples)
    }

    #[test]
    fn a_span_counts_exactly_its_200_ms_between_the_samples() {
        let burst = trace().span(1_250.0).expect("inside the trace");
        // 1,250 to 1,450: half an ordinary window, the burst's, and half
        // an ordinary one.
        assert_eq!(burst.disk_written_mib, Some(101.0));
        assert_eq!(burst.io_stalled_ms, Some(61.0));
        assert_eq!(burst.broker_cpu_ms, Some(100.0));
        assert_eq!(burst.cpu_waiting_ms, None, "a counter the kernel did not offer");
        let quiet = trace().span(1_600.0).expect("inside the trace");
        assert_eq!(quiet.disk_written_mib, Some(2.0));
        assert_eq!(quiet.io_stalled_ms, Some(2.0));
        assert!(trace().span(900.0).is_none(), "before the first sample");
        assert!(trace().span(2_900.0).is_none(), "its end after the last sample");
    }

    #[test]
    fn the_typical_span_is_each_figures_median_and_ignores_one_burst() {
        let typical = trace().typical().expect("a long trace");
        assert_eq!(typical.disk_written_mib, Some(2.0));
        assert_eq!(typical.io_stalled_ms, Some(2.0));
        assert_eq!(typical.broker_cpu_ms, Some(100.0));
        let short = Trace::new(vec![sample(0.0, 0, 0, 0), sample(100.0, 1, 1, 1)]);
        assert!(short.typical().is_none(), "no whole span");
        assert!(Trace::default().typical().is_none());
    }

    #[tokio::test]
    async fn recording_reads_the_disks_until_stopped() {
        let stop = CancellationToken::new();
        let recording = tokio::spawn(Trace::record(stop.clone()));
        tokio::time::sleep(Duration::from_millis(450)).await;
        let stopped = super::super::drive::unix_ms(std::time::SystemTime::now());
        stop.cancel();
        let trace = tokio::time::timeout(Duration::from_secs(5), recording)
            .await
            .expect("stops when told")
            .expect("the task ran");
        assert!(
            trace.samples.len() >= 6,
            "{} samples in 450 + 200 ms",
            trace.samples.len()
        );
        let last = trace.samples.last().map_or(0.0, |s| s.unix_ms);
        assert!(
            last >= stopped + SPAN_MS - 1.0,
            "sampled for a span after the stop: the last at {last}, stopped at {stopped}"
        );
        assert!(
            trace.samples.windows(2).all(|w| w[0].unix_ms <= w[1].unix_ms),
            "in order"
        );
        assert!(
            trace.samples.iter().all(|s| s.totals.disk_written_mib.is_some()),
            "a Linux machine has a disk in /proc/diskstats"
        );
        assert!(trace.span(trace.samples[0].unix_ms).is_some());
    }
}
