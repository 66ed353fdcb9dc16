//! The names of saga-core's metrics, with what each counts.
//!
//! They go through the [`metrics`](https://docs.rs/metrics) facade: a
//! service installs a recorder (e.g. a Prometheus exporter), calls
//! [`describe_metrics`] so each carries its help text, and gives the
//! [`LATENCY_HISTOGRAMS`] buckets fit for fractions of a millisecond.
//! The names are here once, so a service's dashboards, alerts and bucket
//! settings name them through these constants rather than by copying the
//! strings.

/// Counter, label `saga`: sagas started.
pub const STARTED_TOTAL: &str = "saga_started_total";
/// Counter, label `saga`: transitions committed.
pub const TRANSITIONS_TOTAL: &str = "saga_transitions_total";
/// Counter, labels `saga` and `status` (`completed`, `compensated`,
/// `needs_attention`): sagas that reached that status.
pub const FINISHED_TOTAL: &str = "saga_finished_total";
/// Counter: due deadlines that could not be applied and were set aside
/// (`EngineConfig::broken_deadline_retry`); the saga needs an operator.
pub const DEADLINE_FAILURES_TOTAL: &str = "saga_deadline_failures_total";
/// Counter, label `outcome` (`ack`, `retry`, `dead_letter`, or
/// `settle_failed` when the transport could not carry the settlement out,
/// and the message comes round again): messages consumed, by how they were
/// settled.
pub const MESSAGES_TOTAL: &str = "saga_messages_total";
/// Counter: outbox messages the broker confirmed, counted as the relay
/// goes to mark them sent (a mark that fails has them published, and
/// counted, again).
pub const OUTBOX_PUBLISHED_TOTAL: &str = "saga_outbox_published_total";
/// Counter: outbox messages a relay's round left unsent, at each try: the
/// transport's failures, a batch given back when the round ran out of time
/// (some of it may have reached the broker), and the refusals below.
pub const OUTBOX_PUBLISH_FAILURES_TOTAL: &str = "saga_outbox_publish_failures_total";
/// Counter: of those, the messages the broker refused and the later
/// messages of their sagas held behind them in the same round, at each try
/// (a message refused for a minute counts about twelve times at the
/// default 5 s lease). They keep their lease and go again when it ends.
/// Counted apart from the transport's own failures, which back the relay
/// off: a refusal is a message or topology to mend (an unbound routing key,
/// a missing exchange, headers too large), not an outage. Registered at
/// zero when a relay runs, so an alert on its increase sees the first.
pub const OUTBOX_REFUSED_TOTAL: &str = "saga_outbox_refused_total";
/// Counter: unsent outbox messages an operator gave up
/// ([`Engine::discard_unsent`](crate::Engine::discard_unsent)); each is
/// recorded in its saga's history with the reason. Registered at zero when
/// a relay runs.
pub const OUTBOX_DISCARDED_TOTAL: &str = "saga_outbox_discarded_total";
/// Histogram, seconds, label `saga`: a committed transition in the store,
/// from its transaction's begin to its commit (the inbox check, the effects
/// and any group commit's wait included): the store's share of a saga's
/// latency.
pub const COMMIT_SECONDS: &str = "saga_commit_seconds";
/// Histogram, seconds, label `participant`: a participant's transaction,
/// from its begin to its commit.
pub const PARTICIPANT_COMMIT_SECONDS: &str = "saga_participant_commit_seconds";
/// Histogram, seconds: from handing an outbox message to the publisher to
/// the broker's confirm, for each message kept as sent: the broker's share
/// of a saga's latency, with the publisher's waits for its connection, a
/// channel and the broker's flow control.
pub const OUTBOX_PUBLISH_SECONDS: &str = "saga_outbox_publish_seconds";
/// Gauge: relays of this process held back by their publisher (the
/// broker's flow control or resource alarm; `Publisher::is_held_back`). A
/// count, not a flag: one process may run several relays.
pub const RELAY_HELD_BACK: &str = "saga_relay_held_back";
/// Counter, label `found` (`current`, `stale`): the engine's kept copies of
/// instances as a commit or a read found them
/// (`EngineConfig::cached_instances`).
pub const INSTANCE_COPIES_TOTAL: &str = "saga_instance_copies_total";
/// Histogram: commands per shared participant transaction committed.
pub const PARTICIPANT_BATCH_SIZE: &str = "saga_participant_batch_size";
/// Counter: commands of a shared participant transaction that failed, run
/// again on their own.
pub const PARTICIPANT_RETRIED_ALONE_TOTAL: &str = "saga_participant_retried_alone_total";
/// Counter, label `joined` (`true`, `false`): lone commands that lingered
/// for company, and whether others joined them.
pub const PARTICIPANT_LINGERS_TOTAL: &str = "saga_participant_lingers_total";

