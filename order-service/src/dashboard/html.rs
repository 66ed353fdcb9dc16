//! HTML building blocks: the one escaping function every piece of text goes
//! through, the page frame, and how times and durations read.

use std::fmt::{self, Write};
use std::time::Duration;

use saga_core::{SagaStatus, Timestamp};

/// Text made safe to place in HTML element content or a quoted attribute
/// value (also inside inline SVG): `& < > " '` become entities.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// Shorthand for [`Escaped`].
pub fn esc(text: &str) -> Escaped<'_> {
    Escaped(text)
}

/// `text` percent-encoded for a URL query value.
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A whole page: `title` (escaped here) and `body` (already HTML).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title} · saga dashboard</title>\n\
         <link rel=\"stylesheet\" href=\"/dashboard.css\">\n\
         <script src=\"/dashboard.js\" defer></script>\n</head>\n<body>\n\
         <header class=\"top\"><a class=\"brand\" href=\"/\">Saga dashboard</a>\
         <span class=\"muted\">read-only · order service</span>\
         <label class=\"refresh\"><input type=\"checkbox\" id=\"auto-refresh\"> refresh every 10 s</label></header>\n\
         <main>\n{body}</main>\n</body>\n</html>\n",
        title = esc(title),
    )
}

/// A status as a coloured badge.
pub fn status_badge(status: SagaStatus) -> String {
    format!(
        "<span class=\"badge status-{status}\">{label}</span>",
        label = status_label(status)
    )
}

/// A status as people read it.
pub fn status_label(status: SagaStatus) -> &'static str {
    match status {
        SagaStatus::Running => "running",
        SagaStatus::Compensating => "compensating",
        SagaStatus::Completed => "completed",
        SagaStatus::Compensated => "compensated",
        SagaStatus::NeedsAttention => "needs attention",
    }
}

/// `2025-01-31 12:00:00.123 UTC`.
pub fn time(at: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(at.as_millis()).map_or_else(
        || format!("{} ms", at.as_millis()),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string(),
    )
}

/// `HH:MM` (UTC), for chart labels.
pub fn clock_minute(at: Timestamp) -> String {
    chrono::DateTime::from_timestamp_millis(at.as_millis()).map_or_else(String::new, |t| t.format("%H:%M").to_string())
}

/// A `<time>` element: the exact time, with `ago` relative to `now` beside it.
pub fn time_ago(at: Timestamp, now: Timestamp) -> String {
    format!(
        "<time datetime=\"{ms}\" title=\"{exact}\">{ago} ago</time>",
        ms = at.as_millis(),
        exact = time(at),
        ago = duration(now.since(at)),
    )
}

/// `3 s`, `4 min 12 s`, `2 h 5 min`, `3 d 4 h`.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{} ms", d.as_millis()),
        1..60 => format!("{secs} s"),
        60..3600 if secs.is_multiple_of(60) => format!("{} min", secs / 60),
        60..3600 => format!("{} min {} s", secs / 60, secs % 60),
        3600..86_400 => format!("{} h {} min", secs / 3600, secs % 3600 / 60),
        _ => format!("{} d {} h", secs / 86_400, secs % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_every_html_metacharacter() {
        assert_eq!(
            esc(r#"<script>alert("x" & 'y')</script>"#).to_string(),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_value("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(duration(Duration::from_secs(59)), "59 s");
        assert_eq!(duration(Duration::from_secs(252)), "4 min 12 s");
        assert_eq!(duration(Duration::from_secs(300)), "5 min");
        assert_eq!(duration(Duration::from_secs(7500)), "2 h 5 min");
        assert_eq!(duration(Duration::from_secs(3 * 86_400 + 4 * 3600)), "3 d 4 h");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(
            time(Timestamp::from_millis(1_700_000_000_123)),
            "2023-11-14 22:13:20.123 UTC"
        );
        assert_eq!(clock_minute(Timestamp::from_millis(1_700_000_000_123)), "22:13");
    }
}
