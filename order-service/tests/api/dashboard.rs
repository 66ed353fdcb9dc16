//! The web dashboard over real HTTP: embedded mode and production mode
//! (two replicas on one PostgreSQL database), its content, escaping, errors
//! and the admin token. The headless-browser test is in [`browser`].

mod browser;

use std::net::SocketAddr;
use std::time::Duration;

use order_service::Config;
use order_service::config::{AdminToken, ListenAddr};
use order_service::proto::{self, OrderStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{PATIENCE, TestApp, item, spawn_app_with};
use crate::platform::{Platform, Stock, basket};

/// A script in a product id: it reaches the saga data and, through the demo
/// stock service's answer, the failure reason.
const SCRIPT_PRODUCT: &str = "<script>alert(1)</script>";

/// An HTTP response, read whole.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` with extra `headers`, over a fresh connection.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Response {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let raw = tokio::time::timeout(PATIENCE, exchange)
        .await
        .expect("the dashboard answers in time")
        .expect("the dashboard speaks HTTP");
    let raw = String::from_utf8(raw).expect("a UTF-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .expect("an HTTP status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let response = Response {
        status,
        headers,
        body: body.to_owned(),
    };
    assert_ne!(
        response.header("transfer-encoding"),
        Some("chunked"),
        "dashboard pages are sent whole"
    );
    response
}

/// Starts the service in embedded mode, with `token` as ADMIN_TOKEN if given.
async fn spawn_dashboard(token: Option<&str>) -> TestApp {
    let config = Config {
        grpc: ListenAddr::localhost(0),
        metrics: ListenAddr::localhost(0),
        admin_token: token.map(AdminToken::new),
        ..Config::default()
    };
    let app = spawn_app_with(config).await;
    app.wait_until_serving("embedded mode needs nothing").await;
    app
}

/// Places an order and waits until the saga decided it.
async fn decided_order(app: &TestApp, items: Vec<proto::OrderItem>) -> proto::Order {
    let order = app.place_order("alice", items).await.expect("the order is placed");
    app.wait_until_decided(&order.id, "alice").await
}

/// Polls `/` until `check` accepts it (the saga's last transition and the
/// order table's update are separate writes in embedded mode).
async fn home_when(addr: SocketAddr, headers: &[(&str, &str)], check: impl Fn(&str) -> bool) -> Response {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let page = get(addr, "/", headers).await;
        if page.status == 200 && check(&page.body) {
            return page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the overview never showed what was expected:\n{}",
            page.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn count_card(body: &str, class: &str) -> Option<u64> {
    let marker = format!("data-count=\"{class}\">");
    let start = body.find(&marker)? + marker.len();
    body[start..].split('<').next()?.parse().ok()
}

/// The row of `id` in the table with id `table` (empty if absent).
fn row<'a>(body: &'a str, table: &str, id: &str) -> &'a str {
    let Some(start) = body.find(&format!("id=\"{table}\"")) else {
        return "";
    };
    // The table ends at its `</table>`; an empty list is a paragraph,
    // whose section ends first.
    let rest = &body[start..];
    let end = [rest.find("</table>"), rest.find("</section>")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    let table = &rest[..end];
    table
        .find(&format!("data-saga=\"{id}\""))
        .map(|at| &table[at..table[at..].find("</tr>").map_or(table.len(), |end| at + end)])
        .unwrap_or("")
}

#[tokio::test]
async fn the_dashboard_shows_counts_orders_and_their_history_with_everything_escaped() {
    let app = spawn_dashboard(None).await;
    let confirmed = decided_order(&app, vec![item("apple", 1, 1.0)]).await;
    assert_eq!(confirmed.status(), OrderStatus::Confirmed);
    let out_of_stock = decided_order(&app, vec![item("laptop", 6, 900.0)]).await;
    assert_eq!(out_of_stock.status(), OrderStatus::Cancelled);
    let scripted = decided_order(&app, vec![item(SCRIPT_PRODUCT, 1, 1.0)]).await;
    assert_eq!(scripted.status(), OrderStatus::Cancelled);

    let home = home_when(app.metrics_addr, &[], |body| {
        count_card(body, "completed") == Some(1) && count_card(body, "failed") == Some(2)
    })
    .await;
    assert!(
        home.header("content-type").is_some_and(|t| t.starts_with("text/html")),
        "{:?}",
        home.headers
    );
    let csp = home.header("content-security-policy").unwrap_or_default();
    assert!(csp.contains("script-src 'self'"), "a content security policy: {csp}");
    assert_eq!(home.header("cache-control"), Some("no-store"));
    let body = &home.body;
    for status in ["running", "compensating", "needs_attention"] {
        assert_eq!(count_card(body, status), Some(0), "{status} count");
    }
    assert!(row(body, "recent-list", &confirmed.id).contains("data-status=\"completed\""));
    assert!(row(body, "recent-list", &out_of_stock.id).contains("data-status=\"compensated\""));
    assert!(
        row(body, "recent-list", &out_of_stock.id).contains("insufficient stock for `laptop`: 5 left, 6 wanted"),
        "{body}"
    );
    assert!(
        !body.contains(SCRIPT_PRODUCT),
        "a stored script reached the page raw:\n{body}"
    );
    assert!(
        row(body, "recent-list", &scripted.id).contains("unknown product `&lt;script&gt;alert(1)&lt;/script&gt;`"),
        "the reason is shown escaped:\n{body}"
    );
    assert!(body.contains("id=\"stuck-list\"") && body.contains("Nothing is stuck."));
    assert_eq!(body.matches("<g class=\"bar\"").count(), 15, "a bar per minute");

    // The instance page: fields, data, diagram and history.
    let page = get(app.metrics_addr, &format!("/sagas/{}", scripted.id), &[]).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let body = &page.body;
    assert!(
        !body.contains(SCRIPT_PRODUCT),
        "a stored script reached the page raw:\n{body}"
    );
    assert!(body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(body.contains("order v1"), "definition name and version");
    assert!(
        body.contains("<pre class=\"data\" id=\"data\">{\n  &quot;"),
        "pretty data:\n{body}"
    );
    assert!(body.contains("\n  &quot;order&quot;: {\n"), "pretty data:\n{body}");
    assert!(body.contains("id=\"failure\">step `reserve-stock` failed: unknown product `&lt;script&gt;"));
    assert!(
        body.matches("<li class=\"transition\"").count() >= 2,
        "history:\n{body}"
    );
    for shown in ["started", "StockUpdateResult", "OrderCreated", "OrderCancelled"] {
        assert!(body.contains(shown), "the timeline shows {shown}:\n{body}");
    }
    assert!(body.contains("<g class=\"node current\" data-node=\"compensated\" aria-current=\"step\">"));
    assert!(body.contains("<details><summary>Mermaid source</summary>"));
    assert!(body.contains("flowchart TD"));

    let page = get(app.metrics_addr, &format!("/sagas/{}", confirmed.id), &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("data-node=\"completed\" aria-current=\"step\""));
    assert!(page.body.contains("OrderConfirmed"));

    // Search by order id, filter by status.
    let found = get(app.metrics_addr, &format!("/?q={}", confirmed.id), &[]).await;
    assert_eq!(found.status, 200);
    assert!(row(&found.body, "search-results", &confirmed.id).contains("completed"));
    assert!(row(&found.body, "search-results", &out_of_stock.id).is_empty());
    let failed = get(app.metrics_addr, "/?status=compensated", &[]).await;
    assert!(!row(&failed.body, "search-results", &out_of_stock.id).is_empty());
    assert!(!row(&failed.body, "search-results", &scripted.id).is_empty());
    assert!(row(&failed.body, "search-results", &confirmed.id).is_empty());
    let nothing = get(app.metrics_addr, "/?q=%3Cno+such+order%3E", &[]).await;
    assert_eq!(nothing.status, 200);
    assert!(nothing.body.contains("No instance matches") && nothing.body.contains("&lt;no such order&gt;"));

    // Errors.
    let bad = get(app.metrics_addr, "/sagas/not-a-uuid", &[]).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    let scripted_id = get(app.metrics_addr, "/sagas/%3Cscript%3E", &[]).await;
    assert_eq!(scripted_id.status, 400);
    assert!(scripted_id.body.contains("&lt;script&gt;") && !scripted_id.body.contains("<script>"));
    let unknown = get(app.metrics_addr, &format!("/sagas/{}", uuid::Uuid::now_v7()), &[]).await;
    assert_eq!(unknown.status, 404);
    let bad_status = get(app.metrics_addr, "/?status=paused", &[]).await;
    assert_eq!(bad_status.status, 400);

    let css = get(app.metrics_addr, "/dashboard.css", &[]).await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").is_some_and(|t| t.starts_with("text/css")));
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn with_an_admin_token_the_dashboard_asks_for_it() {
    let app = spawn_dashboard(Some("s3cret")).await;
    let addr = app.metrics_addr;
    let order = decided_order(&app, vec![item("apple", 1, 1.0)]).await;

    let anonymous = get(addr, "/", &[]).await;
    assert_eq!(anonymous.status, 401);
    assert!(
        anonymous
            .header("www-authenticate")
            .is_some_and(|h| h.starts_with("Bearer"))
    );
    assert!(
        !anonymous.body.contains(&order.id),
        "nothing is shown without the token"
    );
    for path in ["/sagas/not-a-uuid", &format!("/sagas/{}", order.id), "/dashboard.css"] {
        assert_eq!(get(addr, path, &[]).await.status, 401, "{path} without the token");
    }
    let wrong = get(addr, "/", &[("Authorization", "Bearer s3cre")]).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(get(addr, "/?token=nope", &[]).await.status, 401);

    let bearer = get(addr, "/", &[("Authorization", "Bearer s3cret")]).await;
    assert_eq!(bearer.status, 200);
    assert!(bearer.body.contains(&order.id));

    // A browser signs in once with ?token= and keeps a cookie.
    let login = get(addr, "/?status=completed&token=s3cret", &[]).await;
    assert_eq!(login.status, 303);
    assert_eq!(
        login.header("location"),
        Some("/?status=completed"),
        "the token leaves the URL"
    );
    let cookie = login.header("set-cookie").expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("s3cret"), "the cookie is not the token: {cookie}");
    let session = cookie.split(';').next().expect("name=value");
    let signed_in = get(addr, "/?status=completed", &[("Cookie", session)]).await;
    assert_eq!(signed_in.status, 200);
    assert!(!row(&signed_in.body, "search-results", &order.id).is_empty());
    let forged = get(addr, "/", &[("Cookie", "saga_dashboard=0000")]).await;
    assert_eq!(forged.status, 401);

    // The operations endpoints stay open.
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(get(addr, path, &[]).await.status, 200, "{path} needs no token");
    }
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn replicas_sharing_a_database_show_the_same_figures() {
    let mut platform = Platform::new().await;
    let config = || {
        let mut config = platform.config(Duration::from_secs(60));
        config.admin_token = Some(AdminToken::new("s3cret"));
        config
    };
    let a = spawn_app_with(config()).await;
    let b = spawn_app_with(config()).await;
    a.wait_until_serving(crate::platform::START_BACKENDS).await;
    b.wait_until_serving(crate::platform::START_BACKENDS).await;
    platform.start_stock(Stock::Platform);

    let good = a.place_order("alice", basket("apple")).await.expect("placed");
    let mut scripted = basket("unobtainium");
    scripted.push(item(SCRIPT_PRODUCT, 1, 1.0));
    let bad = a.place_order("alice", scripted).await.expect("placed");
    assert_eq!(
        a.wait_until_decided(&good.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    assert_eq!(
        a.wait_until_decided(&bad.id, "alice").await.status(),
        OrderStatus::Cancelled
    );

    let auth = [("Authorization", "Bearer s3cret")];
    for replica in [&a, &b] {
        let home = home_when(replica.metrics_addr, &auth, |body| {
            count_card(body, "completed") == Some(1) && count_card(body, "failed") == Some(1)
        })
        .await;
        assert!(row(&home.body, "recent-list", &good.id).contains("data-status=\"completed\""));
        assert!(row(&home.body, "recent-list", &bad.id).contains("unknown product unobtainium"));
        assert!(!home.body.contains(SCRIPT_PRODUCT));
    }

    let page = get(b.metrics_addr, &format!("/sagas/{}", bad.id), &auth).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        !page.body.contains(SCRIPT_PRODUCT),
        "the data is escaped:\n{}",
        page.body
    );
    assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(page.body.matches("<li class=\"transition\"").count() >= 2);
    assert!(page.body.contains("StockUpdateResult") && page.body.contains("OrderCancelled"));
    assert!(page.body.contains("data-node=\"compensated\" aria-current=\"step\""));
    assert_eq!(get(b.metrics_addr, "/sagas/nope", &auth).await.status, 400);
    let unknown = format!("/sagas/{}", uuid::Uuid::now_v7());
    assert_eq!(get(b.metrics_addr, &unknown, &auth).await.status, 404);
    assert_eq!(get(b.metrics_addr, "/", &[]).await.status, 401);

    a.stop().await.expect("a clean stop");
    b.stop().await.expect("a clean stop");
    platform.clean_up().await;
}

#[tokio::test]
async fn an_order_left_waiting_for_stock_is_listed_as_stuck() {
    let mut platform = Platform::new().await;
    platform.start_stock(Stock::Silent);
    let config = Config {
        dashboard_stuck_after: Duration::from_millis(200),
        ..platform.config(Duration::from_secs(600))
    };
    let app = spawn_app_with(config).await;
    app.wait_until_serving(crate::platform::START_BACKENDS).await;
    let waiting = app.place_order("alice", basket("apple")).await.expect("placed");

    let home = home_when(app.metrics_addr, &[], |body| {
        !row(body, "stuck-list", &waiting.id).is_empty()
    })
    .await;
    let stuck = row(&home.body, "stuck-list", &waiting.id);
    assert!(stuck.contains("data-status=\"running\""), "{stuck}");
    assert!(stuck.contains("reserve-stock"), "the step it waits in: {stuck}");
    assert!(!home.body.contains("Nothing is stuck."), "{}", home.body);
    assert_eq!(count_card(&home.body, "running"), Some(1));

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}
