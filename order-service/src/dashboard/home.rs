//! The overview page.

use std::fmt::Write;
use std::time::Duration;

use saga_core::{MINUTE, MinuteOutcomes, SagaInstance, SagaStatus, Summary, Timestamp};

use super::html::{clock_minute, duration, esc, page, query_value, status_badge, status_label, time, time_ago};

/// Everything the overview shows.
pub struct HomeView<'a> {
    /// The time the page is rendered at.
    pub now: Timestamp,
    /// The first minute of the chart.
    pub first_minute: Timestamp,
    /// How many minutes the chart covers.
    pub minutes: u32,
    /// How long an unfinished instance may stay unchanged before it is stuck.
    pub stuck_after: Duration,
    /// What the store says.
    pub summary: &'a Summary,
    /// The search text, if any.
    pub query: &'a str,
    /// The status filter, if any.
    pub status: Option<SagaStatus>,
    /// The search or filter results, when one was asked for.
    pub search: Option<&'a [SagaInstance]>,
    /// Where an instance stands, in words.
    pub step_label: &'a dyn Fn(&SagaInstance) -> String,
}

/// The whole page.
pub fn render(view: &HomeView<'_>) -> String {
    let mut body = String::new();
    let summary = view.summary;
    let minutes = per_minute(view);
    let finished: u64 = minutes.iter().map(|m| m.completed).sum();
    let compensated: u64 = minutes.iter().map(|m| m.compensated).sum();
    let attention: u64 = minutes.iter().map(|m| m.needs_attention).sum();
    let _ = write!(
        body,
        "<h1>Sagas</h1><p class=\"muted\">As of {now}. Figures come from the saga store, shared by every replica.</p>",
        now = time(view.now)
    );

    body.push_str("<section class=\"cards\" aria-label=\"counts\">");
    for status in [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::NeedsAttention,
    ] {
        card(
            &mut body,
            status.as_str(),
            status_label(status),
            summary.unfinished(status),
            "now",
        );
    }
    let window = format!("last {} min", view.minutes);
    card(&mut body, "completed", "completed", finished, &window);
    card(&mut body, "failed", "failed", compensated + attention, &window);
    body.push_str("</section>");

    let _ = write!(
        body,
        "<section><h2>Throughput and failures per minute</h2>\
         <p class=\"muted\">Sagas that completed, and that failed (compensated or came to need attention), \
         per minute over the last {} minutes (UTC).</p>{}{}</section>",
        view.minutes,
        chart(&minutes),
        minute_table(&minutes)
    );

    let _ = write!(
        body,
        "<section id=\"stuck\"><h2>Stuck instances</h2><p class=\"muted\">Needing attention, or running or \
         compensating without a change for {} or more; longest unchanged first.</p>",
        duration(view.stuck_after)
    );
    instance_table(&mut body, &summary.stuck, view, "stuck-list", "Nothing is stuck.");
    body.push_str("</section>");

    body.push_str("<section id=\"instances\">");
    search_form(&mut body, view);
    match view.search {
        Some(found) => {
            let what = match (view.query.is_empty(), view.status) {
                (false, Some(status)) => format!("“{}” with status {}", esc(view.query), status_label(status)),
                (false, None) => format!("“{}”", esc(view.query)),
                (true, Some(status)) => format!("status {}", status_label(status)),
                (true, None) => String::new(),
            };
            let _ = write!(body, "<h2>Search results for {what}</h2>");
            instance_table(
                &mut body,
                found,
                view,
                "search-results",
                "No instance matches: search by a whole saga id or order id.",
            );
        }
        None => {
            body.push_str("<h2>Recent instances</h2><p class=\"muted\">Most recently changed first.</p>");
            instance_table(&mut body, &summary.recent, view, "recent-list", "No saga has run yet.");
        }
    }
    body.push_str("</section>");
    page("Overview", &body)
}

