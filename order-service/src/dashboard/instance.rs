//! The page of one saga instance: its fields, its data, its definition as a
//! diagram with the current step highlighted, its history, and its messages
//! the broker has not confirmed yet.

use std::fmt::Write;

use saga_core::{Cause, Position, SagaId, SagaInstance, Timestamp, Transition, UnsentMessage};

use super::diagram;
use super::html::{esc, page, status_badge, time, time_ago};
use super::position_label;

/// Everything the page shows.
pub struct InstanceView<'a> {
    /// The time the page is rendered at.
    pub now: Timestamp,
    /// The instance.
    pub instance: &'a SagaInstance,
    /// Its history, oldest first.
    pub history: &'a [Transition],
    /// Its definition's flowchart, when this service has that definition and version.
    pub mermaid: Option<String>,
    /// Its definition's step names.
    pub steps: Vec<String>,
    /// Where it stands, in words.
    pub step_label: String,
    /// Its messages in the outbox, not yet confirmed by the broker, oldest
    /// first (the first [`UNSENT_OF_INSTANCE`](crate::admin::UNSENT_OF_INSTANCE)).
    pub unsent: &'a [UnsentMessage],
    /// Whether it has more than those.
    pub more_unsent: bool,
}

/// The whole page.
pub fn render(view: &InstanceView<'_>) -> String {
    let instance = view.instance;
    let mut body = String::new();
    let _ = write!(
        body,
        "<p><a href=\"/\">← Overview</a></p><h1>Saga <span class=\"mono\">{id}</span> {badge}</h1>",
        id = instance.id,
        badge = status_badge(instance.status)
    );

    body.push_str("<section class=\"fields\"><dl>");
    let mut field = |name: &str, value: String| {
        let _ = write!(body, "<dt>{}</dt><dd>{value}</dd>", esc(name));
    };
    field(
        "Definition",
        format!(
            "{} v{} <span class=\"muted\">(data schema v{})</span>",
            esc(&instance.definition),
            instance.definition_version,
            instance.data_version
        ),
    );
    field("Status", status_badge(instance.status));
    field(
        "Current step",
        format!(
            "<span id=\"current-step\">{}</span> <span class=\"muted\">(step counter {})</span>",
            esc(&view.step_label),
            instance.step
        ),
    );
    if let Some(key) = &instance.key {
        field("Key", format!("<span class=\"mono\">{}</span>", esc(key)));
    }
    if let Some(failure) = &instance.failure {
        field(
            "Failure",
            format!("<span class=\"reason\" id=\"failure\">{}</span>", esc(failure)),
        );
    }
    if let Some(awaiting) = &instance.awaiting {
        field(
            "Awaiting the reply to",
            format!("<span class=\"mono\">{}</span>", esc(&awaiting.to_string())),
        );
    }
    if let Some(deadline) = instance.deadline {
        field("Deadline", time(deadline));
    }
    field("Attempt", instance.attempt.to_string());
    field(
        "Started",
        format!(
            "{} ({})",
            time(instance.created_at),
            time_ago(instance.created_at, view.now)
        ),
    );
    field(
        "Last change",
        format!(
            "{} ({})",
            time(instance.updated_at),
            time_ago(instance.updated_at, view.now)
        ),
    );
    field("Revision", instance.revision.to_string());
    body.push_str("</dl></section>");

    let _ = write!(
        body,
        "<section><h2>History</h2><p class=\"muted\">{} transition(s), oldest first.</p><ol class=\"timeline\" id=\"history\">",
        view.history.len()
    );
    for transition in view.history {
        timeline_entry(&mut body, transition, &view.steps);
    }
    body.push_str("</ol></section>");
    if !view.unsent.is_empty() {
        unsent_section(&mut body, view.instance.id, view.unsent, view.more_unsent, view.now);
    }

    body.push_str("<section><h2>Definition</h2>");
    match &view.mermaid {
        Some(mermaid) => {
            let graph = diagram::parse(mermaid);
            let current = diagram::current_node(&graph, instance);
            let _ = write!(
                body,
                "<div class=\"diagram-box\">{}</div><details><summary>Mermaid source</summary><pre class=\"mermaid-source\">{}</pre></details>",
                diagram::svg(&graph, current.as_deref()),
                esc(mermaid)
            );
        }
        None => {
            let _ = write!(
                body,
                "<p class=\"muted\">This service does not register {} v{}, so it cannot draw it.</p>",
                esc(&instance.definition),
                instance.definition_version
            );
        }
    }
    body.push_str("</section>");

    let _ = write!(
        body,
        "<section><h2>Data</h2><pre class=\"data\" id=\"data\">{}</pre></section>",
        esc(&pretty_json(&instance.data))
    );
    page(&format!("Saga {}", instance.id), &body)
}

fn timeline_entry(body: &mut String, transition: &Transition, steps: &[String]) {
    let position = |p: &Position| {
        format!(
            "{} <span class=\"step\">{}</span>",
            status_badge(p.status),
            esc(&position_label(p.status, p.step, steps))
        )
    };
    let before = transition
        .before
        .as_ref()
        .map_or_else(|| "<span class=\"muted\">new</span>".to_owned(), position);
    let _ = write!(
        body,
        "<li class=\"transition\" data-revision=\"{revision}\"><div class=\"when\">{at}</div>\
         <div class=\"cause\">{cause}</div><div class=\"move\">{before} → {after}</div>",
        revision = transition.revision,
        at = time(transition.at),
        cause = cause(&transition.cause),
        after = position(&transition.after),
    );
    if !transition.emitted.is_empty() {
        body.push_str("<div class=\"emitted\">emitted ");
        for (i, (id, kind)) in transition.emitted.iter().enumerate() {
            let _ = write!(
                body,
                "{sep}<span class=\"message\">{kind}</span> <span class=\"mono muted\">{id}</span>",
                sep = if i == 0 { "" } else { ", " },
                kind = esc(kind),
                id = esc(&id.to_string())
            );
        }
        body.push_str("</div>");
    }
    if let Some(note) = &transition.note {
        let _ = write!(body, "<div class=\"note reason\">{}</div>", esc(note));
    }
    body.push_str("</li>");
}

