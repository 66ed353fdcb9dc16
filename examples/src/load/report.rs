//! What a run found: the figures, the physical ceiling they are compared
//! with, a text summary, `<timestamp>.json` and an SVG plot of latency
//! percentiles against offered load.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::costs::{SagaCosts, Waits};
use super::error::LoadError;
use super::floor::LatencyFloor;
use super::legs::Legs;
use super::machine::MachineLoad;
use super::raw::{Durability, RawFigure};
use super::settings::TailSettings;

/// PostgreSQL commits one saga needs: the order service's start transition
/// (order row, saga state, `OrderCreated` in the outbox), the inventory's
/// reservation (stock, reservation, inbox, reply in the outbox), and the
/// order service's decision on the reply (status, saga state, inbox,
/// `OrderConfirmed` in the outbox). The relays' claim and mark-sent commits
/// are per batch (up to 256 messages) and not counted. The ceiling is the
/// issue's yardstick, not a bound: the services commit several sagas'
/// transitions in one transaction (measured: 0.14–0.21 PostgreSQL
/// transactions per saga at full load), so a run can pass it.
pub const COMMITS_PER_SAGA: u32 = 3;

/// Persistent, confirmed, consumed and acked messages one saga needs:
/// `OrderCreated`, `StockUpdateResult`, `OrderConfirmed`.
pub const MESSAGES_PER_SAGA: u32 = 3;

/// Latency percentiles in milliseconds (nearest rank).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `sorted` microseconds.
    pub fn of_sorted_micros(sorted: &[u64]) -> Self {
        let rank = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[index] as f64 / 1000.0
        };
        Self {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }
}

/// The physical ceiling of this machine in sagas per second.
#[derive(Clone, Debug, Serialize)]
pub struct Ceiling {
    /// Raw single-row INSERT commits.
    pub postgres_commits: RawFigure,
    /// Raw persistent, confirmed, consumed and acked messages.
    pub rabbitmq_messages: RawFigure,
    /// See [`COMMITS_PER_SAGA`].
    pub commits_per_saga: u32,
    /// See [`MESSAGES_PER_SAGA`].
    pub messages_per_saga: u32,
    /// `min(commits/s / commits per saga, messages/s / messages per saga)`:
    /// as if the scarcer of the two had the machine to itself.
    pub sagas_per_second: f64,
    /// `1 / (commits per saga / commits/s + messages per saga / messages/s)`:
    /// both doing a saga's work at their raw rates on the same cores, one
    /// after the other. The services, the participant and the load
    /// generator need CPU too, but group commit saves commits, so a run can
    /// pass it; `sagas_per_second` is the nearer yardstick.
    pub shared_sagas_per_second: f64,
    /// PostgreSQL's durability settings during the run.
    pub durability: Durability,
}

impl Ceiling {
    /// The ceiling from the two raw figures.
    pub fn new(postgres_commits: RawFigure, rabbitmq_messages: RawFigure, durability: Durability) -> Self {
        let sagas_per_second = (postgres_commits.per_second / f64::from(COMMITS_PER_SAGA))
            .min(rabbitmq_messages.per_second / f64::from(MESSAGES_PER_SAGA));
        let seconds_per_saga = f64::from(COMMITS_PER_SAGA) / postgres_commits.per_second
            + f64::from(MESSAGES_PER_SAGA) / rabbitmq_messages.per_second;
        let shared_sagas_per_second = if seconds_per_saga.is_finite() && seconds_per_saga > 0.0 {
            1.0 / seconds_per_saga
        } else {
            0.0
        };
        Self {
            postgres_commits,
            rabbitmq_messages,
            commits_per_saga: COMMITS_PER_SAGA,
            messages_per_saga: MESSAGES_PER_SAGA,
            sagas_per_second,
            shared_sagas_per_second,
            durability,
        }
    }
}

