//! Every error `vault api` answers, each with its status and a message that says what to fix:
//! bad input is a 4xx naming the parameter, a store failure a 503 with a retry hint (the cause
//! is logged, never sent), never a stack trace. JSON for the API, a small page for the HTML page.

use axum::body::Body;
use axum::http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;
use utoipa::ToSchema;

use crate::store::StoreError;

/// Seconds a client is asked to wait after a 503.
pub const RETRY_AFTER_SECONDS: u64 = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// A query parameter or the user id is not acceptable.
    BadParameter {
        parameter: &'static str,
        message: String,
    },
    /// No event of this user is stored.
    UnknownUser(String),
    /// No route here.
    NoRoute(String),
    /// No valid token; `basic` asks a browser to prompt for one.
    Unauthorized { message: String, basic: bool },
    /// A valid token whose scope is not enough.
    Forbidden { message: String },
    /// The store failed; the error is logged, the client told to retry.
    Store(StoreError),
}

/// The body of every JSON error.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    /// A stable code: `bad_parameter`, `unknown_user`, `not_found`, `unauthorized`,
    /// `forbidden`, `store_unavailable`.
    pub error: &'static str,
    /// What went wrong and what to do.
    pub message: String,
    /// The parameter at fault, for `bad_parameter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<&'static str>,
    /// For `store_unavailable`: when to try again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

impl ApiError {
    pub fn bad(parameter: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::BadParameter {
            parameter,
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownUser(_) | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn body(&self) -> ErrorJson {
        let (error, message, parameter, retry) = match self {
            ApiError::BadParameter { parameter, message } => {
                ("bad_parameter", message.clone(), Some(*parameter), None)
            }
            ApiError::UnknownUser(u) => (
                "unknown_user",
                format!(
                    "no event of user '{u}' is stored: check the user id (it is matched exactly, \
                     case included)"
                ),
                None,
                None,
            ),
            ApiError::NoRoute(path) => (
                "not_found",
                format!(
                    "no endpoint at {path}: see /v1/openapi.json for the endpoints vault api serves"
                ),
                None,
                None,
            ),
            ApiError::Unauthorized { message, .. } => ("unauthorized", message.clone(), None, None),
            ApiError::Forbidden { message } => ("forbidden", message.clone(), None, None),
            ApiError::Store(e) => (
                "store_unavailable",
                format!(
                    "the event store cannot answer right now ({}); retry in {RETRY_AFTER_SECONDS} s",
                    e.kind()
                ),
                None,
                Some(RETRY_AFTER_SECONDS),
            ),
        };
        ErrorJson {
            error,
            message,
            parameter,
            retry_after_seconds: retry,
        }
    }

    /// The message shown to the client.
    pub fn message(&self) -> String {
        self.body().message
    }

    fn log(&self) {
        if let ApiError::Store(e) = self {
            tracing::warn!(error = %e, kind = e.kind(), "A read-side request failed in the store.");
        }
    }

    fn decorate(&self, response: &mut Response<Body>) {
        let headers = response.headers_mut();
        match self {
            ApiError::Unauthorized { basic: true, .. } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"vault\", charset=\"UTF-8\""),
                );
            }
            ApiError::Unauthorized { basic: false, .. } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"vault\""),
                );
            }
            ApiError::Store(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
            }
            _ => {}
        }
    }

    /// The error as a JSON response.
    pub fn into_json(self) -> Response<Body> {
        self.log();
        let body = serde_json::to_vec(&self.body()).expect("an error body serializes");
        let mut response = crate::api::json_response(self.status(), body);
        self.decorate(&mut response);
        response
    }

    /// The error as an HTML page (for the page's routes).
    pub fn into_html(self) -> Response<Body> {
        self.log();
        let page = crate::api::html::error_page(self.status(), &self.message());
        let mut response = crate::api::html::html_response(self.status(), page);
        self.decorate(&mut response);
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}
