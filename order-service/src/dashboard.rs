//! The read-only web dashboard, served beside `/metrics` on `METRICS_PORT`:
//!
//! - `/`: instances in flight per status, sagas finished and failed per
//!   minute, the stuck instances, and the most recent ones, with a search by
//!   saga id or order id and a filter by status;
//! - `/sagas/{id}`: one instance, its history as a timeline, and its saga
//!   definition drawn as a diagram with the current step highlighted.
//!
//! Every figure comes from the store ([`QueryStore::summary`]), so replicas
//! sharing a database show the same. Pages are rendered on the server, every
//! piece of stored text escaped ([`html::esc`]); the only script is an
//! optional auto-refresh. With `ADMIN_TOKEN` set the dashboard asks for it
//! (see [`auth`]); without it the dashboard is open, so bind `METRICS_PORT`
//! to an interface only operators reach.
//!
//! [`QueryStore::summary`]: saga_core::QueryStore::summary

pub mod auth;
pub mod diagram;
mod home;
pub mod html;
mod instance;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use saga_core::{
    Engine, InstanceFilter, MINUTE, MinuteOutcomes, SagaId, SagaInstance, SagaStatus, StoreError, SummaryQuery,
};
use serde::Deserialize;

use crate::admin::{InstanceRecord, read_instance};
use crate::config::AdminToken;
use crate::saga::ORDER_SAGA;
use auth::Access;
use html::{esc, page};

const STYLE: &str = include_str!("dashboard/style.css");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");

/// What the dashboard shows.
#[derive(Clone, Debug)]
pub struct DashboardConfig {
    /// Outcomes are charted per minute over this many minutes (at most 60).
    pub window_minutes: u32,
    /// Running or compensating instances unchanged this long are stuck.
    pub stuck_after: Duration,
    /// Rows in each list.
    pub list_limit: usize,
    /// Definitions whose business keys the search box looks up (for the
    /// order saga the key is the order id).
    pub searchable: Vec<String>,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        Self {
            window_minutes: 15,
            stuck_after: Duration::from_secs(5 * 60),
            list_limit: 25,
            searchable: vec![ORDER_SAGA.to_owned()],
        }
    }
}

/// The dashboard's state: the engine (its store, clock and definitions).
#[derive(Clone)]
struct Dashboard {
    engine: Engine,
    config: Arc<DashboardConfig>,
    /// False while production mode waits for its database (the store's
    /// tables may not exist yet).
    open: Arc<AtomicBool>,
}

impl Dashboard {
    fn check_open(&self) -> Result<(), DashboardError> {
        if self.open.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(DashboardError::Starting)
        }
    }
}

/// The dashboard's routes (`/`, `/sagas/{id}`, its stylesheet and script),
/// guarded by `token` when there is one; its pages answer 503 until `open`
/// is set (production mode sets it once the database is migrated). Merge
/// them into the operations router.
pub fn routes(engine: Engine, open: Arc<AtomicBool>, token: Option<&AdminToken>, config: DashboardConfig) -> Router {
    let dashboard = Dashboard {
        engine,
        config: Arc::new(config),
        open,
    };
    Router::new()
        .route("/", get(home))
        .route("/sagas/{id}", get(saga))
        .route(
            "/dashboard.css",
            get(|| async { ([(CONTENT_TYPE, "text/css; charset=utf-8")], STYLE) }),
        )
        .route(
            "/dashboard.js",
            get(|| async { ([(CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT) }),
        )
        .with_state(dashboard)
        .layer(axum::middleware::from_fn_with_state(
            Access::new(token),
            auth::require_token,
        ))
        .layer(axum::middleware::map_response(harden))
}

/// Why a page cannot be shown.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DashboardError {
    /// The id in the URL is not a saga id (400): fix the link.
    #[error("`{0}` is not a saga id (a UUID)")]
    BadId(String),
    /// A filter parameter has no meaning (400): fix the link.
    #[error("{0}")]
    BadParameter(String),
    /// No instance has this id (404).
    #[error("no saga instance {0}")]
    NotFound(SagaId),
    /// Production mode still waits for its database (503).
    #[error("the service is starting and waiting for its database; try again shortly")]
    Starting,
    /// The store failed: 503 when it is worth retrying (the database is
    /// away), 500 otherwise.
    #[error("the saga store failed: {0}")]
    Store(#[from] StoreError),
}

impl IntoResponse for DashboardError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::BadId(_) | Self::BadParameter(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Starting => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::warn!(error = %self, "dashboard page failed");
        }
        let body = format!(
            "<h1>{code} {reason}</h1><p class=\"error\">{message}</p><p><a href=\"/\">Back to the overview</a></p>",
            code = status.as_u16(),
            reason = status.canonical_reason().unwrap_or_default(),
            message = esc(&self.to_string()),
        );
        (status, Html(page("Error", &body))).into_response()
    }
}

/// The home page's query string.
#[derive(Debug, Default, Deserialize)]
struct HomeParams {
    /// A saga id or business key (order id).
    #[serde(default)]
    q: String,
    /// A status name (`running`, `needs_attention`…), or empty for any.
    #[serde(default)]
    status: String,
}

