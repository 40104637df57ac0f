//! The schema registry: a Confluent-compatible API (Apicurio Registry's `/apis/ccompat/v7`,
//! Confluent's own, Karapace…) where every topic's Avro schema is registered under the subject
//! `<topic>-value` and gets the id the Confluent wire format carries. This module has the
//! settings and a small client for what biofeed asks of a registry: set a subject's
//! compatibility, register a schema version (refused when incompatible), look an id up.
//! Errors name the setting and the address, like every backend's.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use url::Url;

use crate::secret::{readable_file, secret_file, Secret};
use crate::{redacted_address, BackendError, Service};

/// The environment variable naming the registry's URL; errors name it.
pub const URL_SETTING: &str = "BIOFEED_SCHEMA_REGISTRY_URL";

/// Where the schema registry is (none: biofeed uses the single-object framing only).
#[derive(Debug, Clone, clap::Args)]
pub struct RegistrySettings {
    /// The registry's Confluent-compatible API, e.g.
    /// `https://registry:8081/apis/ccompat/v7` (Apicurio) or `https://registry:8081`
    /// (Confluent). Unset: no registry.
    #[arg(
        long = "schema-registry-url",
        id = "schema_registry_url",
        value_name = "URL",
        env = "BIOFEED_SCHEMA_REGISTRY_URL"
    )]
    pub url: Option<Url>,

    /// The user the registry knows biofeed by (HTTP basic auth).
    #[arg(
        long = "schema-registry-user",
        id = "schema_registry_user",
        value_name = "USER",
        env = "BIOFEED_SCHEMA_REGISTRY_USER"
    )]
    pub user: Option<String>,

    /// A file holding that user's password.
    #[arg(
        long = "schema-registry-password-file",
        id = "schema_registry_password_file",
        value_name = "PATH",
        env = "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE",
        value_parser = secret_file("BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE")
    )]
    pub password: Option<Secret>,

    /// PEM file of the CA that signed the registry's certificate (besides the system's roots).
    #[arg(
        long = "schema-registry-ca-file",
        id = "schema_registry_ca_file",
        value_name = "PATH",
        env = "BIOFEED_SCHEMA_REGISTRY_CA_FILE",
        value_parser = readable_file("BIOFEED_SCHEMA_REGISTRY_CA_FILE")
    )]
    pub ca_file: Option<PathBuf>,

    /// How long one request to the registry may take.
    #[arg(
        long = "schema-registry-timeout",
        id = "schema_registry_timeout",
        value_name = "DURATION",
        env = "BIOFEED_SCHEMA_REGISTRY_TIMEOUT",
        default_value = "5s",
        value_parser = crate::parse_duration
    )]
    pub timeout: Duration,
}

