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

    /// That user's password. Never logged. Or give BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE.
    #[arg(
        long = "schema-registry-password",
        id = "schema_registry_password",
        value_name = "PASSWORD",
        env = "BIOFEED_SCHEMA_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    pub password_value: Option<Secret>,

    /// A file holding that user's password (e.g. a mounted secret).
    #[arg(
        long = "schema-registry-password-file",
        id = "schema_registry_password_file",
        value_name = "PATH",
        env = "BIOFEED_SCHEMA_REGISTRY_PASSWORD_FILE",
        conflicts_with = "schema_registry_password",
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
            password_value: None,
            password: None,
            ca_file: None,
            timeout: Duration::from_secs(5),
        }
    }
}

impl RegistrySettings {
    /// The password, from the value or the file.
    pub fn password(&self) -> Option<&Secret> {
        self.password_value.as_ref().or(self.password.as_ref())
    }

    /// These settings as a child process's environment (the password as a value).
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(url) = &self.url {
            env.push((URL_SETTING, url.to_string()));
        }
        if let Some(user) = &self.user {
            env.push(("BIOFEED_SCHEMA_REGISTRY_USER", user.clone()));
        }
        if let Some(password) = self.password() {
            env.push((
                "BIOFEED_SCHEMA_REGISTRY_PASSWORD",
                password.expose().to_owned(),
            ));
        }
        if let Some(ca) = &self.ca_file {
            env.push(("BIOFEED_SCHEMA_REGISTRY_CA_FILE", ca.display().to_string()));
        }
        env.push((
            "BIOFEED_SCHEMA_REGISTRY_TIMEOUT",
            format!("{}ms", self.timeout.as_millis()),
        ));
        env
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
        let password = settings.password().cloned();
        if password.is_some() != settings.user.is_some() {
            return Err(misconfigured(
                "BIOFEED_SCHEMA_REGISTRY_USER and a password (BIOFEED_SCHEMA_REGISTRY_PASSWORD or _PASSWORD_FILE) go together"
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
            password,
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
        // A Confluent-compatible API says what is missing with an error code (40401 subject,
        // 40402 version, 40403 schema); a 404 without one is a wrong URL, not a missing schema.
        let confluent_404 = value["error_code"]
            .as_u64()
            .is_some_and(|code| (40400..=40499).contains(&code));
        if status == 404 && !confluent_404 {
            return Err(self.error(
                format!("{path}: 404 without a Confluent error code: is {URL_SETTING} the registry's Confluent-compatible API (…/apis/ccompat/v7 for Apicurio)?"),
                true,
            ));
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
            // 409: incompatible with the subject's versions; 422: not a valid schema.
            409 | 422 => Err(RegistryError::Incompatible {
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

impl Registry {
    /// The schema text the registry holds under `id` (`GET /schemas/ids/{id}`), if any.
    pub async fn schema_by_id(&self, id: u32) -> Result<Option<String>, BackendError> {
        let (status, body) = self
            .call(reqwest::Method::GET, &format!("schemas/ids/{id}"), None)
            .await?;
        match status {
            200 => Ok(body["schema"].as_str().map(str::to_owned)),
            404 => Ok(None),
            _ => Err(self.error(format!("schemas/ids/{id}: {status} {body}"), false)),
        }
    }

    /// Deletes `subject` and its versions for good (soft, then permanently, as the Confluent
    /// API requires); a subject that does not exist is no error.
    pub async fn delete_subject(&self, subject: &str) -> Result<(), BackendError> {
        for path in [
            format!("subjects/{subject}"),
            format!("subjects/{subject}?permanent=true"),
        ] {
            let (status, body) = self.call(reqwest::Method::DELETE, &path, None).await?;
            if status != 200 && status != 404 {
                return Err(self.error(format!("{path}: {status} {body}"), false));
            }
        }
        Ok(())
    }

    /// The id the registry gave this build's current schema version under `subject`; a
    /// [`BackendError::Rejected`] naming `biofeed migrate` when it has none.
    pub async fn current_id(&self, subject: &str) -> Result<u32, BackendError> {
        let current = biofeed_schema::registry::current();
        self.id_of(subject, &current.text).await?.ok_or_else(|| {
            self.error(
                format!(
                    "the registry has no id for SensorFrame v{} under {subject}: run `biofeed migrate`",
                    current.version
                ),
                true,
            )
        })
    }
}

/// How long an id the registry did not have is not asked for again.
const MISSING_FOR: Duration = Duration::from_secs(60);

/// At most this many ids remembered as missing (then the expired ones are forgotten).
const MAX_NOT_BEFORE: usize = 4096;

/// How long an id is not asked for again after the registry could not be asked (by readers
/// that do not wait for it; the consumers ask again with their own backoff).
const FAILED_FOR: Duration = Duration::from_secs(5);

/// Writer schemas by registry id, learnt from the registry and kept: what readers of
/// Confluent-framed frames decode with ([`biofeed_schema::decode_framed`]). Loaded once at
/// start; an id seen later that is not known yet is asked for once (an id the registry does not
/// have is not asked for again for a minute, nor one the registry could not be asked about for
/// 5 s), so the steady state makes no registry call and a registry that goes away later only
/// matters for ids never seen before.
#[derive(Debug, Default)]
pub struct WriterSchemas {
    registry: Option<Registry>,
    ids: biofeed_schema::SchemaIds,
    /// Ids not to ask for again until the instant.
    not_before: std::collections::HashMap<u32, std::time::Instant>,
}

impl WriterSchemas {
    /// Learns the ids of the versions this build knows that the registry holds under
    /// `subject`. With no registry, nothing: a Confluent-framed frame is then an unknown id.
    /// A registry that cannot be asked is an error (the caller exits 3).
    pub async fn load(registry: Option<Registry>, subject: &str) -> Result<Self, BackendError> {
        let mut ids = biofeed_schema::SchemaIds::default();
        if let Some(registry) = &registry {
            for version in biofeed_schema::registry::builtin().versions() {
                if let Some(id) = registry.id_of(subject, &version.text).await? {
                    ids.insert(id, version.clone());
                }
            }
        }
        Ok(Self {
            registry,
            ids,
            not_before: Default::default(),
        })
    }

    /// Nothing known yet; ids are asked of `registry` as they come.
    pub fn from_registry(registry: Option<Registry>) -> Self {
        Self {
            registry,
            ..Self::default()
        }
    }

    /// What is known.
    pub fn ids(&self) -> &biofeed_schema::SchemaIds {
        &self.ids
    }

    /// The Confluent schema id `payload` names when it is one to ask the registry for: not
    /// known and not recently missing (with no registry configured, every unknown id).
    pub fn unknown_id(&self, payload: &[u8]) -> Option<u32> {
        match biofeed_schema::writer_of(payload) {
            Ok((biofeed_schema::Writer::SchemaId(id), _)) => (self.ids.get(id).is_none()
                && self
                    .not_before
                    .get(&id)
                    .is_none_or(|at| std::time::Instant::now() >= *at))
            .then_some(id),
            _ => None,
        }
    }

    /// Asks the registry for schema `id` and keeps the answer (a schema that does not parse
    /// counts as missing). An error when the registry cannot answer (retryable: the caller
    /// asks again, the frame waits), or when no registry is configured (a
    /// [`BackendError::Misconfigured`]: a Confluent-framed frame needs one, and dead-lettering
    /// every such frame would hide the mistake).
    pub async fn learn(&mut self, id: u32) -> Result<(), BackendError> {
        let now = std::time::Instant::now();
        if self.not_before.len() >= MAX_NOT_BEFORE {
            // Hostile or broken frames with ever new ids must not grow this without bound.
            self.not_before.retain(|_, at| *at > now);
            if self.not_before.len() >= MAX_NOT_BEFORE {
                self.not_before.clear();
            }
        }
        let Some(registry) = &self.registry else {
            self.not_before.insert(id, now + FAILED_FOR);
            return Err(BackendError::Misconfigured {
                setting: URL_SETTING,
                reason: format!(
                    "a frame is in the Confluent wire format (schema id {id}) and no schema registry is configured"
                ),
            });
        };
        let answer = registry.schema_by_id(id).await.inspect_err(|_| {
            self.not_before.insert(id, now + FAILED_FOR);
        })?;
        match answer {
            Some(text) => match biofeed_schema::registry::KnownSchema::parse(0, &text) {
                Ok(schema) => {
                    tracing::info!(schema_id = id, "learnt a writer schema from the registry");
                    self.ids.insert(id, schema);
                    self.not_before.remove(&id);
                }
                Err(e) => {
                    tracing::warn!(schema_id = id, error = %e, "the registry's schema does not parse");
                    self.not_before.insert(id, now + MISSING_FOR);
                }
            },
            None => {
                tracing::warn!(schema_id = id, "the registry has no schema with this id");
                self.not_before.insert(id, now + MISSING_FOR);
            }
        }
        Ok(())
    }
}
