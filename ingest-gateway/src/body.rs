//! Reading request bodies: a size limit that holds after decompression (gzip, zstd), and JSON
//! errors that say where without echoing the value (it may be personal).

use std::io::Read;

use axum::body::Body;
use axum::http::{header, HeaderMap};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// Reads the body, decompressing it as `Content-Encoding` says, refusing more than `limit`
/// bytes at either stage with 413.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "the body is larger than the limit of {limit} bytes"
        ))
    };
    let raw = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let cause = e.into_inner();
        if cause.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            ApiError::malformed(format!("the body could not be read: {cause}"))
        }
    })?;
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => return Ok(raw),
        Some(value) => value
            .to_str()
            .map_err(|_| {
                ApiError::UnsupportedMediaType("Content-Encoding is not ASCII".to_owned())
            })?
            .trim()
            .to_ascii_lowercase(),
    };
    let mut out = Vec::new();
    let read = match encoding.as_str() {
        "identity" => return Ok(raw),
        "gzip" | "x-gzip" => flate2::read::GzDecoder::new(&raw[..])
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        "zstd" => zstd::stream::read::Decoder::new(&raw[..])
            .and_then(|decoder| decoder.take(limit as u64 + 1).read_to_end(&mut out)),
        other => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Content-Encoding '{}' is not supported: use gzip, zstd or none",
                other.escape_debug()
            )))
        }
    };
    read.map_err(|e| ApiError::malformed(format!("the {encoding} body does not decompress: {e}")))?;
    if out.len() > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(out))
}

/// Parses JSON, describing errors by position and kind only.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        use serde_json::error::Category;
        let what = match e.classify() {
            Category::Syntax => "is not valid JSON".to_owned(),
            Category::Eof => "ends too early".to_owned(),
            Category::Io => "could not be read".to_owned(),
            // Data errors name fields and expectations; serde's message may quote the value,
            // so only its part before any quote is kept.
            Category::Data => {
                let message = e.to_string();
                let cut = message.find(['"', '`']).unwrap_or(message.len());
                let message = message[..cut]
                    .split(" at line ")
                    .next()
                    .unwrap_or_default()
                    .trim_end();
                format!("does not match the expected shape ({message})")
            }
        };
        ApiError::malformed(format!(
            "the JSON body {what} at line {} column {}",
            e.line(),
            e.column()
        ))
    })
}