async fn home(
    State(dashboard): State<Dashboard>,
    Query(params): Query<HomeParams>,
) -> Result<Html<String>, DashboardError> {
    dashboard.check_open()?;
    let config = &dashboard.config;
    let store = dashboard.engine.store();
    let now = dashboard.engine.now();
    let status = match params.status.trim() {
        "" => None,
        name => Some(SagaStatus::from_str(name).map_err(|e| DashboardError::BadParameter(format!("status: {e}")))?),
    };
    let minutes = config.window_minutes.clamp(1, 60);
    let first_minute = MinuteOutcomes::minute_of(now) - MINUTE * (minutes - 1);
    let summary = store
        .summary(&SummaryQuery {
            since: first_minute,
            stuck_since: now - config.stuck_after,
            limit: config.list_limit,
        })
        .await?;
    let query = params.q.trim();
    let search = if !query.is_empty() {
        Some(find(&dashboard, query, status).await?)
    } else if let Some(status) = status {
        // An explicit filter: this listing may scan (see docs/operations.md).
        let filter = InstanceFilter {
            statuses: vec![status],
            limit: config.list_limit,
            ..InstanceFilter::default()
        };
        Some(store.list(&filter).await?)
    } else {
        None
    };
    let view = home::HomeView {
        now,
        first_minute,
        minutes,
        stuck_after: config.stuck_after,
        summary: &summary,
        query,
        status,
        search: search.as_deref(),
        step_label: &|instance| step_label(&dashboard.engine, instance),
    };
    Ok(Html(home::render(&view)))
}

/// Instances whose id or business key is `query`, with `status` if given.
async fn find(
    dashboard: &Dashboard,
    query: &str,
    status: Option<SagaStatus>,
) -> Result<Vec<SagaInstance>, DashboardError> {
    let store = dashboard.engine.store();
    let mut ids = Vec::new();
    if let Ok(id) = SagaId::from_str(query) {
        ids.push(id);
    }
    for definition in &dashboard.config.searchable {
        if let Some(id) = store.find_by_key(definition, query).await? {
            ids.push(id);
        }
    }
    ids.sort();
    ids.dedup();
    let mut found = Vec::new();
    for id in ids {
        if let Some(instance) = store.load(id).await? {
            found.push(instance);
        }
    }
    found.retain(|i| status.is_none_or(|s| i.status == s));
    Ok(found)
}

async fn saga(State(dashboard): State<Dashboard>, Path(id): Path<String>) -> Result<Html<String>, DashboardError> {
    dashboard.check_open()?;
    let id = SagaId::from_str(&id).map_err(|_| DashboardError::BadId(id.clone()))?;
    let engine = &dashboard.engine;
    let store = engine.store();
    let InstanceRecord {
        instance,
        history,
        unsent,
        more_unsent,
    } = read_instance(store.as_ref(), id)
        .await?
        .ok_or(DashboardError::NotFound(id))?;
    let view = instance::InstanceView {
        now: engine.now(),
        mermaid: engine.mermaid(&instance.definition, instance.definition_version),
        step_label: step_label(engine, &instance),
        steps: engine
            .step_names(&instance.definition, instance.definition_version)
            .unwrap_or_default(),
        instance: &instance,
        history: &history,
        unsent: &unsent,
        more_unsent,
    };
    Ok(Html(instance::render(&view)))
}

/// Where an instance stands, in its definition's step names.
fn step_label(engine: &Engine, instance: &SagaInstance) -> String {
    let steps = engine
        .step_names(&instance.definition, instance.definition_version)
        .unwrap_or_default();
    position_label(instance.status, instance.step, &steps)
}

/// A status and step counter in words: the step running, or the compensation next.
pub fn position_label(status: SagaStatus, step: u32, steps: &[String]) -> String {
    let name = |index: u32| {
        usize::try_from(index)
            .ok()
            .and_then(|i| steps.get(i))
            .cloned()
            .unwrap_or_else(|| format!("step {index}"))
    };
    match status {
        SagaStatus::Running => name(step),
        SagaStatus::Compensating | SagaStatus::NeedsAttention if step > 0 => format!("undo {}", name(step - 1)),
        SagaStatus::Compensating | SagaStatus::NeedsAttention => "compensations done".to_owned(),
        SagaStatus::Completed | SagaStatus::Compensated => "finished".to_owned(),
    }
}

/// Headers every dashboard response carries: no caching of operational
/// data, no sniffing, no referrer (a `?token=` URL must not leak), and a
/// content security policy that allows only the dashboard's own stylesheet
/// and script, should escaping ever miss something.
async fn harden(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; \
             form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_read_as_step_names() {
        let steps: Vec<String> = ["create-order", "reserve-stock", "confirm-order"]
            .map(str::to_owned)
            .to_vec();
        assert_eq!(position_label(SagaStatus::Running, 1, &steps), "reserve-stock");
        assert_eq!(position_label(SagaStatus::Compensating, 1, &steps), "undo create-order");
        assert_eq!(
            position_label(SagaStatus::NeedsAttention, 1, &steps),
            "undo create-order"
        );
        assert_eq!(
            position_label(SagaStatus::Compensating, 0, &steps),
            "compensations done"
        );
        assert_eq!(position_label(SagaStatus::Completed, 3, &steps), "finished");
        assert_eq!(position_label(SagaStatus::Running, 7, &steps), "step 7");
    }
}