/// One run at one setting.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    /// `closed` or `open`.
    pub mode: String,
    /// Orders per second offered (open loop).
    pub offered_per_second: Option<f64>,
    /// Concurrent clients (closed) or the cap on open calls (open).
    pub clients: usize,
    /// Orders accepted by `CreateOrder`.
    pub sent: u64,
    /// `CreateOrder` calls that failed.
    pub errors: u64,
    /// Sagas seen confirmed (`OrderConfirmed` consumed).
    pub confirmed: u64,
    /// Sagas seen cancelled (`OrderCancelled` consumed).
    pub cancelled: u64,
    /// Accepted orders whose event was not seen within the drain timeout.
    pub unobserved: u64,
    /// Open loop: orders scheduled but neither accepted nor refused by the
    /// time the run gave up (see `Seen::unsent`). The latencies leave them
    /// out, so a run with any is not counted as all confirmed.
    pub unsent: u64,
    /// From the first order sent to the last event seen.
    pub seconds: f64,
    /// Completed sagas (confirmed + cancelled) per second.
    pub completed_per_second: f64,
    /// `CreateOrder` sent → `OrderConfirmed` received.
    pub latency_ms: Percentiles,
    /// The median of `latency_ms` over the run's latency floor (see
    /// [`LatencyFloor::saga_ms`]): how many times the least a saga can take
    /// here the median saga took.
    pub median_over_floor: Option<f64>,
    /// `CreateOrder` sent → answered: the saga's start committed (order
    /// row, saga state, `OrderCreated` in the outbox). The rest of
    /// `latency_ms` is the messages' way through both services.
    pub answer_latency_ms: Percentiles,
    /// `completed_per_second` over the ceiling's sagas per second (the
    /// raw figures measured before and after the runs, pooled).
    pub ratio_of_ceiling: Option<f64>,
    /// `completed_per_second` over the shared ceiling (see
    /// [`Ceiling::shared_sagas_per_second`]).
    pub ratio_of_shared_ceiling: Option<f64>,
    /// CPU seconds per 1,000 completed sagas of the measured process.
    pub cpu_seconds_per_1000: Option<f64>,
    /// CPU seconds per 1,000 completed sagas of the in-process order
    /// service's own runtime threads (no load generator, inventory or broker client of the run).
    pub service_thread_cpu_seconds_per_1000: Option<f64>,
    /// Peak RSS (`VmHWM`) of the measured process so far, MiB.
    pub peak_rss_mib: Option<f64>,
    /// What one saga cost each component while the load was steady.
    pub costs: Option<SagaCosts>,
    /// Where the sagas' time went between the services (services hosted
    /// by this run only).
    pub legs: Option<Legs>,
    /// How far the system clock moved against the monotonic clock during
    /// the run, ms (the report says so from 1 ms): the legs of the sagas in
    /// flight across a step are off by it; the latencies are not.
    pub system_clock_step_ms: f64,
}

/// A step of the system clock the report points out: below it, the two
/// clocks' readings differ by no more than reading them takes.
const STEP_WORTH_TELLING_MS: f64 = 1.0;

/// A span's machine figures for the report, the absent ones left out.
fn machine_load(load: Option<&MachineLoad>) -> String {
    let Some(load) = load else {
        return "not sampled".to_owned();
    };
    let cpu: Vec<String> = [
        ("RabbitMQ", load.broker_cpu_ms),
        ("PostgreSQL", load.postgres_cpu_ms),
        ("this process", load.this_process_cpu_ms),
    ]
    .into_iter()
    .filter_map(|(who, ms)| Some(format!("{who} {:.0}", ms?)))
    .collect();
    let figures: Vec<String> = [
        load.disk_written_mib.map(|v| format!("{v:.1} MiB written")),
        load.io_waiting_ms.map(|v| format!("a task waiting on I/O {v:.0} ms")),
        load.io_stalled_ms.map(|v| format!("all stalled on I/O {v:.0} ms")),
        load.cpu_waiting_ms
            .map(|v| format!("a task waiting for a core {v:.0} ms")),
        (!cpu.is_empty()).then(|| format!("CPU ms {}", cpu.join(" / "))),
    ]
    .into_iter()
    .flatten()
    .collect();
    if figures.is_empty() {
        "no counters".to_owned()
    } else {
        figures.join(", ")
    }
}

/// The report's line about a step of the system clock, if it is worth one.
fn clock_step_note(step_ms: f64) -> Option<String> {
    (step_ms.abs() >= STEP_WORTH_TELLING_MS).then(|| {
        format!(
            "the system clock moved {step_ms:+.1} ms against the monotonic clock during the run: \
             the legs of the sagas in flight across that step are off by it"
        )
    })
}

