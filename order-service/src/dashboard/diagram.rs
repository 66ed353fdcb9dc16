//! A saga definition drawn as inline SVG, on the server, from the Mermaid
//! flowchart saga-core writes ([`Engine::mermaid`](saga_core::Engine::mermaid)):
//! no JavaScript and no network needed to see it.
//!
//! It reads the subset of Mermaid that `SagaDefinition::to_mermaid` emits:
//! nodes `id([label])`, `id["label"]` and `id[/"label"/]`, edges `a --> b`
//! and `a -. label .-> b`. The layout follows saga-core's node names:
//! `start` and the forward steps `s0, s1, …` down the left, each step's
//! compensation `cN` beside it on the right, `completed` and `compensated`
//! at the bottom. Anything else is placed below them, so an unexpected line
//! degrades the drawing, never the page.

use std::fmt::Write;

use saga_core::{SagaInstance, SagaStatus};

use super::html::esc;

/// One box of the chart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its Mermaid id (`s1`, `c0`, `completed`…).
    pub id: String,
    /// Its label, one entry per line.
    pub lines: Vec<String>,
    /// Its outline.
    pub shape: Shape,
}

/// The outline of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `([…])`: start and end states.
    Stadium,
    /// `["…"]`: a local step or a compensation.
    Rect,
    /// `[/"…"/]`: a remote step (sends a command, waits for a reply).
    Parallelogram,
}

/// One arrow of the chart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Edge {
    /// Where it starts.
    pub from: String,
    /// Where it points.
    pub to: String,
    /// Dotted (`-. … .->`, a failure path) or solid.
    pub dotted: bool,
    /// Its label, if any.
    pub label: Option<String>,
}

/// A parsed flowchart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Graph {
    /// Nodes in declaration order.
    pub nodes: Vec<Node>,
    /// Edges in declaration order.
    pub edges: Vec<Edge>,
}

/// Reads the flowchart; lines it does not understand are skipped.
pub fn parse(mermaid: &str) -> Graph {
    let mut graph = Graph::default();
    for line in mermaid.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("flowchart") || line.starts_with("%%") {
            continue;
        }
        if let Some(edge) = parse_edge(line) {
            graph.edges.push(edge);
        } else if let Some(node) = parse_node(line) {
            graph.nodes.push(node);
        }
    }
    graph
}

fn parse_edge(line: &str) -> Option<Edge> {
    if let Some((from, rest)) = line.split_once(" -. ") {
        let (label, to) = rest.split_once(" .-> ")?;
        return Some(Edge {
            from: identifier(from)?,
            to: identifier(to)?,
            dotted: true,
            label: Some(label.trim().to_owned()),
        });
    }
    let (from, to) = line.split_once(" --> ")?;
    Some(Edge {
        from: identifier(from)?,
        to: identifier(to)?,
        dotted: false,
        label: None,
    })
}

fn identifier(text: &str) -> Option<String> {
    let text = text.trim();
    let valid = !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    valid.then(|| text.to_owned())
}

fn parse_node(line: &str) -> Option<Node> {
    let split = line.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))?;
    let (id, shape_and_label) = line.split_at(split);
    let id = identifier(id)?;
    let (shape, label) = if let Some(label) = between(shape_and_label, "([", "])") {
        (Shape::Stadium, label)
    } else if let Some(label) = between(shape_and_label, "[/\"", "\"/]") {
        (Shape::Parallelogram, label)
    } else if let Some(label) = between(shape_and_label, "[\"", "\"]") {
        (Shape::Rect, label)
    } else {
        return None;
    };
    let lines = label
        .replace("#quot;", "\"")
        .split("<br/>")
        .map(str::to_owned)
        .collect();
    Some(Node { id, lines, shape })
}

fn between<'a>(text: &'a str, open: &str, close: &str) -> Option<&'a str> {
    text.strip_prefix(open)?.strip_suffix(close)
}

/// The node that stands for where `instance` is, given the chart of its definition.
pub fn current_node(graph: &Graph, instance: &SagaInstance) -> Option<String> {
    let has = |id: &str| graph.nodes.iter().any(|n| n.id == id);
    let id = match instance.status {
        SagaStatus::Running => format!("s{}", instance.step),
        // `step` compensations remain; the next is the nearest compensable step below it.
        SagaStatus::Compensating | SagaStatus::NeedsAttention => (0..instance.step)
            .rev()
            .map(|j| format!("c{j}"))
            .find(|id| has(id))
            .unwrap_or_else(|| "compensated".to_owned()),
        SagaStatus::Completed => "completed".to_owned(),
        SagaStatus::Compensated => "compensated".to_owned(),
    };
    has(&id).then_some(id)
}

const NODE_WIDTH: i64 = 250;
const LINE_HEIGHT: i64 = 18;
const ROW_HEIGHT: i64 = 92;
const COLUMN_GAP: i64 = 130;
const MARGIN: i64 = 24;