fn card(body: &mut String, class: &str, label: &str, count: u64, when: &str) {
    let _ = write!(
        body,
        "<div class=\"card card-{class}\"><div class=\"count\" data-count=\"{class}\">{count}</div>\
         <div class=\"label\">{label}</div><div class=\"muted\">{when}</div></div>",
        class = esc(class),
        label = esc(label),
        when = esc(when)
    );
}

/// One entry per minute of the window, zeros included.
fn per_minute(view: &HomeView<'_>) -> Vec<MinuteOutcomes> {
    (0..view.minutes)
        .map(|i| {
            let minute = view.first_minute + MINUTE * i;
            view.summary
                .per_minute
                .iter()
                .find(|m| m.minute == minute)
                .copied()
                .unwrap_or_else(|| MinuteOutcomes::none(minute))
        })
        .collect()
}

/// A stacked bar per minute: completed at the bottom, then compensated, then needing attention.
fn chart(minutes: &[MinuteOutcomes]) -> String {
    const BAR: i64 = 36;
    const GAP: i64 = 8;
    const HEIGHT: i64 = 150;
    const LEFT: i64 = 44;
    const TOP: i64 = 12;
    let count = i64::try_from(minutes.len()).unwrap_or(0);
    let width = LEFT + count * (BAR + GAP) + 10;
    let height = TOP + HEIGHT + 30;
    let highest = minutes
        .iter()
        .map(|m| m.completed + m.failed())
        .max()
        .unwrap_or(0)
        .max(1);
    let scale = |n: u64| i64::try_from(n * u64::try_from(HEIGHT).unwrap_or(0) / highest).unwrap_or(HEIGHT);
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" \
         height=\"{height}\" role=\"img\" aria-label=\"completed and failed sagas per minute\">\
         <line class=\"axis\" x1=\"{LEFT}\" y1=\"{base}\" x2=\"{right}\" y2=\"{base}\"/>\
         <text class=\"tick\" x=\"{tx}\" y=\"{top}\" text-anchor=\"end\">{highest}</text>\
         <text class=\"tick\" x=\"{tx}\" y=\"{base}\" text-anchor=\"end\">0</text>",
        base = TOP + HEIGHT,
        right = width - 6,
        tx = LEFT - 6,
        top = TOP + 10,
    );
    for (i, m) in minutes.iter().enumerate() {
        let x = LEFT + 4 + i64::try_from(i).unwrap_or(0) * (BAR + GAP);
        let mut y = TOP + HEIGHT;
        let _ = write!(
            svg,
            "<g class=\"bar\" data-minute=\"{}\"><title>{} UTC: {} completed, {} compensated, {} needing attention</title>",
            m.minute.as_millis(),
            clock_minute(m.minute),
            m.completed,
            m.compensated,
            m.needs_attention
        );
        for (class, n) in [
            ("completed", m.completed),
            ("compensated", m.compensated),
            ("needs-attention", m.needs_attention),
        ] {
            let h = scale(n);
            if h > 0 {
                y -= h;
                let _ = write!(
                    svg,
                    "<rect class=\"{class}\" x=\"{x}\" y=\"{y}\" width=\"{BAR}\" height=\"{h}\"/>"
                );
            }
        }
        if i % 5 == 0 || i + 1 == minutes.len() {
            let _ = write!(
                svg,
                "<text class=\"tick\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                x + BAR / 2,
                TOP + HEIGHT + 18,
                clock_minute(m.minute)
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg.push_str(
        "<p class=\"legend\"><span class=\"swatch completed\"></span>completed \
         <span class=\"swatch compensated\"></span>compensated \
         <span class=\"swatch needs-attention\"></span>needs attention</p>",
    );
    svg
}

fn minute_table(minutes: &[MinuteOutcomes]) -> String {
    let mut table = String::from(
        "<details><summary>Figures per minute</summary><table class=\"minutes\"><thead><tr><th>Minute (UTC)</th>\
         <th>Completed</th><th>Compensated</th><th>Needs attention</th></tr></thead><tbody>",
    );
    for m in minutes.iter().rev() {
        let _ = write!(
            table,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            clock_minute(m.minute),
            m.completed,
            m.compensated,
            m.needs_attention
        );
    }
    table.push_str("</tbody></table></details>");
    table
}

fn search_form(body: &mut String, view: &HomeView<'_>) {
    let _ = write!(
        body,
        "<form class=\"search\" method=\"get\" action=\"/\" role=\"search\">\
         <input type=\"search\" name=\"q\" value=\"{q}\" placeholder=\"saga id or order id\" aria-label=\"saga id or order id\" size=\"40\">\
         <select name=\"status\" aria-label=\"status\"><option value=\"\">any status</option>",
        q = esc(view.query)
    );
    for status in [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::NeedsAttention,
        SagaStatus::Completed,
        SagaStatus::Compensated,
    ] {
        let _ = write!(
            body,
            "<option value=\"{value}\"{selected}>{label}</option>",
            value = status.as_str(),
            selected = if view.status == Some(status) { " selected" } else { "" },
            label = status_label(status)
        );
    }
    body.push_str("</select><button type=\"submit\">Search</button>");
    if view.search.is_some() {
        body.push_str(" <a href=\"/\">clear</a>");
    }
    body.push_str("</form>");
}

fn instance_table(body: &mut String, instances: &[SagaInstance], view: &HomeView<'_>, id: &str, empty: &str) {
    if instances.is_empty() {
        let _ = write!(body, "<p class=\"empty\" id=\"{id}\">{}</p>", esc(empty));
        return;
    }
    let _ = write!(
        body,
        "<table class=\"instances\" id=\"{id}\"><thead><tr><th>Saga</th><th>Definition</th><th>Status</th>\
         <th>Step</th><th>Key</th><th>Reason</th><th>Last change</th></tr></thead><tbody>"
    );
    for instance in instances {
        let failure = instance.failure.as_deref().unwrap_or_default();
        let _ = write!(
            body,
            "<tr data-saga=\"{id}\" data-status=\"{status}\"><td><a class=\"mono\" href=\"/sagas/{link}\">{id}</a></td>\
             <td>{definition} v{version}</td><td>{badge}</td><td>{step}</td><td class=\"mono\">{key}</td>\
             <td class=\"reason\" title=\"{failure}\">{short}</td><td>{changed}</td></tr>",
            id = instance.id,
            link = query_value(&instance.id.to_string()),
            status = instance.status.as_str(),
            definition = esc(&instance.definition),
            version = instance.definition_version,
            badge = status_badge(instance.status),
            step = esc(&(view.step_label)(instance)),
            key = esc(instance.key.as_deref().unwrap_or("")),
            failure = esc(failure),
            short = esc(&shorten(failure, 80)),
            changed = time_ago(instance.updated_at, view.now),
        );
    }
    body.push_str("</tbody></table>");
}

/// At most `max` characters of `text`, an ellipsis marking a cut.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_reasons_are_cut_on_a_character_boundary() {
        assert_eq!(shorten("ünïcode", 3), "ünï…");
        assert_eq!(shorten("short", 80), "short");
    }

    #[test]
    fn the_chart_has_a_bar_per_minute_and_scales_to_the_busiest() {
        let minutes: Vec<MinuteOutcomes> = (0..15)
            .map(|i| MinuteOutcomes {
                completed: i,
                compensated: u64::from(i == 14),
                ..MinuteOutcomes::none(Timestamp::from_millis(i64::try_from(i).unwrap_or(0) * 60_000))
            })
            .collect();
        let svg = chart(&minutes);
        assert_eq!(svg.matches("<g class=\"bar\"").count(), 15);
        assert!(
            svg.contains(">15</text>"),
            "the top of the scale is the busiest minute: {svg}"
        );
        assert!(svg.contains("<rect class=\"compensated\""));
    }
}
