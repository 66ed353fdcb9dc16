//! W3C trace context across the broker: injected from the current tracing
//! span when publishing, extracted into the handling span when consuming.

use std::sync::Arc;

use async_trait::async_trait;
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use saga_core::{EngineError, Message, MessageHandler};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header carrying the W3C trace parent.
pub const TRACEPARENT: &str = "traceparent";

struct Headers<'a>(&'a mut Vec<(String, String)>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}

struct MessageHeaders<'a>(&'a Message);

impl Extractor for MessageHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.headers.keys().map(String::as_str).collect()
    }
}

/// `traceparent` (and `tracestate`) of the current tracing span, unless
/// `message` carries a trace context already (e.g. the engine's, recorded when
/// the message entered the outbox).
pub(crate) fn headers_for(message: &Message) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    if message.header(TRACEPARENT).is_some() {
        return headers;
    }
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut Headers(&mut headers));
    }
    headers
}

/// Adds the current tracing span's `traceparent` (and `tracestate`) to
/// `headers`, unless they carry a trace context already. Give it to
/// `saga_core::EngineBuilder::message_headers` so messages entering the
/// outbox continue the trace of what caused them.
pub fn inject_current(headers: &mut std::collections::BTreeMap<String, String>) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let context = tracing::Span::current().context();
    if context.span().span_context().is_valid() {
        let mut injected = Vec::new();
        TraceContextPropagator::new().inject_context(&context, &mut Headers(&mut injected));
        headers.extend(injected);
    }
}

/// The trace context `message` carries (empty when it carries none).
pub fn context_of(message: &Message) -> Context {
    TraceContextPropagator::new().extract(&MessageHeaders(message))
}

/// Makes the trace `message` carries the parent of `span`, so handling it
/// continues the publisher's trace. Does nothing when the message carries no
/// trace context or no OpenTelemetry layer is installed.
pub fn set_parent(span: &tracing::Span, message: &Message) {
    let context = context_of(message);
    if context.span().span_context().is_valid() {
        // Only fails when no OpenTelemetry layer is installed: then there is no trace to continue.
        let _ = span.set_parent(context);
    }
}

/// Wraps a [`MessageHandler`] so each message is handled in a `saga.handle`
/// span whose parent is the trace the message carries.
pub struct TracedHandler {
    inner: Arc<dyn MessageHandler>,
}

impl TracedHandler {
    /// Traces `inner`.
    pub fn new(inner: Arc<dyn MessageHandler>) -> Self {
        Self { inner }
    }
}

#[async_trait]
impl MessageHandler for TracedHandler {
    async fn handle(&self, message: &Message) -> Result<(), EngineError> {
        let span = tracing::info_span!(
            "saga.handle",
            otel.kind = "consumer",
            message_id = %message.id,
            kind = %message.kind,
        );
        set_parent(&span, message);
        self.inner.handle(message).instrument(span).await
    }
}