/// Where a node sits: column (0 forward, 1 compensation) and row.
fn slot(id: &str, steps: i64) -> Option<(i64, i64)> {
    let index = |prefix: char| id.strip_prefix(prefix).and_then(|n| n.parse::<i64>().ok());
    match id {
        "start" => Some((0, 0)),
        "completed" => Some((0, steps + 1)),
        "compensated" => Some((1, steps + 1)),
        _ => index('s')
            .map(|i| (0, i + 1))
            .or_else(|| index('c').map(|i| (1, i + 1))),
    }
}

struct Placed<'a> {
    node: &'a Node,
    /// Centre.
    x: i64,
    y: i64,
    half_width: i64,
    half_height: i64,
}

/// The chart as an `<svg>` element, `current` (a node id) highlighted.
pub fn svg(graph: &Graph, current: Option<&str>) -> String {
    let steps = graph
        .nodes
        .iter()
        .filter(|n| n.id.starts_with('s') && n.id[1..].parse::<u32>().is_ok())
        .count() as i64;
    let mut extra_row = steps + 2;
    let placed: Vec<Placed<'_>> = graph
        .nodes
        .iter()
        .map(|node| {
            let (column, row) = slot(&node.id, steps).unwrap_or_else(|| {
                extra_row += 1;
                (0, extra_row - 1)
            });
            let lines = i64::try_from(node.lines.len()).unwrap_or(1).max(1);
            Placed {
                node,
                x: MARGIN + NODE_WIDTH / 2 + column * (NODE_WIDTH + COLUMN_GAP),
                y: MARGIN + ROW_HEIGHT / 3 + row * ROW_HEIGHT,
                half_width: NODE_WIDTH / 2,
                half_height: (lines * LINE_HEIGHT + 20) / 2,
            }
        })
        .collect();
    let width = 2 * MARGIN + 2 * NODE_WIDTH + COLUMN_GAP;
    let height = placed.iter().map(|p| p.y + p.half_height).max().unwrap_or(0) + MARGIN;

    let mut out = String::new();
    let _ = write!(
        out,
        "<svg class=\"diagram\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" height=\"{height}\" role=\"img\" aria-label=\"saga definition diagram\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" class=\"arrow-head\"/>\
         </marker></defs>"
    );
    let find = |id: &str| placed.iter().find(|p| p.node.id == id);
    for edge in &graph.edges {
        let (Some(from), Some(to)) = (find(&edge.from), find(&edge.to)) else {
            continue;
        };
        let class = if edge.dotted { "edge failure" } else { "edge" };
        let (label_x, label_y) = if from.x == to.x {
            // Same column: straight down (or up), border to border.
            let (x1, y1) = border_point(from, to.x, to.y);
            let (x2, y2) = border_point(to, from.x, from.y);
            let _ = write!(
                out,
                "<path class=\"{class}\" d=\"M{x1},{y1} L{x2},{y2}\" marker-end=\"url(#arrow)\"/>"
            );
            ((x1 + x2) / 2 + 6, (y1 + y2) / 2)
        } else {
            // Across columns: an S-curve through the gap between them, side
            // to side, so it never crosses a box of either column.
            let toward = (to.x - from.x).signum();
            let (x1, y1) = (from.x + toward * from.half_width, from.y);
            let (x2, y2) = (to.x - toward * to.half_width, to.y);
            let bend = toward * COLUMN_GAP / 2;
            let _ = write!(
                out,
                "<path class=\"{class}\" d=\"M{x1},{y1} C{},{y1} {},{y2} {x2},{y2}\" marker-end=\"url(#arrow)\"/>",
                x1 + bend,
                x2 - bend
            );
            (x1 + toward * 24, y1 - 6)
        };
        if let Some(label) = &edge.label {
            let _ = write!(
                out,
                "<text class=\"edge-label\" x=\"{label_x}\" y=\"{label_y}\" text-anchor=\"middle\">{}</text>",
                esc(label)
            );
        }
    }
    for p in &placed {
        let is_current = current == Some(p.node.id.as_str());
        let class = if is_current { "node current" } else { "node" };
        let _ = write!(
            out,
            "<g class=\"{class}\" data-node=\"{id}\"{aria}>",
            id = esc(&p.node.id),
            aria = if is_current { " aria-current=\"step\"" } else { "" }
        );
        let (left, top) = (p.x - p.half_width, p.y - p.half_height);
        let (w, h) = (2 * p.half_width, 2 * p.half_height);
        let _ = match p.node.shape {
            Shape::Stadium => write!(
                out,
                "<rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" rx=\"{r}\" ry=\"{r}\"/>",
                r = p.half_height
            ),
            Shape::Rect => write!(
                out,
                "<rect x=\"{left}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" rx=\"4\" ry=\"4\"/>"
            ),
            Shape::Parallelogram => {
                let slant = 14;
                write!(
                    out,
                    "<polygon points=\"{},{top} {},{top} {},{bottom} {},{bottom}\"/>",
                    left + slant,
                    left + w,
                    left + w - slant,
                    left,
                    bottom = top + h
                )
            }
        };
        let first_baseline = p.y - (i64::try_from(p.node.lines.len()).unwrap_or(1) - 1) * LINE_HEIGHT / 2 + 5;
        for (i, line) in p.node.lines.iter().enumerate() {
            let y = first_baseline + i64::try_from(i).unwrap_or(0) * LINE_HEIGHT;
            let _ = write!(
                out,
                "<text x=\"{}\" y=\"{y}\" text-anchor=\"middle\"{small}>{}</text>",
                p.x,
                esc(line),
                small = if i > 0 { " class=\"detail\"" } else { "" }
            );
        }
        out.push_str("</g>");
    }
    out.push_str("</svg>");
    out
}