impl RunReport {
    /// Sets the ratios to `ceiling` and the median's multiple of `floor`.
    pub(crate) fn compare_with(&mut self, ceiling: &Ceiling, floor: &LatencyFloor) {
        let ratio = |of: f64| (of > 0.0).then(|| self.completed_per_second / of);
        self.ratio_of_ceiling = ratio(ceiling.sagas_per_second);
        self.ratio_of_shared_ceiling = ratio(ceiling.shared_sagas_per_second);
        self.median_over_floor = (self.confirmed > 0)
            .then(|| floor.multiple(self.latency_ms.p50))
            .flatten();
    }

    /// Whether every order scheduled was accepted and seen confirmed, and no
    /// call failed.
    pub fn all_confirmed(&self) -> bool {
        self.sent > 0
            && self.errors == 0
            && self.unsent == 0
            && self.unobserved == 0
            && self.cancelled == 0
            && self.confirmed == self.sent
    }
}

/// Everything a load run found.
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// When the run started (UTC, `YYYYMMDDTHHMMSSZ`).
    pub started_at: String,
    /// CPUs the operating system offers this process.
    pub cpus: usize,
    /// What the CPU and RSS figures measure.
    pub measured_process: String,
    /// The share of one core a competing process took beside the run
    /// (`--competing-cpu`), if one did.
    pub competing_cpu: Option<f64>,
    /// The settings.
    pub config: serde_json::Value,
    /// The kernel's and PostgreSQL's settings that shape the tail.
    pub tail_settings: TailSettings,
    /// The machine's own limits in this run (absent if skipped).
    pub ceiling: Option<Ceiling>,
    /// The least a saga can take on this machine (absent if skipped).
    pub latency_floor: Option<LatencyFloor>,
    /// One per setting.
    pub runs: Vec<RunReport>,
}