/// Messages still in the outbox: normal for a moment; for longer, the
/// broker is away or refuses them (see the operations guide).
fn unsent_section(body: &mut String, saga: SagaId, unsent: &[UnsentMessage], more: bool, now: Timestamp) {
    let count = if more {
        format!(
            "More than {} message(s) in the outbox (the first {} here)",
            unsent.len(),
            unsent.len()
        )
    } else {
        format!("{} message(s) in the outbox", unsent.len())
    };
    let _ = write!(
        body,
        "<section><h2>Not yet confirmed by the broker</h2><p class=\"muted\">{count}, oldest \
         first. A message still here after a minute is held back: the broker is away, or refuses it (the log \
         says why), and the saga's later messages wait behind it.</p>"
    );
    // The oldest is the one an operator may give up (the operations guide).
    if let Some(oldest) = unsent.first() {
        let _ = write!(
            body,
            "<p class=\"muted\">If the broker will never take it (headers too large for a frame), give it up: \
             <code>sagactl discard {saga} {id} --reason \"…\"</code>. Its event is lost, and recorded in the \
             history.</p>",
            id = oldest.entry.id,
        );
    }
    body.push_str(
        "<table id=\"unsent\"><thead><tr><th>Outbox id</th><th>Type</th><th>Message id</th><th>Destination</th>\
         <th>Created</th><th>Claimed until</th></tr></thead><tbody>",
    );
    for message in unsent {
        let entry = &message.entry;
        let _ = write!(
            body,
            "<tr><td class=\"mono\">{outbox}</td><td><span class=\"message\">{kind}</span></td>\
             <td class=\"mono\">{id}</td><td class=\"mono\">{destination}</td><td>{created}</td><td>{claimed}</td></tr>",
            outbox = entry.id,
            kind = esc(&entry.message.kind),
            id = esc(entry.message.id.as_str()),
            destination = esc(&entry.message.destination),
            created = time_ago(entry.message.timestamp, now),
            claimed = message
                .claimed_until
                .map_or_else(|| "<span class=\"muted\">not claimed</span>".to_owned(), time),
        );
    }
    body.push_str("</tbody></table></section>");
}

fn cause(cause: &Cause) -> String {
    match cause {
        Cause::Started => "started".to_owned(),
        Cause::Message { id, kind } => format!(
            "message <span class=\"message\">{}</span> <span class=\"mono muted\">{}</span>",
            esc(kind),
            esc(&id.to_string())
        ),
        Cause::Deadline { due } => format!("deadline due {}", time(*due)),
        Cause::Operator { action } => format!("operator: {}", esc(action)),
    }
}

/// `data` indented, or as stored when it is not JSON.
fn pretty_json(data: &str) -> String {
    serde_json::from_str::<serde_json::Value>(data)
        .and_then(|value| serde_json::to_string_pretty(&value))
        .unwrap_or_else(|_| data.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::UNSENT_OF_INSTANCE;

    fn view<'a>(instance: &'a SagaInstance, unsent: &'a [UnsentMessage], more_unsent: bool) -> InstanceView<'a> {
        InstanceView {
            now: instance.updated_at,
            instance,
            history: &[],
            mermaid: None,
            steps: Vec::new(),
            step_label: String::new(),
            unsent,
            more_unsent,
        }
    }

    #[test]
    fn messages_the_broker_has_not_confirmed_are_listed_escaped() {
        let instance = saga_core::testkit::store_contract::sample_instance("orders", None);
        let message = saga_core::Message::new("Order<Created>", "orders_exchange", b"{}".to_vec());
        let unsent = [UnsentMessage {
            entry: saga_core::OutboxEntry {
                id: 4711,
                saga: Some(instance.id),
                message: message.clone(),
            },
            claimed_until: Some(instance.updated_at),
        }];
        let page = render(&view(&instance, &unsent, false));
        assert!(page.contains("<table id=\"unsent\">"), "{page}");
        for expected in [
            "1 message(s) in the outbox",
            "<td class=\"mono\">4711</td>",
            "Order&lt;Created&gt;",
            message.id.as_str(),
            "orders_exchange",
            &time(instance.updated_at),
            &format!("<code>sagactl discard {} 4711 --reason", instance.id),
        ] {
            assert!(page.contains(expected), "`{expected}` in {page}");
        }
        let page = render(&view(&instance, &[], false));
        assert!(!page.contains("id=\"unsent\""), "no section without unsent messages");
        let many = vec![unsent[0].clone(); UNSENT_OF_INSTANCE];
        let page = render(&view(&instance, &many, true));
        assert!(
            page.contains("More than 20 message(s) in the outbox (the first 20 here)"),
            "{page}"
        );
        assert_eq!(page.matches("<td class=\"mono\">4711</td>").count(), UNSENT_OF_INSTANCE);
    }

    #[test]
    fn data_is_indented_when_it_is_json() {
        assert_eq!(pretty_json(r#"{"a":[1]}"#), "{\n  \"a\": [\n    1\n  ]\n}");
        assert_eq!(pretty_json("not json <b>"), "not json <b>");
    }
}
