//! How `sagactl` prints answers: aligned tables for people, JSON for tools.

use std::io::{self, Write};

use order_service::admin::proto::{self as admin, cause};
use saga_core::SagaStatus;
use serde_json::{Value, json};

/// The wire value of `status`.
pub(super) fn status_to_proto(status: SagaStatus) -> i32 {
    let status = match status {
        SagaStatus::Running => admin::SagaStatus::Running,
        SagaStatus::Compensating => admin::SagaStatus::Compensating,
        SagaStatus::Completed => admin::SagaStatus::Completed,
        SagaStatus::Compensated => admin::SagaStatus::Compensated,
        SagaStatus::NeedsAttention => admin::SagaStatus::NeedsAttention,
    };
    status as i32
}

/// The lower-case name of a wire status, as `--status` takes it.
pub(super) fn status_name(status: i32) -> &'static str {
    match admin::SagaStatus::try_from(status) {
        Ok(admin::SagaStatus::Running) => "running",
        Ok(admin::SagaStatus::Compensating) => "compensating",
        Ok(admin::SagaStatus::Completed) => "completed",
        Ok(admin::SagaStatus::Compensated) => "compensated",
        Ok(admin::SagaStatus::NeedsAttention) => "needs_attention",
        Ok(admin::SagaStatus::Unspecified) | Err(_) => "unknown",
    }
}

/// `2026-01-31T12:00:00.123Z`, or `-` when absent.
pub(super) fn time(at: Option<&prost_types::Timestamp>) -> String {
    let Some(at) = at else {
        return "-".to_owned();
    };
    let days = at.seconds.div_euclid(86_400);
    let second_of_day = at.seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        at.nanos.clamp(0, 999_999_999) / 1_000_000
    )
}

/// The Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Both fit: day is 1..=31, month 1..=12.
    (year, u32::try_from(month).unwrap_or(0), u32::try_from(day).unwrap_or(0))
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut text = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            text.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                text.extend(std::iter::repeat_n(' ', pad));
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut text = line(headers.to_vec());
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    text
}

/// `text` on one line, at most `max` characters.
/// Writes to its inner writer with control characters other than line
/// breaks shown as `U+FFFD`. Text from the service (a failure reason, a
/// dead letter's id, type or origin) was written by whoever published the
/// message, and an escape sequence in it could rewrite what the operator
/// sees. JSON output escapes them already.
pub struct Visible<'a>(pub &'a mut (dyn Write + Send));

impl Write for Visible<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Formatting writes whole strings, so a chunk never splits a character.
        let shown: String = String::from_utf8_lossy(buf)
            .chars()
            .map(|c| {
                if c.is_control() && c != '\n' {
                    char::REPLACEMENT_CHARACTER
                } else {
                    c
                }
            })
            .collect();
        self.0.write_all(shown.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn short(text: &str, max: usize) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if flat.chars().count() <= max {
        flat
    } else {
        let kept: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".to_owned()
    } else {
        text.to_owned()
    }
}

fn step(name: &str, counter: u32) -> String {
    if name.is_empty() {
        counter.to_string()
    } else {
        format!("{name} ({counter})")
    }
}

fn write_json(out: &mut (dyn Write + Send), value: &Value) -> io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(io::Error::other)?;
    writeln!(out, "{text}")
}

fn instance_json(instance: &admin::SagaInstance) -> Value {
    let data = serde_json::from_str::<Value>(&instance.data_json).unwrap_or_else(|_| json!(instance.data_json));
    json!({
        "id": instance.id,
        "definition": instance.definition,
        "definition_version": instance.definition_version,
        "key": instance.key,
        "status": status_name(instance.status),
        "step": instance.step,
        "current_step": instance.current_step,
        "attempt": instance.attempt,
        "awaiting_message_id": instance.awaiting_message_id,
        "deadline": instance.deadline.as_ref().map(|t| time(Some(t))),
        "failure": instance.failure,
        "data": data,
        "data_version": instance.data_version,
        "revision": instance.revision,
        "created_at": time(instance.created_at.as_ref()),
        "updated_at": time(instance.updated_at.as_ref()),
    })
}