impl LoadReport {
    /// A human-readable summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "load run {} on {} CPUs", self.started_at, self.cpus);
        let _ = writeln!(out, "CPU / RSS measured on: {}", self.measured_process);
        if let Some(share) = self.competing_cpu {
            let _ = writeln!(
                out,
                "competing: a process spun {:.0} % of every 10 ms beside the run (the limits and the floor included)",
                share * 100.0
            );
        }
        let _ = writeln!(out, "{}", self.tail_settings.render());
        if let Some(c) = &self.ceiling {
            let measured = |figure: &RawFigure| {
                let rates: Vec<String> = figure.measured_per_second.iter().map(|r| format!("{r:.0}")).collect();
                match rates.as_slice() {
                    [before, after] => format!(" (before the runs {before}, after {after})"),
                    _ => String::new(),
                }
            };
            let _ = writeln!(
                out,
                "raw PostgreSQL: {:.0} single-row INSERT commits/s{} at {} connections (synchronous_commit={}, fsync={})",
                c.postgres_commits.per_second,
                measured(&c.postgres_commits),
                c.postgres_commits.concurrency,
                c.durability.synchronous_commit,
                c.durability.fsync
            );
            if let Some(relaxed) = c.durability.relaxed() {
                let _ = writeln!(
                    out,
                    "DURABILITY RELAXED ({relaxed}): acknowledged commits may be lost in a crash; \
                     these figures are not the benchmark's"
                );
            }
            let _ = writeln!(
                out,
                "raw RabbitMQ:   {:.0} persistent msgs/s published with confirm, consumed and acked{} from {} publishers",
                c.rabbitmq_messages.per_second,
                measured(&c.rabbitmq_messages),
                c.rabbitmq_messages.concurrency
            );
            let _ = writeln!(
                out,
                "ceiling: min({:.0}/{}, {:.0}/{}) = {:.0} sagas/s ({} commits and {} messages per saga)",
                c.postgres_commits.per_second,
                c.commits_per_saga,
                c.rabbitmq_messages.per_second,
                c.messages_per_saga,
                c.sagas_per_second,
                c.commits_per_saga,
                c.messages_per_saga
            );
            let _ = writeln!(
                out,
                "shared ceiling: 1/({}/{:.0} + {}/{:.0}) = {:.0} sagas/s (both on the same cores)",
                c.commits_per_saga,
                c.postgres_commits.per_second,
                c.messages_per_saga,
                c.rabbitmq_messages.per_second,
                c.shared_sagas_per_second
            );
        }
        if let Some(floor) = &self.latency_floor {
            let _ = writeln!(out, "{}", floor.render());
        }
        for run in &self.runs {
            let offered = run
                .offered_per_second
                .map_or_else(|| format!("{} clients", run.clients), |r| format!("{r:.0}/s offered"));
            let _ = writeln!(
                out,
                "{} ({offered}): {} sent, {} confirmed, {} cancelled, {} unobserved, {} errors{} in {:.1} s",
                run.mode,
                run.sent,
                run.confirmed,
                run.cancelled,
                run.unobserved,
                run.errors,
                if run.unsent > 0 {
                    format!(
                        ", {} scheduled but not sent in time (left out of the latencies)",
                        run.unsent
                    )
                } else {
                    String::new()
                },
                run.seconds
            );
            let ratio = match (run.ratio_of_ceiling, run.ratio_of_shared_ceiling) {
                (Some(r), Some(shared)) => format!(
                    " = {:.1} % of the ceiling, {:.1} % of the shared ceiling",
                    r * 100.0,
                    shared * 100.0
                ),
                (Some(r), None) => format!(" = {:.1} % of the ceiling", r * 100.0),
                _ => String::new(),
            };
            let _ = writeln!(out, "  {:.0} sagas/s{ratio}", run.completed_per_second);
            let l = &run.latency_ms;
            let over_floor = run
                .median_over_floor
                .map_or_else(String::new, |m| format!("  (p50 = {m:.1} x the latency floor)"));
            if run.confirmed == 0 {
                let _ = writeln!(out, "  create -> confirmed ms: none seen confirmed");
            } else {
                let _ = writeln!(
                    out,
                    "  create -> confirmed ms: p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}{over_floor}",
                    l.p50, l.p95, l.p99, l.max
                );
            }
            let a = &run.answer_latency_ms;
            let _ = writeln!(
                out,
                "  create -> answered ms:  p50 {:.1}  p95 {:.1}  p99 {:.1}  max {:.1}",
                a.p50, a.p95, a.p99, a.max
            );
            let cpu = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.2}"));
            let _ = writeln!(
                out,
                "  CPU s per 1,000 sagas: {} (process), {} (order-service threads); peak RSS {} MiB",
                cpu(run.cpu_seconds_per_1000),
                cpu(run.service_thread_cpu_seconds_per_1000),
                cpu(run.peak_rss_mib)
            );
            if let Some(c) = &run.costs {
                let fig =
                    |v: Option<f64>, digits: usize| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"));
                let _ = writeln!(
                    out,
                    "  per saga ({} sagas in {:.1} s of steady load): {} PostgreSQL transactions; CPU ms: \
                     {} PostgreSQL backends, {} RabbitMQ, {} this process; {} WAL bytes (cluster-wide)",
                    c.sagas,
                    c.seconds,
                    fig(c.transactions_per_saga, 2),
                    fig(c.postgres_cpu_ms_per_saga, 2),
                    fig(c.rabbitmq_cpu_ms_per_saga, 2),
                    fig(c.process_cpu_ms_per_saga, 2),
                    fig(c.wal_bytes_per_saga, 0),
                );
                if let Some(p) = &c.process_cpu_ms_per_saga_by_part {
                    let _ = writeln!(
                        out,
                        "  this process's CPU ms per saga: {:.2} order service, {:.2} inventory, {:.2} AMQP I/O \
                         threads, {:.2} load generator and the rest",
                        p.order_service, p.inventory, p.amqp_io, p.load_generator_and_rest
                    );
                }
                if let (Some(shared), Some(size)) =
                    (c.inventory_commands_shared, c.inventory_commands_per_shared_transaction)
                {
                    let _ = writeln!(
                        out,
                        "  inventory: {:.1} % of commands in shared transactions, {size:.1} commands each",
                        shared * 100.0
                    );
                }
                let w = &c.waits;
                if w != &Waits::default() {
                    let _ = writeln!(
                        out,
                        "  waits, ms mean: order service commit {}, inventory transaction {}, publish -> confirm {}",
                        fig(w.order_service_commit_ms, 2),
                        fig(w.inventory_transaction_ms, 2),
                        fig(w.publish_to_confirm_ms, 2),
                    );
                }
            }
            if let Some(note) = clock_step_note(run.system_clock_step_ms) {
                let _ = writeln!(out, "  {note}");
            }
            if let Some(legs) = &run.legs {
                let leg = |p: &Percentiles| format!("{:.1} / {:.1}", p.p50, p.p99);
                let outer = |p: &Option<Percentiles>| p.as_ref().map_or_else(|| "n/a".to_owned(), leg);
                let _ = writeln!(
                    out,
                    "  legs, ms p50 / p99 ({} sagas): sent -> start decided {}, -> inventory's transaction {}, \
                     in it {}, reply -> order service's decision {}, -> confirmation seen {}",
                    legs.sagas,
                    outer(&legs.to_start_ms),
                    leg(&legs.to_inventory_ms),
                    leg(&legs.in_inventory_ms),
                    leg(&legs.back_to_order_service_ms),
                    outer(&legs.to_confirmation_ms),
                );
                if let Some(s) = &legs.slowest {
                    let _ = writeln!(
                        out,
                        "  slowest 1 % ({} sagas, mean {:.1} ms, sent in {} of {} 100 ms windows), mean ms: \
                         to start {:.1}, to inventory {:.1}, in it {:.1}, back {:.1}, to confirmation {:.1}",
                        s.sagas,
                        s.mean_ms,
                        s.sent_in_windows,
                        s.windows,
                        s.to_start_ms,
                        s.to_inventory_ms,
                        s.in_inventory_ms,
                        s.back_to_order_service_ms,
                        s.to_confirmation_ms,
                    );
                    let bursts: Vec<String> = s
                        .bursts
                        .iter()
                        .map(|b| format!("{:.1} s in ({})", b.at_s, b.sagas))
                        .collect();
                    if !bursts.is_empty() {
                        let _ = writeln!(out, "  most of them sent at: {}", bursts.join(", "));
                        let machine: Vec<String> = s.bursts.iter().map(|b| machine_load(b.machine.as_ref())).collect();
                        let _ = writeln!(
                            out,
                            "  the machine in the 200 ms from each: {}; in a typical 200 ms: {}",
                            machine.join("; "),
                            machine_load(s.typical_machine.as_ref()),
                        );
                    }
                }
            }
        }
        out
    }

    /// Writes `<dir>/<started_at>.json`, and `<dir>/<started_at>.svg` when
    /// there are several open-loop runs. Returns the paths written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
        let io = |what: String| move |source| LoadError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut written = Vec::new();
        let json_path = dir.join(format!("{}.json", self.started_at));
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| io("encoding the report".to_owned())(std::io::Error::other(e)))?;
        std::fs::write(&json_path, json + "\n").map_err(io(format!("writing {}", json_path.display())))?;
        written.push(json_path);
        if let Some(svg) = self.plot() {
            let svg_path = dir.join(format!("{}.svg", self.started_at));
            std::fs::write(&svg_path, svg).map_err(io(format!("writing {}", svg_path.display())))?;
            written.push(svg_path);
        }
        Ok(written)
    }

    /// Latency percentiles against offered load, when there are at least two open-loop runs.
    pub fn plot(&self) -> Option<String> {
        let points: Vec<(f64, &Percentiles)> = self
            .runs
            .iter()
            .filter_map(|run| run.offered_per_second.map(|rate| (rate, &run.latency_ms)))
            .collect();
        if points.len() < 2 {
            return None;
        }
        Some(svg(&points))
    }
}

