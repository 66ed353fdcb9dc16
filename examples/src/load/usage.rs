//! CPU time and peak memory from `/proc` (Linux; elsewhere the figures are
//! absent). CPU time is read in clock ticks of 1/100 s, the `USER_HZ` of
//! every common Linux build.

use std::time::Duration;

const TICKS_PER_SECOND: u64 = 100;

/// CPU time used so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct CpuSample {
    /// The whole process (user + system, threads that ended included).
    pub process: Duration,
    /// The in-process order service's runtime threads only (live threads).
    pub service_threads: Option<Duration>,
}

impl CpuSample {
    /// What was used from `earlier` to `self`.
    pub(crate) fn since(&self, earlier: &Self) -> Self {
        Self {
            process: self.process.saturating_sub(earlier.process),
            service_threads: match (self.service_threads, earlier.service_threads) {
                (Some(now), Some(then)) => Some(now.saturating_sub(then)),
                _ => None,
            },
        }
    }
}

/// The command name and user + system ticks of one `stat` file.
fn stat_ticks(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    // Fields after the name start with field 3 (state); utime is 14, stime 15.
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((name, user + system))
}

fn ticks(ticks: u64) -> Duration {
    Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND)
}

/// CPU time of process `pid` (this process when `None`), and of this
/// process's threads whose name starts with `threads` when `pid` is `None`.
pub(crate) fn cpu(pid: Option<u32>, threads: &str) -> Option<CpuSample> {
    let process = process_cpu(pid)?;
    let service_threads = match pid {
        None => Some(thread_cpu(&[threads])?.into_iter().sum()),
        Some(_) => None,
    };
    Some(CpuSample {
        process,
        service_threads,
    })
}

/// CPU time of process `pid` (this process when `None`), threads that
/// ended included; its threads are not read.
pub(crate) fn process_cpu(pid: Option<u32>) -> Option<Duration> {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |pid| format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(path).ok()?;
    stat_ticks(&stat).map(|(_, t)| ticks(t))
}

/// CPU time of this process's live threads, summed per group of `groups`:
/// a thread counts in the first group its name starts with, or in none.
pub(crate) fn thread_cpu(groups: &[&str]) -> Option<Vec<Duration>> {
    let tasks = std::fs::read_dir("/proc/self/task").ok()?;
    let stats: Vec<String> = tasks
        .flatten()
        .take(100_000)
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        .collect();
    let by_group = grouped(stats.iter().filter_map(|stat| stat_ticks(stat)), groups);
    Some(by_group.into_iter().map(ticks).collect())
}

/// Sums `(thread name, ticks)` into `groups` by name prefix, first match wins.
fn grouped<'a>(threads: impl Iterator<Item = (&'a str, u64)>, groups: &[&str]) -> Vec<u64> {
    let mut sums = vec![0; groups.len()];
    for (name, t) in threads {
        if let Some(group) = groups.iter().position(|prefix| name.starts_with(prefix)) {
            sums[group] += t;
        }
    }
    sums
}

/// The command name of the RabbitMQ server's processes.
pub(crate) const BROKER_COMMAND: &str = "beam.smp";

/// CPU time of every process whose command name is `command` (e.g.
/// [`BROKER_COMMAND`]); `None` if there is none.
pub(crate) fn cpu_of_command(command: &str) -> Option<Duration> {
    processes_named(command)
        .map(|(_, cpu)| cpu)
        .reduce(|total, cpu| total + cpu)
}

/// The processes whose command name is `command`.
pub(crate) fn pids_of_command(command: &str) -> Vec<u32> {
    processes_named(command).map(|(pid, _)| pid).collect()
}

/// Each process whose command name is `command`, with its CPU time: one
/// read of its `stat` file.
fn processes_named(command: &str) -> impl Iterator<Item = (u32, Duration)> + '_ {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .take(1_000_000)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(move |pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let (name, t) = stat_ticks(&stat)?;
            (name == command).then(|| (pid, ticks(t)))
        })
}

/// Starts `pid`'s (this process's when `None`) peak resident set size
/// (`VmHWM`) again from its current size, so the next
/// [`peak_rss_kib`] is the peak of what follows, not of everything since the
/// process started (the warm-up, the raw measurements' scratch connections,
/// earlier runs). False if the kernel did not allow it.
pub(crate) fn reset_peak_rss(pid: Option<u32>) -> bool {
    let path = pid.map_or_else(
        || "/proc/self/clear_refs".to_owned(),
        |pid| format!("/proc/{pid}/clear_refs"),
    );
    std::fs::write(path, "5").is_ok()
}

/// Peak resident set size (`VmHWM`) in KiB of `pid` (this process when `None`).
pub(crate) fn peak_rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = pid.map_or_else(|| "/proc/self/status".to_owned(), |pid| format!("/proc/{pid}/status"));
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_rss_starts_again_from_the_current_size() {
        let grown: Vec<u8> = vec![1; 64 << 20];
        std::hint::black_box(&grown);
        drop(grown);
        let before = peak_rss_kib(None).unwrap_or_default();
        assert!(reset_peak_rss(None), "clear_refs is writable for this process");
        let after = peak_rss_kib(None).unwrap_or_default();
        assert!(
            after + 32 * 1024 < before,
            "peak {before} KiB, {after} KiB after the reset"
        );
    }

    #[test]
    fn stat_lines_are_read_past_names_with_spaces_and_parentheses() {
        let stat = "42 (tokio (worker) 1) S 1 42 42 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 4 0 100 0 0";
        assert_eq!(stat_ticks(stat), Some(("tokio (worker) 1", 280)));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn threads_count_in_the_first_group_their_name_starts_with() {
        let threads = [
            ("order-service", 5),
            ("inventory", 7),
            ("order-service", 2),
            ("tokio-rt-worker", 11),
        ];
        assert_eq!(
            grouped(threads.into_iter(), &["order", "order-service", "inventory"]),
            vec![7, 0, 7]
        );
        assert_eq!(grouped(threads.into_iter(), &[]), Vec::<u64>::new());
    }

    #[test]
    fn this_process_is_measured_on_linux() {
        if cfg!(target_os = "linux") {
            let sample = cpu(None, "no-such-thread").expect("/proc/self/stat is readable");
            assert_eq!(sample.service_threads, Some(Duration::ZERO));
            assert!(process_cpu(None).is_some());
            assert_eq!(thread_cpu(&["no-such-thread", ""]).map(|parts| parts.len()), Some(2));
            assert!(peak_rss_kib(None).is_some_and(|kib| kib > 0));
        }
    }
}
