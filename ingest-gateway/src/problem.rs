//! RFC 7807 problem+json answers: one closed set of error codes, each with its HTTP status.
//!
//! The caller's own mistakes get full detail (which field, what was wrong); internal failures
//! get an opaque message and the cause goes to the log. Details never contain PII: they name
//! fields and limits, never echo personal values.

use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An error answered to an HTTP caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body or a parameter is malformed.
    #[error("{detail}")]
    BadRequest {
        /// What is malformed.
        detail: String,
    },
    /// No or an invalid bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated, but not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The thing does not exist, or the caller may not know it exists.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The route exists, but not with this method (the answer's `Allow` header lists those it has).
    #[error("this route does not answer {0}")]
    MethodNotAllowed(Method),
    /// The thing is in a state that forbids the request (e.g. a closed session).
    #[error("{0}")]
    Conflict(String),
    /// The body or frame is larger than allowed.
    #[error("{0}")]
    TooLarge(String),
    /// The content type or encoding is not one we read.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed, but a value breaks a rule; `field` names it.
    #[error("{field}: {detail}")]
    Unprocessable {
        /// The field, JSON-pointer style (`values/12/3`).
        field: String,
        /// What rule it breaks.
        detail: String,
    },
    /// Too many failed attempts (logins); retry after the hint.
    #[error("{detail}")]
    Throttled {
        /// What is throttled.
        detail: String,
        /// Seconds to wait before retrying.
        retry_after_secs: u64,
    },
    /// The gateway's in-flight budget is used up; retry shortly.
    #[error("the gateway is at its in-flight limit; retry shortly")]
    TooManyRequests,
    /// A backing service cannot take the request now; retry after the hint.
    #[error("{detail}")]
    Unavailable {
        /// What is unavailable.
        detail: String,
        /// Seconds to wait before retrying.
        retry_after_secs: u32,
    },
    /// Something failed inside; the cause is logged, not shown.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The problem+json body.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short, fixed summary of the kind.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// The field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ApiError {
    /// The status and the stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (StatusCode::BAD_REQUEST, "malformed"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not-found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too-large"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported-media-type")
            }
            ApiError::Unprocessable { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid-value"),
            ApiError::TooManyRequests => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            ApiError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
            ApiError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Shorthand for a 422 naming a field.
    pub fn invalid(field: impl Into<String>, detail: impl Into<String>) -> Self {
        ApiError::Unprocessable {
            field: field.into(),
            detail: detail.into(),
        }
    }

    /// Shorthand for a 400.
    pub fn malformed(detail: impl Into<String>) -> Self {
        ApiError::BadRequest {
            detail: detail.into(),
        }
    }
}

fn title(code: &str) -> &'static str {
    match code {
        "malformed" => "Malformed request",
        "unauthenticated" => "Authentication required",
        "forbidden" => "Forbidden",
        "not-found" => "Not found",
        "method-not-allowed" => "Method not allowed",
        "conflict" => "Conflict with the current state",
        "too-large" => "Too large",
        "unsupported-media-type" => "Unsupported media type",
        "invalid-value" => "Invalid value",
        "overloaded" => "Too many requests in flight",
        "throttled" => "Too many failed attempts",
        "unavailable" => "Temporarily unavailable",
        _ => "Internal error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let ApiError::Internal(cause) = &self {
            tracing::error!(error = %format!("{cause:#}"), "internal error answering a request");
        }
        let field = match &self {
            ApiError::Unprocessable { field, .. } => Some(field.clone()),
            _ => None,
        };
        let detail = match &self {
            ApiError::Unprocessable { detail, .. } => detail.clone(),
            other => other.to_string(),
        };
        let problem = Problem {
            kind: format!("https://biofeed.dev/problems/{code}"),
            title: title(code),
            status: status.as_u16(),
            detail,
            field,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        match &self {
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::TooManyRequests => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Throttled {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ApiError::Unavailable {
                retry_after_secs, ..
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                ApiError::Unavailable {
                    detail: "the database is unavailable".to_owned(),
                    retry_after_secs: 2,
                }
            }
            other => ApiError::Internal(other.into()),
        }
    }
}

impl From<biofeed_accounts::AccountsError> for ApiError {
    fn from(e: biofeed_accounts::AccountsError) -> Self {
        use biofeed_accounts::AccountsError as E;
        match e {
            E::Postgres(e) => e.into(),
            E::NoSuchUser => ApiError::NotFound("user"),
            E::NoSuchDevice => ApiError::NotFound("device"),
            E::NoSuchRelationship => ApiError::NotFound("relationship"),
            E::Invalid { field, reason } => ApiError::invalid(field, reason),
            E::Conflict(detail) => ApiError::Conflict(detail),
            E::EmailTaken => ApiError::Conflict("email already registered".to_owned()),
            other @ E::Key(_) => ApiError::Internal(other.into()),
        }
    }
}

impl From<biofeed_accounts::policy::Denied> for ApiError {
    fn from(denied: biofeed_accounts::policy::Denied) -> Self {
        use biofeed_accounts::policy::Denied;
        match denied {
            Denied::NotFound(what) => ApiError::NotFound(what),
            Denied::Forbidden(why) => ApiError::Forbidden(why),
        }
    }
}

impl From<biofeed_accounts::login::LoginError> for ApiError {
    fn from(e: biofeed_accounts::login::LoginError) -> Self {
        use biofeed_accounts::login::LoginError;
        match e {
            LoginError::BadCredentials => ApiError::Unauthorized(e.to_string()),
            LoginError::Throttled { retry_after_secs } => ApiError::Throttled {
                detail: e.to_string(),
                retry_after_secs,
            },
            LoginError::Accounts(e) => e.into(),
        }
    }
}

impl From<clickhouse::error::Error> for ApiError {
    fn from(e: clickhouse::error::Error) -> Self {
        tracing::warn!(error = %e, "clickhouse failed answering a read");
        ApiError::Unavailable {
            detail: "the points store is unavailable".to_owned(),
            retry_after_secs: 2,
        }
    }
}