/// The histograms of store and broker latencies, in seconds: a commit or a
/// confirm takes a fraction of a millisecond on an idle machine, so the
/// usual default buckets of Prometheus clients (from 5 ms) tell little.
pub const LATENCY_HISTOGRAMS: [&str; 3] = [COMMIT_SECONDS, PARTICIPANT_COMMIT_SECONDS, OUTBOX_PUBLISH_SECONDS];

/// Gives every saga-core metric its help text in the installed recorder.
/// Call it once, after installing the recorder.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

    describe_counter!(STARTED_TOTAL, "Sagas started, by saga");
    describe_counter!(TRANSITIONS_TOTAL, "Saga transitions committed, by saga");
    describe_counter!(
        FINISHED_TOTAL,
        "Sagas that reached a final status (completed, compensated, needs_attention), by saga and status"
    );
    describe_counter!(
        DEADLINE_FAILURES_TOTAL,
        "Due deadlines that could not be applied and were set aside: the saga needs an operator"
    );
    describe_counter!(
        MESSAGES_TOTAL,
        "Messages consumed, by settlement outcome (ack, retry, dead_letter)"
    );
    describe_counter!(OUTBOX_PUBLISHED_TOTAL, "Outbox messages the broker confirmed");
    describe_counter!(
        OUTBOX_PUBLISH_FAILURES_TOTAL,
        "Outbox messages a relay's round left unsent, at each try (transport failures, a batch given back on the \
         round's time budget, broker refusals)"
    );
    describe_counter!(
        OUTBOX_REFUSED_TOTAL,
        "Outbox messages the broker refused (unroutable, missing exchange, too large) and their sagas' later \
         messages held behind them in the same round, at each try; each is tried again when its lease ends"
    );
    describe_counter!(
        OUTBOX_DISCARDED_TOTAL,
        "Unsent outbox messages an operator gave up; each is never published and is recorded in its saga's history"
    );
    describe_histogram!(
        COMMIT_SECONDS,
        Unit::Seconds,
        "Time a saga transition took to commit in the store, from its transaction's begin (group commit wait \
         included), by saga"
    );
    describe_histogram!(
        PARTICIPANT_COMMIT_SECONDS,
        Unit::Seconds,
        "Time a participant's transaction took, from its begin to its commit, by participant"
    );
    describe_histogram!(
        OUTBOX_PUBLISH_SECONDS,
        Unit::Seconds,
        "Time from handing an outbox message to the publisher to the broker's confirm (connection, channel and \
         flow-control waits included)"
    );
    describe_gauge!(
        RELAY_HELD_BACK,
        "Relays of this process held back by the broker (flow control or a resource alarm)"
    );
    describe_counter!(
        INSTANCE_COPIES_TOTAL,
        "The engine's kept copies of sagas as a commit or a read found them (current, stale); past one stale in \
         eight the engine reads instead"
    );
    describe_histogram!(
        PARTICIPANT_BATCH_SIZE,
        "Commands per shared participant transaction committed"
    );
    describe_counter!(
        PARTICIPANT_RETRIED_ALONE_TOTAL,
        "Commands of a failed shared participant transaction, run again on their own"
    );
    describe_counter!(
        PARTICIPANT_LINGERS_TOTAL,
        "Lone participant commands that waited for company, by whether others joined them"
    );
}
