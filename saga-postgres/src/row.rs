//! Reading rows back into saga-core types. A row that does not fit is
//! `StoreError::Corrupt`, never a panic.

use std::collections::BTreeMap;

use saga_core::{
    Cause, Message, MessageId, OutboxEntry, Position, SagaId, SagaInstance, SagaStatus, StoreError, Timestamp,
    Transition, UnsentMessage,
};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use crate::error::{corrupt, store_error};

/// The columns [`instance`] reads, in a `SELECT`.
macro_rules! instance_columns {
    () => {
        "id, definition, definition_version, key, status, step, attempt, awaiting, deadline, failure, \
         data::text AS data, data_version, revision, created_at, updated_at"
    };
}
pub(crate) use instance_columns;

pub(crate) fn get<'r, T>(row: &'r PgRow, column: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(column).map_err(store_error)
}

fn u32_of(value: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|e| corrupt(format!("{what} = {value}"), e))
}

/// A `saga_instances` row.
pub(crate) fn instance(row: &PgRow) -> Result<SagaInstance, StoreError> {
    let id = SagaId::from_uuid(get::<Uuid>(row, "id")?);
    let what = |field: &str| format!("saga_instances {id} {field}");
    let status: String = get(row, "status")?;
    let status = status.parse::<SagaStatus>().map_err(|e| corrupt(what("status"), e))?;
    let revision: i64 = get(row, "revision")?;
    Ok(SagaInstance {
        id,
        definition: get(row, "definition")?,
        definition_version: u32_of(get(row, "definition_version")?, &what("definition_version"))?,
        key: get(row, "key")?,
        status,
        step: u32_of(get(row, "step")?, &what("step"))?,
        attempt: u32_of(get(row, "attempt")?, &what("attempt"))?,
        awaiting: get::<Option<String>>(row, "awaiting")?.map(MessageId::from),
        deadline: get::<Option<i64>>(row, "deadline")?.map(Timestamp::from_millis),
        failure: get(row, "failure")?,
        data: get(row, "data")?,
        data_version: u32_of(get(row, "data_version")?, &what("data_version"))?,
        revision: u64::try_from(revision).map_err(|e| corrupt(what("revision"), e))?,
        created_at: Timestamp::from_millis(get(row, "created_at")?),
        updated_at: Timestamp::from_millis(get(row, "updated_at")?),
    })
}

fn json<T: serde::de::DeserializeOwned>(row: &PgRow, column: &str, what: &str) -> Result<T, StoreError> {
    let sqlx::types::Json(value) = get::<sqlx::types::Json<serde_json::Value>>(row, column)?;
    serde_json::from_value(value).map_err(|e| corrupt(format!("{what} {column}"), e))
}

/// A `saga_history` row.
pub(crate) fn transition(row: &PgRow) -> Result<Transition, StoreError> {
    let saga_id = SagaId::from_uuid(get::<Uuid>(row, "saga_id")?);
    let revision: i64 = get(row, "revision")?;
    let what = format!("saga_history {saga_id}/{revision}");
    let before: Option<sqlx::types::Json<serde_json::Value>> = get(row, "before")?;
    let before: Option<Position> = match before {
        Some(sqlx::types::Json(value)) => {
            Some(serde_json::from_value(value).map_err(|e| corrupt(format!("{what} before"), e))?)
        }
        None => None,
    };
    Ok(Transition {
        saga_id,
        revision: u64::try_from(revision).map_err(|e| corrupt(what.clone(), e))?,
        at: Timestamp::from_millis(get(row, "at")?),
        cause: json::<Cause>(row, "cause", &what)?,
        before,
        after: json::<Position>(row, "after", &what)?,
        emitted: json::<Vec<(MessageId, String)>>(row, "emitted", &what)?,
        note: get(row, "note")?,
    })
}

/// A `saga_outbox` row.
pub(crate) fn outbox_entry(row: &PgRow) -> Result<OutboxEntry, StoreError> {
    let id: i64 = get(row, "id")?;
    let headers: BTreeMap<String, String> = json(row, "headers", &format!("saga_outbox {id}"))?;
    outbox_entry_with(row, id, headers)
}

fn outbox_entry_with(row: &PgRow, id: i64, headers: BTreeMap<String, String>) -> Result<OutboxEntry, StoreError> {
    Ok(OutboxEntry {
        id,
        saga: get::<Option<Uuid>>(row, "saga_id")?.map(SagaId::from_uuid),
        message: Message {
            id: MessageId::from(get::<String>(row, "message_id")?),
            kind: get(row, "kind")?,
            destination: get(row, "destination")?,
            correlation_id: get(row, "correlation_id")?,
            timestamp: Timestamp::from_millis(get(row, "created_at")?),
            headers,
            payload: get(row, "payload")?,
        },
    })
}

/// The header name an operator's listing shows a row's headers under when
/// they are not names and texts: as their JSON.
const UNREADABLE_HEADERS: &str = "(unreadable headers)";

/// A `saga_outbox` row with its lease in milliseconds (`claimed_until`),
/// for operators. Headers that are not names and texts (a row written by
/// hand or by another tool, which the relay cannot read and leaves unsent,
/// holding its saga back) are shown rather than failing the listing: an
/// object's values as their JSON, anything else whole under
/// [`UNREADABLE_HEADERS`].
pub(crate) fn unsent_message(row: &PgRow) -> Result<UnsentMessage, StoreError> {
    Ok(UnsentMessage {
        entry: shown_outbox_entry(row)?,
        claimed_until: get::<Option<i64>>(row, "claimed_until")?.map(Timestamp::from_millis),
    })
}

/// A `saga_outbox` row as an operator sees it: headers that are not names
/// and texts are shown as [`unsent_message`] shows them.
pub(crate) fn shown_outbox_entry(row: &PgRow) -> Result<OutboxEntry, StoreError> {
    use serde_json::Value;

    let id: i64 = get(row, "id")?;
    let sqlx::types::Json(headers) = get::<sqlx::types::Json<Value>>(row, "headers")?;
    let headers = match headers {
        Value::Object(map) => map
            .into_iter()
            .map(|(name, value)| match value {
                Value::String(text) => (name, text),
                other => (name, other.to_string()),
            })
            .collect(),
        other => BTreeMap::from([(UNREADABLE_HEADERS.to_owned(), other.to_string())]),
    };
    outbox_entry_with(row, id, headers)
}