/// One line of the plot: its name, colour and value.
type Series = (&'static str, &'static str, fn(&Percentiles) -> f64);

/// A plot axis from 0 to a round top in round steps (1, 2, 2.5 or 5 times a
/// power of ten), so its labels read 0, 100, 200 … rather than 0, 131, 262 ….
#[derive(Clone, Copy, Debug, PartialEq)]
struct Axis {
    step: f64,
    top: f64,
}

impl Axis {
    /// The fewest round steps, at most `steps` of them, that reach `max`.
    fn covering(max: f64, steps: u32) -> Self {
        let max = if max.is_finite() && max > 0.0 { max } else { 1.0 };
        let rough = max / f64::from(steps.max(1));
        let power = 10_f64.powf(rough.log10().floor());
        // The tolerance keeps an exact multiple (100 for 600 / 6) from
        // losing to its float rounding.
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|multiple| multiple * power)
            .find(|&step| step >= rough * (1.0 - 1e-9))
            .unwrap_or(10.0 * power);
        Self {
            step,
            top: step * (max / step - 1e-9).ceil(),
        }
    }

    fn ticks(self) -> impl Iterator<Item = f64> {
        let count = (self.top / self.step).round() as u32;
        (0..=count).map(move |i| self.step * f64::from(i))
    }

    /// A tick's `value` with the decimals the step has (2.5 → one, 0.025 →
    /// three), less the trailing zeros: 0, 2.5, 5, 7.5.
    fn label(self, value: f64) -> String {
        let whole = |scaled: f64| (scaled - scaled.round()).abs() < 1e-6;
        let decimals = (0..9).find(|&d| whole(self.step * 10_f64.powi(d))).unwrap_or(9);
        let text = format!("{value:.*}", decimals as usize);
        if decimals == 0 {
            return text;
        }
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

/// A line chart of p50 / p95 / p99 (ms) against offered sagas per second.
fn svg(points: &[(f64, &Percentiles)]) -> String {
    let (width, height, left, right, top, bottom) = (640.0, 400.0, 60.0, 20.0, 30.0, 50.0);
    let x_axis = Axis::covering(points.iter().map(|(x, _)| *x).fold(0.0, f64::max) * 1.05, 6);
    let y_axis = Axis::covering(points.iter().map(|(_, p)| p.p99).fold(0.0, f64::max) * 1.05, 6);
    let sx = |x: f64| left + x / x_axis.top * (width - left - right);
    let sy = |y: f64| height - bottom - y / y_axis.top * (height - top - bottom);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{}" y="18" text-anchor="middle">create → confirmed latency vs offered load</text>"#,
        width / 2.0
    );
    let (x0, y0, x1, y1) = (sx(0.0), sy(0.0), sx(x_axis.top), sy(y_axis.top));
    for y in y_axis.ticks().skip(1) {
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{0:.1}" x2="{x1}" y2="{0:.1}" stroke="#e0e0e0"/>"##,
            sy(y)
        );
    }
    let _ = writeln!(
        out,
        r#"<path d="M{x0},{y1} L{x0},{y0} L{x1},{y0}" stroke="black" fill="none"/>"#
    );
    for x in x_axis.ticks() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            sx(x),
            y0 + 16.0,
            x_axis.label(x)
        );
    }
    for y in y_axis.ticks() {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            x0 - 6.0,
            sy(y) + 4.0,
            y_axis.label(y)
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">offered sagas/s</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">ms</text>"#,
        (x0 + x1) / 2.0,
        height - 12.0,
        (y0 + y1) / 2.0,
        (y0 + y1) / 2.0
    );
    let series: [Series; 3] = [
        ("p50", "#1f77b4", |p| p.p50),
        ("p95", "#ff7f0e", |p| p.p95),
        ("p99", "#d62728", |p| p.p99),
    ];
    for (n, (name, colour, value)) in series.iter().enumerate() {
        let line: Vec<String> = points
            .iter()
            .map(|(x, p)| format!("{:.1},{:.1}", sx(*x), sy(value(p))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" stroke="{colour}" stroke-width="2" fill="none"/>"#,
            line.join(" ")
        );
        for (x, p) in points {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                sx(*x),
                sy(value(p))
            );
        }
        let ly = top + 14.0 * n as f64;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{ly:.1}" fill="{colour}">{name}</text>"#,
            left + 10.0
        );
    }
    out.push_str("</svg>\n");
    out
}

