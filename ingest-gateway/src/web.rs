//! The people's web app: the pages, script and styles built by npm from `web/` into `web/dist`
//! and embedded in the binary at compile time (a release binary serves the app with no web
//! server beside it), served at `/` and `/assets/…`. The app speaks only the people API, under
//! its one access policy: it adds no rule of its own.
//!
//! Every answer of the gateway carries the browser hardening headers of [`security_headers`]: a
//! strict Content-Security-Policy (scripts, styles and connections from this origin only, no
//! inline script, no framing), `nosniff`, no referrer.

use axum::extract::Path;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::problem::ApiError;

/// The built app (`npm ci && npm run build` in `web/`; `compose/local` does it). A binary built
/// without it answers `/` with a 503 naming the missing step.
#[derive(rust_embed::Embed)]
#[folder = "../web/dist"]
#[allow_missing = true]
struct Assets;

/// The page's policy: everything from this origin only, no inline script or style, no plugins,
/// never framed, forms post only here.
pub const CONTENT_SECURITY_POLICY_VALUE: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
    manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The app's routes: the page at `/` and its assets.
pub fn routes() -> Router {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { asset("index.html", &headers) }))
        .route(
            "/assets/{*file}",
            get(|Path(file): Path<String>, headers: HeaderMap| async move {
                asset(&file, &headers)
            }),
        )
}

/// `router` with the hardening headers on every answer (a handler's own value wins).
pub fn harden(router: Router) -> Router {
    let header = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
    };
    router
        .layer(header(
            CONTENT_SECURITY_POLICY,
            CONTENT_SECURITY_POLICY_VALUE,
        ))
        .layer(header(X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header(REFERRER_POLICY, "no-referrer"))
        .layer(header(X_FRAME_OPTIONS, "DENY"))
        .layer(header(
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ))
}

/// One embedded file, with its type and an ETag (its SHA-256), or 304 when the browser has it.
fn asset(path: &str, headers: &HeaderMap) -> Response {
    let Some(file) = Assets::get(path) else {
        if path == "index.html" {
            return ApiError::Unavailable {
                detail: "the web app was not built into this gateway: run `npm ci && npm run build` in web/, then build biofeed again (compose/local does both)".to_owned(),
                retry_after_secs: 3600,
            }
            .into_response();
        }
        return ApiError::NotFound("asset").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(file.metadata.sha256_hash()));
    let etag = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    // Names are not content-hashed: the browser revalidates every time (a 304 is cheap).
    let cache = HeaderValue::from_static("no-cache");
    if headers.get(IF_NONE_MATCH) == Some(&etag) {
        return (
            StatusCode::NOT_MODIFIED,
            [(ETAG, etag), (CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    let mime = HeaderValue::from_str(file.metadata.mimetype())
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        [(CONTENT_TYPE, mime), (ETAG, etag), (CACHE_CONTROL, cache)],
        file.data,
    )
        .into_response()
}