/// `list`.
pub(super) fn instances(
    out: &mut (dyn Write + Send),
    response: &admin::ListInstancesResponse,
    json: bool,
) -> io::Result<()> {
    if json {
        let instances: Vec<Value> = response.instances.iter().map(instance_json).collect();
        return write_json(
            out,
            &json!({"instances": instances, "next_page_token": response.next_page_token}),
        );
    }
    let rows: Vec<Vec<String>> = response
        .instances
        .iter()
        .map(|i| {
            vec![
                i.id.clone(),
                format!("{} v{}", i.definition, i.definition_version),
                status_name(i.status).to_owned(),
                step(&i.current_step, i.step),
                time(i.updated_at.as_ref()),
                short(&i.failure, 60),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(&["ID", "DEFINITION", "STATUS", "STEP", "UPDATED", "FAILURE"], &rows)
    )?;
    writeln!(out, "{} instance(s)", rows.len())?;
    if !response.next_page_token.is_empty() {
        writeln!(out, "more: --page-token {}", response.next_page_token)?;
    }
    Ok(())
}

fn cause_text(transition: &admin::Transition) -> (String, Value) {
    match transition.cause.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(cause::Kind::Started(_)) => ("started".to_owned(), json!({"type": "started"})),
        Some(cause::Kind::Message(m)) => (
            format!("message {} {}", or_dash(&m.r#type), m.message_id),
            json!({"type": "message", "message_id": m.message_id, "message_type": m.r#type}),
        ),
        Some(cause::Kind::Deadline(d)) => (
            format!("deadline {}", time(d.due.as_ref())),
            json!({"type": "deadline", "due": time(d.due.as_ref())}),
        ),
        Some(cause::Kind::Operator(o)) => (
            format!("operator {}", o.action),
            json!({"type": "operator", "action": o.action}),
        ),
        None => ("?".to_owned(), Value::Null),
    }
}

fn position_text(position: Option<&admin::Position>) -> String {
    position.map_or_else(
        || "-".to_owned(),
        |p| {
            if p.step_name.is_empty() {
                status_name(p.status).to_owned()
            } else {
                format!("{} {}", status_name(p.status), p.step_name)
            }
        },
    )
}

fn position_json(position: Option<&admin::Position>) -> Value {
    position.map_or(
        Value::Null,
        |p| json!({"status": status_name(p.status), "step": p.step, "step_name": p.step_name}),
    )
}

/// `show`: the instance, then its timeline.
pub(super) fn instance_with_history(
    out: &mut (dyn Write + Send),
    response: &admin::GetInstanceResponse,
    json: bool,
) -> io::Result<()> {
    let Some(instance) = response.instance.as_ref() else {
        return writeln!(out, "(no instance in the answer)");
    };
    if json {
        let history: Vec<Value> = response
            .history
            .iter()
            .map(|t| {
                json!({
                    "revision": t.revision,
                    "at": time(t.at.as_ref()),
                    "cause": cause_text(t).1,
                    "before": position_json(t.before.as_ref()),
                    "after": position_json(t.after.as_ref()),
                    "emitted": t.emitted.iter().map(|e| json!({"message_id": e.message_id, "type": e.r#type})).collect::<Vec<_>>(),
                    "note": t.note,
                })
            })
            .collect();
        return write_json(
            out,
            &json!({
                "instance": instance_json(instance),
                "steps": response.steps,
                "history": history,
                "unsent": response.unsent.iter().map(unsent_json).collect::<Vec<_>>(),
                "more_unsent": response.more_unsent,
            }),
        );
    }
    let fields = [
        ("saga", instance.id.clone()),
        (
            "definition",
            format!("{} v{}", instance.definition, instance.definition_version),
        ),
        ("steps", or_dash(&response.steps.join(" → "))),
        ("status", status_name(instance.status).to_owned()),
        ("step", step(&instance.current_step, instance.step)),
        ("attempt", instance.attempt.to_string()),
        ("key", or_dash(&instance.key)),
        ("awaiting", or_dash(&instance.awaiting_message_id)),
        ("deadline", time(instance.deadline.as_ref())),
        ("failure", or_dash(&instance.failure)),
        ("started", time(instance.created_at.as_ref())),
        ("updated", time(instance.updated_at.as_ref())),
        ("revision", instance.revision.to_string()),
        ("data", short(&instance.data_json, 200)),
    ];
    for (name, value) in fields {
        writeln!(out, "{name:<11}{value}")?;
    }
    writeln!(out)?;
    writeln!(out, "timeline")?;
    let rows: Vec<Vec<String>> = response
        .history
        .iter()
        .map(|t| {
            let emitted: Vec<String> = t
                .emitted
                .iter()
                .map(|e| format!("{} {}", e.r#type, e.message_id))
                .collect();
            vec![
                t.revision.to_string(),
                time(t.at.as_ref()),
                cause_text(t).0,
                format!(
                    "{} → {}",
                    position_text(t.before.as_ref()),
                    position_text(t.after.as_ref())
                ),
                or_dash(&emitted.join(", ")),
                or_dash(&short(&t.note, 80)),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(&["REV", "AT", "CAUSE", "BEFORE → AFTER", "EMITTED", "NOTE"], &rows)
    )?;
    if !response.unsent.is_empty() {
        writeln!(out)?;
        writeln!(out, "not yet confirmed by the broker")?;
        write!(out, "{}", unsent_table(&response.unsent))?;
        if response.more_unsent {
            writeln!(out, "(and more: `sagactl outbox --saga {}` lists them)", instance.id)?;
        }
    }
    Ok(())
}

/// `outbox`.
pub(super) fn unsent(out: &mut (dyn Write + Send), messages: &[admin::UnsentMessage], json: bool) -> io::Result<()> {
    if json {
        return write_json(
            out,
            &json!({"messages": messages.iter().map(unsent_json).collect::<Vec<_>>()}),
        );
    }
    if messages.is_empty() {
        return writeln!(out, "the outbox holds no unsent message (matching the filters)");
    }
    write!(out, "{}", unsent_table(messages))
}

fn unsent_table(messages: &[admin::UnsentMessage]) -> String {
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            vec![
                m.outbox_id.to_string(),
                or_dash(&m.saga_id),
                m.message_id.clone(),
                or_dash(&m.r#type),
                or_dash(&m.destination),
                time(m.timestamp.as_ref()),
                time(m.claimed_until.as_ref()),
                short(&m.body_preview, 60),
            ]
        })
        .collect();
    table(
        &[
            "OUTBOX ID",
            "SAGA",
            "MESSAGE ID",
            "TYPE",
            "DESTINATION",
            "CREATED",
            "CLAIMED UNTIL",
            "BODY",
        ],
        &rows,
    )
}

fn unsent_json(m: &admin::UnsentMessage) -> Value {
    json!({
        "outbox_id": m.outbox_id,
        "saga_id": m.saga_id,
        "message_id": m.message_id,
        "type": m.r#type,
        "destination": m.destination,
        "correlation_id": m.correlation_id,
        "timestamp": time(m.timestamp.as_ref()),
        "claimed_until": m.claimed_until.as_ref().map(|at| time(Some(at))),
        "headers": m.headers,
        "body_preview": m.body_preview,
        "body_size": m.body_size,
    })
}

/// `retry`, `cancel`, `resume`: what the instance is now.
pub(super) fn acted(
    out: &mut (dyn Write + Send),
    done: &str,
    instance: &admin::SagaInstance,
    json: bool,
) -> io::Result<()> {
    if json {
        return write_json(out, &json!({"action": done, "instance": instance_json(instance)}));
    }
    writeln!(
        out,
        "{done} saga {}: now {} at {}{}",
        instance.id,
        status_name(instance.status),
        step(&instance.current_step, instance.step),
        if instance.failure.is_empty() {
            String::new()
        } else {
            format!(" (failure: {})", instance.failure)
        }
    )
}

/// `discard`: the message given up, and what the instance is now.
pub(super) fn discarded(
    out: &mut (dyn Write + Send),
    outbox_id: i64,
    instance: &admin::SagaInstance,
    json: bool,
) -> io::Result<()> {
    if json {
        return write_json(
            out,
            &json!({"action": "discarded", "outbox_id": outbox_id, "instance": instance_json(instance)}),
        );
    }
    acted(out, &format!("gave up outbox message {outbox_id} of"), instance, json)
}

/// `dlq list`.
pub(super) fn dead_letters(
    out: &mut (dyn Write + Send),
    response: &admin::ListDeadLettersResponse,
    json: bool,
) -> io::Result<()> {
    if json {
        let queues: Vec<Value> = response
            .queues
            .iter()
            .map(|q| {
                let messages: Vec<Value> = q
                    .messages
                    .iter()
                    .map(|m| {
                        json!({
                            "message_id": m.message_id,
                            "type": m.r#type,
                            "reason": m.reason,
                            "original_exchange": m.original_exchange,
                            "original_routing_key": m.original_routing_key,
                            "replayable": m.replayable,
                            "retries": m.retries,
                            "correlation_id": m.correlation_id,
                            "timestamp": time(m.timestamp.as_ref()),
                            "headers": m.headers,
                            "body_preview": m.body_preview,
                            "body_size": m.body_size,
                        })
                    })
                    .collect();
                json!({
                    "queue": q.queue,
                    "dead_letter_queue": q.dead_letter_queue,
                    "total": q.total,
                    "messages": messages,
                })
            })
            .collect();
        return write_json(out, &json!({"queues": queues}));
    }
    for (i, queue) in response.queues.iter().enumerate() {
        if i > 0 {
            writeln!(out)?;
        }
        writeln!(
            out,
            "{}: {} message(s){}",
            queue.dead_letter_queue,
            queue.total,
            if (queue.messages.len() as u64) < queue.total {
                format!(", the first {} shown", queue.messages.len())
            } else {
                String::new()
            }
        )?;
        if queue.messages.is_empty() {
            continue;
        }
        let rows: Vec<Vec<String>> = queue
            .messages
            .iter()
            .map(|m| {
                let origin = if m.replayable {
                    format!(
                        "{}{}",
                        or_dash(&m.original_exchange),
                        if m.original_routing_key.is_empty() {
                            String::new()
                        } else {
                            format!(" / {}", m.original_routing_key)
                        }
                    )
                } else {
                    "(unknown: not replayable)".to_owned()
                };
                vec![
                    m.message_id.clone(),
                    or_dash(&m.r#type),
                    m.retries.to_string(),
                    origin,
                    short(&m.reason, 60),
                    short(&m.body_preview, 60),
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(&["MESSAGE ID", "TYPE", "RETRIES", "ORIGIN", "REASON", "BODY"], &rows)
        )?;
    }
    Ok(())
}

/// `dlq replay`.
pub(super) fn replay(
    out: &mut (dyn Write + Send),
    report: &admin::ReplayDeadLettersResponse,
    json: bool,
) -> io::Result<()> {
    if json {
        let failed: Vec<Value> = report
            .failed
            .iter()
            .map(|f| json!({"message_id": f.message_id, "reason": f.reason}))
            .collect();
        return write_json(
            out,
            &json!({"replayed": report.replayed, "not_found": report.not_found, "failed": failed}),
        );
    }
    writeln!(out, "replayed {} message(s)", report.replayed.len())?;
    for id in &report.replayed {
        writeln!(out, "  {id}")?;
    }
    if !report.not_found.is_empty() {
        writeln!(
            out,
            "not found in any dead-letter queue: {}",
            report.not_found.join(", ")
        )?;
    }
    for failure in &report.failed {
        writeln!(
            out,
            "left in the dead-letter queue: {}: {}",
            failure.message_id, failure.reason
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_service_cannot_send_the_terminal_escape_sequences() {
        let mut written = Vec::new();
        let mut visible = Visible(&mut written);
        // A failure reason that would clear the screen and hide what follows.
        writeln!(visible, "failure: out of stock\x1b[2J\x1b[1A\u{9b}31mok\tdone").expect("written");
        let shown = String::from_utf8(written).expect("UTF-8");
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n'), "{shown:?}");
        assert_eq!(
            shown,
            "failure: out of stock\u{fffd}[2J\u{fffd}[1A\u{fffd}31mok\u{fffd}done\n"
        );
    }

    #[test]
    fn a_discard_names_the_message_in_text_and_json() {
        let instance = admin::SagaInstance {
            id: "s-1".into(),
            current_step: "reserve-stock".into(),
            step: 1,
            ..admin::SagaInstance::default()
        };
        let mut text = Vec::new();
        discarded(&mut text, 7, &instance, false).expect("written");
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(text.starts_with("gave up outbox message 7 of saga s-1: now "), "{text}");
        let mut json = Vec::new();
        discarded(&mut json, 7, &instance, true).expect("written");
        let json: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(
            (&json["action"], &json["outbox_id"], &json["instance"]["id"]),
            (&"discarded".into(), &7.into(), &"s-1".into())
        );
    }

    #[test]
    fn times_print_as_utc() {
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(time(Some(&at(0, 0))), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(Some(&at(1_700_000_000, 123_000_000))), "2023-11-14T22:13:20.123Z");
        assert_eq!(time(Some(&at(951_825_600, 0))), "2000-02-29T12:00:00.000Z");
        assert_eq!(time(Some(&at(-1, 0))), "1969-12-31T23:59:59.000Z");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn tables_align_and_trim() {
        let text = table(
            &["ID", "STATUS", "NOTE"],
            &[
                vec!["a".into(), "running".into(), "".into()],
                vec!["bbbb".into(), "x".into(), "long note".into()],
            ],
        );
        assert_eq!(text, "ID    STATUS   NOTE\na     running\nbbbb  x        long note\n");
    }

    #[test]
    fn long_text_is_cut_on_one_line() {
        assert_eq!(short("a\nb", 10), "a b");
        assert_eq!(short("abcdef", 4), "abc…");
        assert_eq!(short("äöü", 3), "äöü");
    }
}