/// Where the segment from `node`'s centre towards (`x`, `y`) leaves its box.
fn border_point(node: &Placed<'_>, x: i64, y: i64) -> (i64, i64) {
    let (dx, dy) = ((x - node.x) as f64, (y - node.y) as f64);
    if dx == 0.0 && dy == 0.0 {
        return (node.x, node.y);
    }
    let scale_x = if dx == 0.0 {
        f64::INFINITY
    } else {
        node.half_width as f64 / dx.abs()
    };
    let scale_y = if dy == 0.0 {
        f64::INFINITY
    } else {
        node.half_height as f64 / dy.abs()
    };
    let scale = scale_x.min(scale_y);
    (
        node.x + (dx * scale).round() as i64,
        node.y + (dy * scale).round() as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use saga_core::{SagaId, Timestamp};

    const ORDER_SAGA: &str = "flowchart TD
    start([start])
    s0[\"create-order\"]
    c0[\"undo create-order\"]
    s1[/\"reserve-stock<br/>awaits StockUpdateResult ≤ 30s\"/]
    s2[\"confirm #quot;now#quot;\"]
    completed([Completed])
    compensated([Compensated])
    start --> s0
    s0 --> s1
    s0 -. fails .-> compensated
    c0 --> compensated
    s1 --> s2
    s1 -. fails .-> c0
    s2 --> completed
    s2 -. fails .-> c0
";

    fn instance(status: SagaStatus, step: u32) -> SagaInstance {
        SagaInstance {
            id: SagaId::new(),
            definition: "order".into(),
            definition_version: 1,
            key: None,
            status,
            step,
            attempt: 0,
            awaiting: None,
            deadline: None,
            failure: None,
            data: "{}".into(),
            data_version: 1,
            revision: 1,
            created_at: Timestamp::EPOCH,
            updated_at: Timestamp::EPOCH,
        }
    }

    #[test]
    fn reads_the_flowchart_saga_core_writes() {
        let graph = parse(ORDER_SAGA);
        assert_eq!(graph.nodes.len(), 7);
        assert_eq!(graph.edges.len(), 8);
        let remote = &graph.nodes[3];
        assert_eq!(remote.id, "s1");
        assert_eq!(remote.shape, Shape::Parallelogram);
        assert_eq!(remote.lines, vec!["reserve-stock", "awaits StockUpdateResult ≤ 30s"]);
        assert_eq!(graph.nodes[4].lines, vec!["confirm \"now\""]);
        assert_eq!(graph.nodes[0].shape, Shape::Stadium);
        assert_eq!(
            graph.edges[2],
            Edge {
                from: "s0".into(),
                to: "compensated".into(),
                dotted: true,
                label: Some("fails".into())
            }
        );
    }

    #[test]
    fn the_current_node_follows_status_and_step() {
        let graph = parse(ORDER_SAGA);
        let at = |status, step| current_node(&graph, &instance(status, step));
        assert_eq!(at(SagaStatus::Running, 1).as_deref(), Some("s1"));
        assert_eq!(at(SagaStatus::Compensating, 2).as_deref(), Some("c0"));
        assert_eq!(at(SagaStatus::NeedsAttention, 1).as_deref(), Some("c0"));
        assert_eq!(at(SagaStatus::Compensating, 0).as_deref(), Some("compensated"));
        assert_eq!(at(SagaStatus::Completed, 3).as_deref(), Some("completed"));
        assert_eq!(at(SagaStatus::Compensated, 0).as_deref(), Some("compensated"));
        assert_eq!(at(SagaStatus::Running, 9), None, "a step the chart does not have");
    }

    #[test]
    fn draws_every_node_and_edge_and_highlights_one() {
        let graph = parse(ORDER_SAGA);
        let svg = svg(&graph, Some("s1"));
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<g class=\"node").count(), 7);
        assert_eq!(svg.matches("<path class=\"edge").count(), 8);
        assert_eq!(svg.matches("class=\"edge failure\"").count(), 3);
        assert_eq!(svg.matches("class=\"node current\"").count(), 1);
        assert!(svg.contains("<g class=\"node current\" data-node=\"s1\" aria-current=\"step\">"));
        assert!(svg.contains("confirm &quot;now&quot;"), "labels are escaped: {svg}");
    }

    #[test]
    fn unexpected_lines_do_not_break_the_drawing() {
        let graph = parse("flowchart TD\n    x[\"<b>odd</b>\"]\n    what is this\n    x --> nowhere\n");
        assert_eq!(graph.nodes.len(), 1);
        let svg = svg(&graph, None);
        assert!(svg.contains("&lt;b&gt;odd&lt;/b&gt;"));
        assert!(!svg.contains("class=\"edge"), "an edge to an unknown node is not drawn");
    }
}
