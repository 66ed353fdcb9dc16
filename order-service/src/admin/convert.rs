//! Between saga-core's values and the admin API's messages: parsing request
//! fields (an error names the field) and building responses.

use std::collections::HashMap;
use std::time::Duration;

use saga_core::{
    Cause, DeadLetterPage, Engine, InstanceCursor, OutboxEntry, Position, ReplayReport, SagaId, SagaInstance,
    SagaStatus, Timestamp, Transition, UnsentMessage,
};

use super::AdminError;
use super::proto;

/// How much of a message's body is shown (dead letters, unsent messages).
pub(super) const BODY_PREVIEW_BYTES: usize = 512;

pub(super) fn status_from_proto(value: i32) -> Result<SagaStatus, AdminError> {
    match proto::SagaStatus::try_from(value) {
        Ok(proto::SagaStatus::Running) => Ok(SagaStatus::Running),
        Ok(proto::SagaStatus::Compensating) => Ok(SagaStatus::Compensating),
        Ok(proto::SagaStatus::Completed) => Ok(SagaStatus::Completed),
        Ok(proto::SagaStatus::Compensated) => Ok(SagaStatus::Compensated),
        Ok(proto::SagaStatus::NeedsAttention) => Ok(SagaStatus::NeedsAttention),
        Ok(proto::SagaStatus::Unspecified) | Err(_) => {
            Err(AdminError::invalid("statuses", format!("{value} is not a saga status")))
        }
    }
}

pub(super) fn status_to_proto(status: SagaStatus) -> i32 {
    let status = match status {
        SagaStatus::Running => proto::SagaStatus::Running,
        SagaStatus::Compensating => proto::SagaStatus::Compensating,
        SagaStatus::Completed => proto::SagaStatus::Completed,
        SagaStatus::Compensated => proto::SagaStatus::Compensated,
        SagaStatus::NeedsAttention => proto::SagaStatus::NeedsAttention,
    };
    status as i32
}

/// A non-negative duration.
pub(super) fn duration(field: &'static str, value: prost_types::Duration) -> Result<Duration, AdminError> {
    Duration::try_from(value).map_err(|_| AdminError::invalid(field, "must be a duration of at least 0"))
}

/// A saga id given in `field`.
pub(super) fn saga_id(field: &'static str, value: &str) -> Result<SagaId, AdminError> {
    if value.trim().is_empty() {
        return Err(AdminError::invalid(field, "is required (a saga id, a UUID)"));
    }
    value
        .trim()
        .parse()
        .map_err(|_| AdminError::invalid(field, format!("`{value}` is not a saga id (a UUID)")))
}

/// The token of the page after `last`: `<updated_at ms>.<id>`.
pub(super) fn page_token_of(last: &SagaInstance) -> String {
    let cursor = InstanceCursor::of(last);
    format!("{}.{}", cursor.updated_at.as_millis(), cursor.id)
}

pub(super) fn page_token(token: &str) -> Result<Option<InstanceCursor>, AdminError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || AdminError::invalid("page_token", "not a token from a previous response");
    let (millis, id) = token.split_once('.').ok_or_else(invalid)?;
    Ok(Some(InstanceCursor {
        updated_at: Timestamp::from_millis(millis.parse().map_err(|_| invalid())?),
        id: id.parse().map_err(|_| invalid())?,
    }))
}