impl Default for RegistrySettings {
    /// No registry.
    fn default() -> Self {
        Self {
            url: None,
            user: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// A registry's answer that is not an error of ours to retry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry could not be reached, refused our credentials, or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The registry refused a schema version as incompatible with the subject's earlier ones.
    #[error("the schema registry refused a new version of {subject} as incompatible: {reason}")]
    Incompatible {
        /// The subject.
        subject: String,
        /// The registry's own words.
        reason: String,
    },
}

/// A connected registry client.
#[derive(Clone)]
pub struct Registry {
    http: reqwest::Client,
    base: Url,
    user: Option<String>,
    password: Option<Secret>,
    address: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Registry({})", self.address)
    }
}

impl Registry {
    /// A client for the configured registry (None when no URL is set); a bad CA file or a
    /// password without a user is a [`BackendError::Misconfigured`].
    pub fn new(settings: &RegistrySettings) -> Result<Option<Self>, BackendError> {
        let Some(url) = settings.url.clone() else {
            return Ok(None);
        };
        let misconfigured = |reason: String| BackendError::Misconfigured {
            setting: URL_SETTING,
            reason,
        };
        if settings.password.is_some() != settings.user.is_some() {
            return Err(misconfigured(
                "BIOFEED_SCHEMA_REGISTRY_USER and BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE go together"
                    .to_owned(),
            ));
        }
        let mut builder = reqwest::Client::builder().timeout(settings.timeout);
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| misconfigured(format!("cannot read {}: {e}", ca.display())))?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| misconfigured(format!("{}: {e}", ca.display())))?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
            .build()
            .map_err(|e| misconfigured(format!("the HTTP client: {e}")))?;
        let mut base = url;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Some(Self {
            http,
            address: redacted_address(&base),
            base,
            user: settings.user.clone(),
            password: settings.password.clone(),
        }))
    }

    fn error(&self, reason: String, rejected: bool) -> BackendError {
        let (service, setting, address) =
            (Service::SchemaRegistry, URL_SETTING, self.address.clone());
        if rejected {
            BackendError::Rejected {
                service,
                setting,
                address,
                reason,
            }
        } else {
            BackendError::Failed {
                service,
                setting,
                address,
                reason,
            }
        }
    }

    /// One request: the status and the JSON body (Null when there is none).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), BackendError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| self.error(format!("{path}: {e}"), false))?;
        let mut request = self.http.request(method, url).header(
            "accept",
            "application/vnd.schemaregistry.v1+json, application/json",
        );
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            request = request.basic_auth(user, Some(password.expose()));
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/vnd.schemaregistry.v1+json")
                .body(body.to_string());
        }
        let response = request.send().await.map_err(|e| {
            // A certificate the CA does not vouch for is a refusal; the rest may pass.
            let text = format!("{e:#}");
            let tls = text.contains("certificate") || text.contains("Certificate");
            self.error(text, tls)
        })?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(self.error(
                format!("{status}: the registry refused our credentials (BIOFEED_SCHEMA_REGISTRY_USER, BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE)"),
                true,
            ));
        }
        let text = response
            .text()
            .await
            .map_err(|e| self.error(e.to_string(), false))?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status >= 500 {
            return Err(self.error(format!("{status}: {value}"), false));
        }
        Ok((status, value))
    }

    /// The subject's compatibility level, if it has one of its own.
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, BackendError> {
        let (status, body) = self
            .call(reqwest::Method::GET, &format!("config/{subject}"), None)
            .await?;
        match status {
            200 => Ok(body["compatibilityLevel"]
                .as_str()
                .or(body["compatibility"].as_str())
                .map(str::to_owned)),
            404 => Ok(None),
            _ => Err(self.error(format!("config/{subject}: {status} {body}"), false)),
        }
    }

    /// Sets the subject's compatibility level (e.g. `FULL_TRANSITIVE`).
    pub async fn set_compatibility(&self, subject: &str, level: &str) -> Result<(), BackendError> {
        let (status, body) = self
            .call(
                reqwest::Method::PUT,
                &format!("config/{subject}"),
                Some(json!({ "compatibility": level })),
            )
            .await?;
        if status == 200 {
            Ok(())
        } else {
            Err(self.error(format!("config/{subject}: {status} {body}"), false))
        }
    }

    /// Registers `schema` (Avro JSON) under `subject`: its id, the same for a version the
    /// registry already has; [`RegistryError::Incompatible`] with the registry's reason when the
    /// subject's compatibility refuses it.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("subjects/{subject}/versions"),
                Some(json!({ "schema": schema, "schemaType": "AVRO" })),
            )
            .await?;
        match status {
            200 => body["id"]
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    self.error(
                        format!("subjects/{subject}/versions: no id in {body}"),
                        false,
                    )
                    .into()
                }),
            409 => Err(RegistryError::Incompatible {
                subject: subject.to_owned(),
                reason: body["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| body.to_string()),
            }),
            _ => Err(self
                .error(
                    format!("subjects/{subject}/versions: {status} {body}"),
                    false,
                )
                .into()),
        }
    }

    /// The id the registry gave `schema` under `subject`, if it has it.
    pub async fn id_of(&self, subject: &str, schema: &str) -> Result<Option<u32>, BackendError> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("subjects/{subject}"),
                Some(json!({ "schema": schema, "schemaType": "AVRO" })),
            )
            .await?;
        match status {
            200 => Ok(body["id"].as_u64().and_then(|id| u32::try_from(id).ok())),
            404 => Ok(None),
            _ => Err(self.error(format!("subjects/{subject}: {status} {body}"), false)),
        }
    }
}
