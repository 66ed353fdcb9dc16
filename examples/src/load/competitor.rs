//! A competing process: it spins for a share of every 10 ms beside a run,
//! so the goals can be measured on a machine with less CPU to spare (a
//! slower machine, or one that runs more than the saga's processes).
//!
//! It is this same program, started again with [`SPIN_ENV`] set: a process
//! of its own, so its CPU time is not counted as the order service's, and
//! the scheduler treats it as any other program beside the services. It
//! stops when the run drops its [`Competitor`], and by itself if the run's
//! process goes away without doing so (killed).

use std::io;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The variable that makes the load test's binary spin instead of running:
/// the share of every [`PERIOD`] it spins, from 0 to 1.
pub const SPIN_ENV: &str = "SAGA_LOAD_TEST_SPIN";

/// The spinner's cycle: a share of it spinning, the rest asleep.
const PERIOD: Duration = Duration::from_millis(10);

/// A competing process to start beside a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Competing {
    /// The share of one core it takes: it spins this share of every 10 ms.
    pub share: f64,
    /// The program to start with [`SPIN_ENV`] set: the load test's binary.
    pub program: PathBuf,
}

impl Competing {
    /// Checks the share: more than 0, at most 1.
    pub fn validate(&self) -> Result<(), String> {
        if is_share(self.share) {
            Ok(())
        } else {
            Err(format!(
                "the competing process's share of a core must be more than 0 and at most 1, not {}",
                self.share
            ))
        }
    }
}

/// More than 0, at most 1 (NaN is neither).
fn is_share(share: f64) -> bool {
    share > 0.0 && share <= 1.0
}

/// The competing process while it runs; dropping it stops it.
#[derive(Debug)]
pub struct Competitor {
    child: Child,
}

impl Competitor {
    /// Starts `competing.program` spinning `competing.share` of every 10 ms.
    pub fn start(competing: &Competing) -> io::Result<Self> {
        let child = Command::new(&competing.program)
            .env(SPIN_ENV, competing.share.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        Ok(Self { child })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CPU time it has taken so far (`None` where `/proc` cannot tell).
    pub fn cpu_time(&self) -> Option<Duration> {
        super::usage::process_cpu(Some(self.pid()))
    }
}

impl Drop for Competitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The share this process was started to spin ([`SPIN_ENV`]), if it was.
pub fn requested() -> Option<Result<f64, String>> {
    let value = std::env::var_os(SPIN_ENV)?;
    let share = value
        .to_str()
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|&share| is_share(share));
    Some(share.ok_or_else(|| format!("{SPIN_ENV} must be more than 0 and at most 1, not {value:?}")))
}

/// Spins `share` of every 10 ms until the process that started this one is
/// gone (this one is then handed to another parent).
pub fn spin(share: f64) {
    let parent = std::os::unix::process::parent_id();
    let busy = PERIOD.mul_f64(share);
    while std::os::unix::process::parent_id() == parent {
        let started = Instant::now();
        while started.elapsed() < busy {
            std::hint::spin_loop();
        }
        std::thread::sleep(PERIOD.saturating_sub(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_must_be_above_zero_and_at_most_one() {
        let with = |share| Competing {
            share,
            program: PathBuf::from("load-test"),
        };
        assert!(with(0.5).validate().is_ok());
        assert!(with(1.0).validate().is_ok());
        for bad in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(with(bad).validate().is_err(), "{bad} accepted");
        }
    }
}