/// `YYYYMMDDTHHMMSSZ` of `unix_seconds` (UTC).
pub(crate) fn timestamp(unix_seconds: u64) -> String {
    let days = i64::try_from(unix_seconds / 86_400).unwrap_or(0);
    let rest = unix_seconds % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let micros: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        let p = Percentiles::of_sorted_micros(&micros);
        assert_eq!((p.p50, p.p95, p.p99, p.max), (50.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of_sorted_micros(&[]).max, 0.0);
    }

    #[test]
    fn a_run_that_left_scheduled_orders_unsent_is_not_all_confirmed() {
        let run = RunReport {
            sent: 10,
            confirmed: 10,
            ..RunReport::default()
        };
        assert!(run.all_confirmed());
        let late = RunReport { unsent: 1, ..run };
        assert!(!late.all_confirmed(), "the slowest orders are missing from its figures");
    }

    #[test]
    fn only_a_step_of_the_system_clock_gets_a_line() {
        assert_eq!(clock_step_note(0.3), None);
        assert_eq!(clock_step_note(-0.9), None);
        let stepped = clock_step_note(150.04).unwrap_or_default();
        assert!(stepped.contains("moved +150.0 ms"), "{stepped}");
        let back = clock_step_note(-2.5).unwrap_or_default();
        assert!(back.contains("moved -2.5 ms"), "{back}");
    }

    #[test]
    fn a_spans_machine_figures_leave_the_absent_ones_out() {
        let load = MachineLoad {
            disk_written_mib: Some(72.06),
            io_waiting_ms: Some(80.4),
            io_stalled_ms: Some(45.2),
            cpu_waiting_ms: None,
            broker_cpu_ms: Some(90.0),
            postgres_cpu_ms: None,
            this_process_cpu_ms: Some(60.4),
        };
        assert_eq!(
            machine_load(Some(&load)),
            "72.1 MiB written, a task waiting on I/O 80 ms, all stalled on I/O 45 ms, CPU ms RabbitMQ 90 / this process 60"
        );
        assert_eq!(machine_load(Some(&MachineLoad::default())), "no counters");
        assert_eq!(machine_load(None), "not sampled");
    }

    #[test]
    fn plot_axes_step_in_round_numbers() {
        let axis = |max| {
            let axis = Axis::covering(max, 6);
            (axis.step, axis.top)
        };
        assert_eq!(axis(525.0), (100.0, 600.0));
        assert_eq!(axis(600.0), (100.0, 600.0), "an exact multiple is its own top");
        assert_eq!(axis(39.5), (10.0, 40.0));
        assert_eq!(axis(2_100.0), (500.0, 2_500.0));
        assert_eq!(axis(14.0), (2.5, 15.0));
        assert_eq!(axis(0.0), (0.2, 1.0), "nothing measured still draws an axis");
        let labels = |max| {
            let axis = Axis::covering(max, 6);
            axis.ticks().map(|tick| axis.label(tick)).collect::<Vec<String>>()
        };
        assert_eq!(labels(14.0), ["0", "2.5", "5", "7.5", "10", "12.5", "15"]);
        assert_eq!(labels(600.0), ["0", "100", "200", "300", "400", "500", "600"]);
        assert_eq!(labels(0.14), ["0", "0.025", "0.05", "0.075", "0.1", "0.125", "0.15"]);
    }

    #[test]
    fn the_plot_labels_its_axes_with_round_values() {
        let at = |p99| Percentiles {
            p50: p99 / 3.0,
            p95: p99 / 1.5,
            p99,
            max: p99 * 2.0,
        };
        let (low, high) = (at(25.9), at(37.6));
        let plot = svg(&[(300.0, &low), (500.0, &high)]);
        for label in [">0<", ">100<", ">600<", ">10<", ">40<"] {
            assert!(plot.contains(label), "{label} missing from {plot}");
        }
        assert!(!plot.contains(">525<") && !plot.contains(">41.3<"), "{plot}");
        assert_eq!(plot.matches("<polyline").count(), 3, "p50, p95, p99");
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        assert_eq!(timestamp(0), "19700101T000000Z");
        assert_eq!(timestamp(951_782_400 + 3_723), "20000229T010203Z");
    }

    #[test]
    fn the_ceiling_is_the_scarcer_resource() {
        let figure = |per_second| RawFigure {
            operations: 0,
            seconds: 1.0,
            per_second,
            measured_per_second: vec![per_second],
            concurrency: 32,
        };
        let durability = Durability {
            synchronous_commit: "on".to_owned(),
            fsync: "on".to_owned(),
        };
        let ceiling = Ceiling::new(figure(17_000.0), figure(11_500.0), durability.clone());
        assert!((ceiling.sagas_per_second - 11_500.0 / 3.0).abs() < 1e-6);
        // 3/17,000 + 3/11,500 seconds of work per saga on shared cores.
        assert!((ceiling.shared_sagas_per_second - 2_286.55).abs() < 0.01, "{ceiling:?}");
        assert!(ceiling.shared_sagas_per_second < ceiling.sagas_per_second);
        // Equal raw rates: sharing halves what either alone would allow.
        let even = Ceiling::new(figure(6_000.0), figure(6_000.0), durability);
        assert!((even.shared_sagas_per_second - 1_000.0).abs() < 1e-6);
        assert!((even.sagas_per_second - 2_000.0).abs() < 1e-6);
    }
}