pub(super) fn timestamp(at: Timestamp) -> prost_types::Timestamp {
    let millis = at.as_millis();
    prost_types::Timestamp {
        seconds: millis.div_euclid(1000),
        // Below 1e9 by construction.
        nanos: i32::try_from(millis.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// The step an instance at `status` and step counter `step` is at: the one
/// running, or the next to compensate; empty when finished or unknown.
pub(super) fn step_name(steps: &[String], status: SagaStatus, step: u32) -> String {
    let index = match status {
        SagaStatus::Running => Some(step as usize),
        SagaStatus::Compensating | SagaStatus::NeedsAttention => (step as usize).checked_sub(1),
        SagaStatus::Completed | SagaStatus::Compensated => None,
    };
    index.and_then(|i| steps.get(i)).cloned().unwrap_or_default()
}

pub(super) fn instance(engine: &Engine, instance: &SagaInstance) -> proto::SagaInstance {
    let steps = engine
        .step_names(&instance.definition, instance.definition_version)
        .unwrap_or_default();
    proto::SagaInstance {
        id: instance.id.to_string(),
        definition: instance.definition.clone(),
        definition_version: instance.definition_version,
        key: instance.key.clone().unwrap_or_default(),
        status: status_to_proto(instance.status),
        step: instance.step,
        current_step: step_name(&steps, instance.status, instance.step),
        attempt: instance.attempt,
        awaiting_message_id: instance.awaiting.as_ref().map(ToString::to_string).unwrap_or_default(),
        deadline: instance.deadline.map(timestamp),
        failure: instance.failure.clone().unwrap_or_default(),
        data_json: instance.data.clone(),
        data_version: instance.data_version,
        revision: instance.revision,
        created_at: Some(timestamp(instance.created_at)),
        updated_at: Some(timestamp(instance.updated_at)),
    }
}

fn position(steps: &[String], position: &Position) -> proto::Position {
    proto::Position {
        status: status_to_proto(position.status),
        step: position.step,
        step_name: step_name(steps, position.status, position.step),
    }
}

pub(super) fn transition(steps: &[String], transition: &Transition) -> proto::Transition {
    use proto::cause::Kind;
    let cause = match &transition.cause {
        Cause::Started => Kind::Started(proto::Started {}),
        Cause::Message { id, kind } => Kind::Message(proto::MessageCause {
            message_id: id.to_string(),
            r#type: kind.clone(),
        }),
        Cause::Deadline { due } => Kind::Deadline(proto::DeadlineCause {
            due: Some(timestamp(*due)),
        }),
        Cause::Operator { action } => Kind::Operator(proto::OperatorCause { action: action.clone() }),
    };
    proto::Transition {
        revision: transition.revision,
        at: Some(timestamp(transition.at)),
        cause: Some(proto::Cause { kind: Some(cause) }),
        before: transition.before.as_ref().map(|p| position(steps, p)),
        after: Some(position(steps, &transition.after)),
        emitted: transition
            .emitted
            .iter()
            .map(|(id, kind)| proto::EmittedMessage {
                message_id: id.to_string(),
                r#type: kind.clone(),
            })
            .collect(),
        note: transition.note.clone().unwrap_or_default(),
    }
}

pub(super) fn dead_letter_queue(queue: String, page: DeadLetterPage) -> proto::DeadLetterQueue {
    proto::DeadLetterQueue {
        dead_letter_queue: format!("{queue}.dlq"),
        queue,
        total: page.total as u64,
        messages: page
            .letters
            .into_iter()
            .map(|letter| {
                let message = letter.message;
                let (original_exchange, original_routing_key) = letter
                    .origin
                    .as_ref()
                    .map(|o| (o.destination.clone(), o.routing_key.clone().unwrap_or_default()))
                    .unwrap_or_default();
                proto::DeadLetter {
                    message_id: message.id.to_string(),
                    r#type: message.kind,
                    reason: letter.reason.unwrap_or_default(),
                    original_exchange,
                    original_routing_key,
                    replayable: letter.origin.is_some(),
                    retries: letter.retries,
                    correlation_id: message.correlation_id.unwrap_or_default(),
                    timestamp: Some(timestamp(message.timestamp)),
                    headers: message.headers.into_iter().collect::<HashMap<_, _>>(),
                    body_preview: body_preview(&message.payload),
                    body_size: message.payload.len() as u64,
                }
            })
            .collect(),
    }
}

pub(super) fn unsent_message(unsent: UnsentMessage) -> proto::UnsentMessage {
    let UnsentMessage {
        entry: OutboxEntry { id, saga, message },
        claimed_until,
    } = unsent;
    proto::UnsentMessage {
        outbox_id: id,
        saga_id: saga.map(|s| s.to_string()).unwrap_or_default(),
        message_id: message.id.to_string(),
        r#type: message.kind,
        destination: message.destination,
        correlation_id: message.correlation_id.unwrap_or_default(),
        timestamp: Some(timestamp(message.timestamp)),
        claimed_until: claimed_until.map(timestamp),
        headers: message.headers.into_iter().collect::<HashMap<_, _>>(),
        body_preview: body_preview(&message.payload),
        body_size: message.payload.len() as u64,
    }
}

/// The first [`BODY_PREVIEW_BYTES`] of a body, as text.
fn body_preview(payload: &[u8]) -> String {
    String::from_utf8_lossy(&payload[..payload.len().min(BODY_PREVIEW_BYTES)]).into_owned()
}

pub(super) fn replay_report(report: ReplayReport) -> proto::ReplayDeadLettersResponse {
    proto::ReplayDeadLettersResponse {
        replayed: report.replayed.iter().map(ToString::to_string).collect(),
        not_found: report.not_found.iter().map(ToString::to_string).collect(),
        failed: report
            .failed
            .into_iter()
            .map(|f| proto::ReplayFailure {
                message_id: f.id.to_string(),
                reason: f.reason,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_junk_names_the_field() {
        let instance = saga_core::testkit::store_contract::sample_instance("orders", None);
        let token = page_token_of(&instance);
        assert_eq!(page_token(&token).expect("valid"), Some(InstanceCursor::of(&instance)));
        assert_eq!(page_token("").expect("none"), None);
        for junk in ["x", "12.not-a-uuid", "a.0190b5c2-0000-7000-8000-000000000001"] {
            let error = page_token(junk).expect_err("junk");
            assert!(error.to_string().starts_with("page_token: "), "{error}");
        }
    }

    #[test]
    fn the_current_step_is_the_running_one_or_the_next_to_compensate() {
        let steps: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        assert_eq!(step_name(&steps, SagaStatus::Running, 1), "b");
        assert_eq!(step_name(&steps, SagaStatus::Compensating, 1), "a");
        assert_eq!(step_name(&steps, SagaStatus::NeedsAttention, 2), "b");
        assert_eq!(step_name(&steps, SagaStatus::Compensating, 0), "");
        assert_eq!(step_name(&steps, SagaStatus::Completed, 3), "");
        assert_eq!(step_name(&steps, SagaStatus::Running, 9), "", "unknown steps are empty");
    }

    #[test]
    fn statuses_map_both_ways_and_unknown_ones_are_invalid() {
        for status in [
            SagaStatus::Running,
            SagaStatus::Compensating,
            SagaStatus::Completed,
            SagaStatus::Compensated,
            SagaStatus::NeedsAttention,
        ] {
            assert_eq!(status_from_proto(status_to_proto(status)).expect("known"), status);
        }
        for unknown in [0, 42, -1] {
            let error = status_from_proto(unknown).expect_err("unknown");
            assert!(error.to_string().starts_with("statuses: "), "{error}");
        }
    }

    #[test]
    fn times_keep_their_milliseconds() {
        let at = timestamp(Timestamp::from_millis(1_700_000_000_123));
        assert_eq!((at.seconds, at.nanos), (1_700_000_000, 123_000_000));
        let before_epoch = timestamp(Timestamp::from_millis(-1));
        assert_eq!((before_epoch.seconds, before_epoch.nanos), (-1, 999_000_000));
    }

    #[test]
    fn ids_and_durations_are_checked() {
        assert!(saga_id("id", "").expect_err("empty").to_string().starts_with("id: "));
        assert!(saga_id("id", "nope").expect_err("junk").to_string().starts_with("id: "));
        assert!(
            saga_id("saga_id", "nope")
                .expect_err("junk")
                .to_string()
                .starts_with("saga_id: ")
        );
        assert!(saga_id("saga_id", &SagaId::new().to_string()).is_ok());
        let negative = prost_types::Duration { seconds: -5, nanos: 0 };
        assert!(
            duration("stuck_for", negative)
                .expect_err("negative")
                .to_string()
                .starts_with("stuck_for: ")
        );
    }
}
