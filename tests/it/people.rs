//! The people-facing API and the access policy, over HTTP against a real gateway, Postgres and
//! ClickHouse: sign-up, login, relationships and consent, the access matrix over every read
//! endpoint and the export, minors, erasure, the login throttle (logins and the password checks
//! of `/v1/me`), password rehashing and changes, one live account per email, and the audit of an
//! operator's export.

use biofeed_accounts::passwords::{PasswordSettings, Passwords};
use biofeed_accounts::users::{self, Email, NewUser, ProfileFields};
use biofeed_accounts::Accounts;
use chrono::{Datelike, NaiveDate, Utc};
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::gateway_app::{now_us, TestGateway};
use crate::helpers::{json_lines, metrics_text, send_expecting};

pub const PASSWORD: &str = "correct horse battery staple";

/// A person with a login token.
#[derive(Debug, Clone)]
pub struct Person {
    pub id: Uuid,
    pub email: String,
    pub token: String,
}

/// A birth date `years` ago (1 January, or today if that is later).
pub fn born_years_ago(years: i32) -> NaiveDate {
    let today = Utc::now().date_naive();
    NaiveDate::from_ymd_opt(today.year() - years, 1, 1)
        .unwrap()
        .min(today)
}

impl TestGateway {
    /// Signs a person up through the API with `profile` and logs them in.
    pub async fn sign_up_with(&self, role: &str, profile: Value) -> Person {
        let email = format!("{role}-{}@example.org", Uuid::new_v4().simple());
        let response = self
            .http
            .post(format!("{}/v1/users", self.url))
            .json(&json!({
                "email": email, "password": PASSWORD, "role": role,
                "accept_terms": "2026-11-01", "profile": profile,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: Value = response.json().await.unwrap();
        let id: Uuid = body["user_id"].as_str().unwrap().parse().unwrap();
        let token = self.log_in(&email, PASSWORD).await.unwrap();
        Person { id, email, token }
    }

    /// Signs up an adult (or a child: `years` old) in Germany.
    pub async fn sign_up(&self, role: &str, years: i32) -> Person {
        self.sign_up_with(
            role,
            json!({ "birth_date": born_years_ago(years), "country": "DE" }),
        )
        .await
    }

    /// An admin or analyst: created by an operator (here the accounts library), then logged in.
    pub async fn operator_made(&self, role: &str) -> Person {
        let email = format!("{role}-{}@example.org", Uuid::new_v4().simple());
        let hash = Passwords::new(&PasswordSettings::default())
            .unwrap()
            .hash(PASSWORD)
            .unwrap();
        let id = users::create(
            &self.accounts().await,
            &NewUser {
                email: Email::parse(&email).unwrap(),
                role: role.to_owned(),
                password_hash: Some(hash),
                fields: ProfileFields::default(),
                terms_version: None,
            },
        )
        .await
        .unwrap();
        let token = self.log_in(&email, PASSWORD).await.unwrap();
        Person { id, email, token }
    }

    /// Logs in; the token, or the status and problem body.
    pub async fn log_in(&self, email: &str, password: &str) -> Result<String, (u16, Value)> {
        let response = self
            .http
            .post(format!("{}/v1/auth/login", self.url))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if status == 200 {
            Ok(body["token"].as_str().unwrap().to_owned())
        } else {
            Err((status, body))
        }
    }

    /// A request with a person's login token.
    pub fn as_person(
        &self,
        method: reqwest::Method,
        person: &Person,
        path: &str,
    ) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&person.token)
    }

    /// GET as a person: status and JSON body (problem bodies checked for their shape).
    pub async fn read(&self, person: &Person, path: &str) -> (u16, Value) {
        let response = self
            .as_person(reqwest::Method::GET, person, path)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = response.text().await.unwrap();
        if status >= 400 {
            assert_eq!(content_type, "application/problem+json", "{status} {text}");
        }
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POST JSON as a person: status and body.
    pub async fn send(&self, person: &Person, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .as_person(reqwest::Method::POST, person, path)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `lead` proposes, `follower` accepts: a live relationship; its id.
    pub async fn relate(&self, lead: &Person, follower: &Person, kind: &str) -> Uuid {
        let (status, body) = self
            .send(
                lead,
                "/v1/relationships",
                json!({ "type": kind, "follower_id": follower.id }),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let id: Uuid = body["id"].as_str().unwrap().parse().unwrap();
        let (status, body) = self
            .send(
                follower,
                &format!("/v1/relationships/{id}/accept"),
                json!({}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["consented_at"].is_string(), "{body}");
        id
    }

    /// A device for `person`; its token.
    pub async fn device_for(&self, person: &Person) -> String {
        biofeed_accounts::devices::create_device(&self.accounts().await.pool, person.id, "strap")
            .await
            .unwrap()
            .token
    }

    /// Opens a heart-rate session with a device token: status and body.
    pub async fn open_with(&self, device_token: &str) -> (u16, Value) {
        let response = self
            .http
            .post(format!("{}/v1/sessions", self.url))
            .bearer_auth(device_token)
            .json(&json!({ "exercise": "hrv_biofeedback", "data_types": ["heart_rate"], "location": "Room 7" }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A session of `person` with `values` heart-rate samples 1 s apart written to ClickHouse's
    /// points table (as the consumer writes them); the session id and the first sample time.
    pub async fn session_with_points(&self, person: &Person, values: &[f32]) -> (Uuid, i64) {
        let device = self.device_for(person).await;
        let (status, body) = self.open_with(&device).await;
        assert_eq!(status, 201, "{body}");
        let session: Uuid = body["session_id"].as_str().unwrap().parse().unwrap();
        let t0 = (now_us() / 60_000_000 - 10) * 60_000_000;
        let samples: Vec<(i64, Vec<f32>)> = (0_i64..)
            .zip(values)
            .map(|(i, v)| (t0 + i * 1_000_000, vec![*v]))
            .collect();
        self.stores
            .insert_points(person.id, session, "heart_rate", &samples)
            .await;
        (session, t0)
    }
}

/// Who may read what: every actor of the issue over every read endpoint and the export.
#[tokio::test]
async fn the_access_matrix_holds_over_every_read_endpoint_and_the_export() {
    let gw = TestGateway::spawn(&[]).await;
    let patient = gw.sign_up("user", 35).await;
    let child = gw.sign_up("user", 10).await;
    let guardian = gw.sign_up("guardian", 40).await;
    let other = gw.sign_up("user", 30).await;
    let with_consent = gw.sign_up("practitioner", 50).await;
    let without_consent = gw.sign_up("practitioner", 50).await;
    let revoked = gw.sign_up("practitioner", 50).await;
    let admin = gw.operator_made("admin").await;
    let analyst = gw.operator_made("analyst").await;

    gw.relate(&guardian, &child, "parent_child").await;
    gw.relate(&with_consent, &patient, "practitioner_patient")
        .await;
    let revoked_link = gw.relate(&revoked, &patient, "practitioner_patient").await;
    // Proposed, never accepted: grants nothing.
    let (status, _) = gw
        .send(
            &without_consent,
            "/v1/relationships",
            json!({ "type": "practitioner_patient", "follower_id": patient.id }),
        )
        .await;
    assert_eq!(status, 201);

    let values: Vec<f32> = (0..120).map(|i| 60.0 + (i % 17) as f32).collect();
    let (patient_session, t0) = gw.session_with_points(&patient, &values).await;
    let (child_session, _) = gw.session_with_points(&child, &[70.0, 71.0]).await;
    let (guardian_session, _) = gw.session_with_points(&guardian, &[80.0]).await;

    let paths = |user: Uuid, session: Uuid| {
        [
            format!("/v1/users/{user}/sessions"),
            format!("/v1/sessions/{session}"),
            format!("/v1/sessions/{session}/points?data_type=heart_rate"),
            format!("/v1/sessions/{session}/metrics"),
            format!("/v1/users/{user}/access-log"),
        ]
    };
    // Expected status per endpoint: sessions, session, points, metrics, access log.
    let ok_data = [200, 200, 200, 200, 404];
    let nothing = [404, 404, 404, 404, 404];
    let cases: Vec<(&str, &Person, Uuid, Uuid, [u16; 5])> = vec![
        (
            "self",
            &patient,
            patient.id,
            patient_session,
            [200, 200, 200, 200, 200],
        ),
        ("another user", &other, patient.id, patient_session, nothing),
        (
            "guardian of someone else",
            &guardian,
            patient.id,
            patient_session,
            nothing,
        ),
        (
            "guardian → child",
            &guardian,
            child.id,
            child_session,
            ok_data,
        ),
        (
            "child → guardian",
            &child,
            guardian.id,
            guardian_session,
            nothing,
        ),
        (
            "child → own",
            &child,
            child.id,
            child_session,
            [200, 200, 200, 200, 200],
        ),
        (
            "practitioner with consent",
            &with_consent,
            patient.id,
            patient_session,
            ok_data,
        ),
        (
            "practitioner without consent",
            &without_consent,
            patient.id,
            patient_session,
            nothing,
        ),
        (
            "practitioner before revocation",
            &revoked,
            patient.id,
            patient_session,
            ok_data,
        ),
        (
            "admin",
            &admin,
            patient.id,
            patient_session,
            [404, 404, 404, 404, 200],
        ),
        ("analyst", &analyst, patient.id, patient_session, nothing),
    ];
    for (who, actor, user, session, expected) in &cases {
        for (path, want) in paths(*user, *session).iter().zip(expected) {
            let (status, body) = gw.read(actor, path).await;
            assert_eq!(status, *want, "{who}: GET {path} → {body}");
        }
    }

    // Revocation by the patient takes effect on the very next request.
    let (status, body) = gw
        .send(
            &patient,
            &format!("/v1/relationships/{revoked_link}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for path in paths(patient.id, patient_session) {
        let (status, body) = gw.read(&revoked, &path).await;
        assert_eq!(
            status, 404,
            "practitioner after revocation: GET {path} → {body}"
        );
    }
    // The practitioner cannot re-accept it on the patient's behalf either.
    let (status, _) = gw
        .send(
            &revoked,
            &format!("/v1/relationships/{revoked_link}/accept"),
            json!({}),
        )
        .await;
    assert!(status == 403 || status == 404, "{status}");

    // What an allowed reader sees: the sessions and points of the patient, without the location
    // (only the owner sees that).
    let (_, sessions) = gw
        .read(&with_consent, &format!("/v1/users/{}/sessions", patient.id))
        .await;
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");
    assert_eq!(sessions[0]["session_id"], patient_session.to_string());
    assert!(sessions[0].get("location").is_none(), "{sessions}");
    let (_, own) = gw
        .read(&patient, &format!("/v1/sessions/{patient_session}"))
        .await;
    assert_eq!(own["location"], "Room 7");
    let (_, raw) = gw
        .read(
            &with_consent,
            &format!("/v1/sessions/{patient_session}/points?data_type=heart_rate"),
        )
        .await;
    let samples = raw["samples"].as_array().unwrap();
    assert_eq!(samples.len(), values.len());
    assert_eq!(samples[5]["t_us"], t0 + 5_000_000);
    assert_eq!(samples[5]["values"][0].as_f64().unwrap() as f32, values[5]);
    // Downsampled per minute: equal to the aggregate computed here over the same values.
    let (_, minutes) = gw
        .read(
            &with_consent,
            &format!("/v1/sessions/{patient_session}/points?data_type=heart_rate&step=1m"),
        )
        .await;
    let buckets = minutes["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 2, "{minutes}");
    for (b, chunk) in buckets.iter().zip(values.chunks(60)) {
        let mean = chunk.iter().map(|v| f64::from(*v)).sum::<f64>() / chunk.len() as f64;
        let min = chunk.iter().copied().fold(f32::MAX, f32::min);
        let max = chunk.iter().copied().fold(f32::MIN, f32::max);
        assert_eq!(b["count"], 60);
        assert_eq!(b["min"][0].as_f64().unwrap() as f32, min);
        assert_eq!(b["max"][0].as_f64().unwrap() as f32, max);
        assert!((b["mean"][0].as_f64().unwrap() - mean).abs() < 1e-9, "{b}");
    }

    // Every read of the patient's data by someone else is in the patient's access log, allowed
    // or not; the patient's own reads are not.
    let (_, log) = gw
        .read(&patient, &format!("/v1/users/{}/access-log", patient.id))
        .await;
    let log = log.as_array().unwrap();
    let by = |actor: &Person, allowed: bool| {
        log.iter()
            .filter(|r| r["actor_id"] == actor.id.to_string() && r["allowed"] == allowed)
            .count()
    };
    assert!(by(&with_consent, true) >= 4, "{log:?}");
    assert!(by(&other, false) >= 4, "{log:?}");
    assert!(by(&revoked, false) >= 4, "{log:?}");
    assert_eq!(by(&patient, true), 0);

    // The export holds only the caller's own data.
    let exports = [
        (&patient, vec![patient_session]),
        (&child, vec![child_session]),
        (&guardian, vec![guardian_session]),
        (&with_consent, vec![]),
    ];
    for (person, own_sessions) in exports {
        let response = gw
            .as_person(reqwest::Method::GET, person, "/v1/me/export")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "application/x-ndjson");
        let text = response.text().await.unwrap();
        let lines = json_lines(&text);
        assert_eq!(lines[0]["type"], "export");
        assert_eq!(lines[0]["user_id"], person.id.to_string());
        assert_eq!(lines.last().unwrap()["type"], "end", "complete export");
        let profile = lines.iter().find(|l| l["type"] == "profile").unwrap();
        assert_eq!(profile["email"], person.email);
        let own: Vec<String> = own_sessions.iter().map(Uuid::to_string).collect();
        let sessions: Vec<&str> = lines
            .iter()
            .filter(|l| l["type"] == "session")
            .map(|l| l["session_id"].as_str().unwrap())
            .collect();
        assert_eq!(sessions, own, "{text}");
        for line in lines.iter().filter(|l| l["type"] == "points") {
            assert!(
                own.contains(&line["session_id"].as_str().unwrap().to_owned()),
                "{line}"
            );
        }
        if person.id == patient.id {
            let points: usize = lines
                .iter()
                .filter(|l| l["type"] == "points")
                .map(|l| l["t_us"].as_array().unwrap().len())
                .sum();
            assert_eq!(points, values.len());
            assert_eq!(lines.last().unwrap()["points"], values.len());
        }
    }
}

#[tokio::test]
async fn a_minor_opens_sessions_only_after_a_guardian_consented() {
    let gw = TestGateway::spawn(&[]).await;
    let child = gw.sign_up("user", 12).await;
    let device = gw.device_for(&child).await;
    let (status, body) = gw.open_with(&device).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains("consent age"),
        "{body}"
    );

    // A practitioner's invitation cannot be accepted by the minor; their guardian accepts it.
    let practitioner = gw.sign_up("practitioner", 45).await;
    let (_, invitation) = gw
        .send(
            &practitioner,
            "/v1/relationships",
            json!({ "type": "practitioner_patient", "follower_id": child.id }),
        )
        .await;
    let care: Uuid = invitation["id"].as_str().unwrap().parse().unwrap();
    let (status, body) = gw
        .send(
            &child,
            &format!("/v1/relationships/{care}/accept"),
            json!({}),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    // The child proposes their parent; consent comes with the parent's acceptance.
    let parent = gw.sign_up("guardian", 41).await;
    let (status, proposal) = gw
        .send(
            &child,
            "/v1/relationships",
            json!({ "type": "parent_child", "lead_id": parent.id }),
        )
        .await;
    assert_eq!(status, 201, "{proposal}");
    let link = proposal["id"].as_str().unwrap();
    // Still pending: no sessions yet; the proposer cannot accept their own proposal.
    assert_eq!(gw.open_with(&device).await.0, 403);
    let (status, _) = gw
        .send(
            &child,
            &format!("/v1/relationships/{link}/accept"),
            json!({}),
        )
        .await;
    assert_eq!(status, 403);
    let (status, accepted) = gw
        .send(
            &parent,
            &format!("/v1/relationships/{link}/accept"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{accepted}");
    assert_eq!(accepted["consented_by"], parent.id.to_string());
    let (status, body) = gw.open_with(&device).await;
    assert_eq!(status, 201, "{body}");

    // Now the guardian accepts the practitioner for the child.
    let (status, body) = gw
        .send(
            &parent,
            &format!("/v1/relationships/{care}/accept"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // An adult in a country whose consent age is 13 needs nobody: a 14-year-old in the US.
    let teen = gw
        .sign_up_with(
            "user",
            json!({ "birth_date": born_years_ago(14), "country": "US" }),
        )
        .await;
    assert_eq!(gw.open_with(&gw.device_for(&teen).await).await.0, 201);
    // The guardian revokes: the child cannot open new sessions any more.
    let (status, _) = gw
        .send(
            &parent,
            &format!("/v1/relationships/{link}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(gw.open_with(&device).await.0, 403);
}

#[tokio::test]
async fn the_profile_is_readable_and_changeable_only_by_its_owner_and_bad_input_is_named() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw
        .sign_up_with(
            "user",
            json!({ "first_name": "Ada", "birth_date": "1990-12-10", "country": "GB", "demographics": {"handedness": "left"} }),
        )
        .await;
    let (status, me) = gw.read(&ada, "/v1/me").await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["first_name"].as_str(), me["email"].as_str()),
        (Some("Ada"), Some(ada.email.as_str()))
    );
    assert_eq!(me["terms_version"], "2026-11-01");
    assert!(me["terms_accepted_at"].is_string());

    let response = gw
        .as_person(reqwest::Method::PATCH, &ada, "/v1/me")
        .json(&json!({ "profile": { "location": "Cambridge", "first_name": null } }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let me: Value = response.json().await.unwrap();
    assert_eq!(me["location"], "Cambridge");
    assert!(me.get("first_name").is_none(), "{me}");
    assert_eq!(me["demographics"]["handedness"], "left");

    // Bad input: each answer names the field, never echoes personal values, changes nothing.
    let bad_patches = [
        (json!({ "profile": { "country": "Britain" } }), "country"),
        (
            json!({ "profile": { "birth_date": "3000-01-01" } }),
            "birth_date",
        ),
        (json!({ "profile": { "shoe_size": 42 } }), "profile"),
        (json!({ "email": "not-an-email" }), "email"),
        (
            json!({ "password": "new password 123" }),
            "current_password",
        ),
    ];
    for (patch, field) in bad_patches {
        let response = gw
            .as_person(reqwest::Method::PATCH, &ada, "/v1/me")
            .json(&patch)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{patch}");
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["field"].as_str().unwrap().contains(field)
                || problem["detail"].as_str().unwrap().contains(field),
            "{problem}"
        );
        assert!(!problem.to_string().contains("Britain"), "{problem}");
    }
    let bad_signups = [
        (
            json!({ "email": "x@example.org", "password": PASSWORD, "accept_terms": "2026-11-01", "profile": {} }),
            "birth_date",
        ),
        (
            json!({ "email": "x@example.org", "password": PASSWORD, "accept_terms": "1999", "profile": { "birth_date": "1990-01-01" } }),
            "accept_terms",
        ),
        (
            json!({ "email": "x@example.org", "password": "short", "accept_terms": "2026-11-01", "profile": { "birth_date": "1990-01-01" } }),
            "password",
        ),
        (
            json!({ "email": "x@example.org", "password": PASSWORD, "role": "admin", "accept_terms": "2026-11-01", "profile": { "birth_date": "1990-01-01" } }),
            "role",
        ),
        (
            json!({ "email": "secret-name@@example.org", "password": PASSWORD, "accept_terms": "2026-11-01", "profile": { "birth_date": "1990-01-01" } }),
            "email",
        ),
    ];
    for (body, field) in bad_signups {
        let response = gw
            .http
            .post(format!("{}/v1/users", gw.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{body}");
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["field"]
                .as_str()
                .unwrap_or_default()
                .contains(field),
            "{problem}"
        );
        assert!(!problem.to_string().contains("secret-name"), "{problem}");
    }
    let response = gw
        .http
        .post(format!("{}/v1/users", gw.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    // Bad query strings and ids on the reads.
    for (path, status) in [
        (format!("/v1/users/{}/sessions?limit=0", ada.id), 422),
        (format!("/v1/users/{}/sessions?bogus=1", ada.id), 400),
        ("/v1/users/not-a-uuid/sessions".to_owned(), 404),
        (
            format!(
                "/v1/sessions/{}/points?data_type=heart_rate",
                Uuid::new_v4()
            ),
            404,
        ),
    ] {
        assert_eq!(gw.read(&ada, &path).await.0, status, "{path}");
    }
    let (session, _) = gw.session_with_points(&ada, &[60.0]).await;
    for query in [
        "data_type=eeg",
        "data_type=heart_rate&step=forever",
        "data_type=heart_rate&from=yesterday",
        "data_type=heart_rate&from=10&to=5",
    ] {
        let (status, body) = gw
            .read(&ada, &format!("/v1/sessions/{session}/points?{query}"))
            .await;
        assert_eq!(status, 422, "{query}: {body}");
    }
    // No token, a bad token, a device token where a login token belongs.
    for auth in [None, Some("bfu_nonsense"), Some(gw.token.as_str())] {
        let mut request = gw.http.get(format!("{}/v1/me", gw.url));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // Logout ends the token at once.
    let response = gw
        .as_person(reqwest::Method::POST, &ada, "/v1/auth/logout")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(gw.read(&ada, "/v1/me").await.0, 401);
}

#[tokio::test]
async fn failed_logins_are_throttled_per_account_and_unknown_emails_alike() {
    let gw = TestGateway::spawn(&["--login-max-failures", "3"]).await;
    let ada = gw.sign_up("user", 30).await;
    for _ in 0..3 {
        assert_eq!(
            gw.log_in(&ada.email, "wrong password!")
                .await
                .unwrap_err()
                .0,
            401
        );
    }
    // The fourth attempt is refused before any password check, even with the right password.
    let (status, problem) = gw.log_in(&ada.email, PASSWORD).await.unwrap_err();
    assert_eq!(status, 429, "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("too many failed logins"));
    let response = gw
        .http
        .post(format!("{}/v1/auth/login", gw.url))
        .json(&json!({ "email": ada.email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry > 0 && retry <= 900, "{retry}");
    // An unknown email answers exactly like a wrong password, and is throttled the same way.
    let ghost = format!("ghost-{}@example.org", Uuid::new_v4().simple());
    let (status, first) = gw.log_in(&ghost, PASSWORD).await.unwrap_err();
    let (_, wrong) = gw
        .log_in(&gw.sign_up("user", 30).await.email, "wrong password!")
        .await
        .unwrap_err();
    assert_eq!((status, &first["detail"]), (401, &wrong["detail"]));
    for _ in 0..2 {
        gw.log_in(&ghost, PASSWORD).await.unwrap_err();
    }
    assert_eq!(gw.log_in(&ghost, PASSWORD).await.unwrap_err().0, 429);
    let metrics = metrics_text(&gw.url).await;
    assert!(
        metrics.contains("biofeed_gateway_logins_total{outcome=\"throttled\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn failed_logins_are_throttled_per_client_address_across_accounts() {
    let gw = TestGateway::spawn(&["--login-max-failures-per-address", "4"]).await;
    let ada = gw.sign_up("user", 30).await;
    // Four different accounts guessed from one address: each account is far from its own limit.
    for _ in 0..4 {
        let guess = format!("guess-{}@example.org", Uuid::new_v4().simple());
        assert_eq!(gw.log_in(&guess, PASSWORD).await.unwrap_err().0, 401);
    }
    // From this address, even a correct login now waits.
    let (status, problem) = gw.log_in(&ada.email, PASSWORD).await.unwrap_err();
    assert_eq!(status, 429, "{problem}");
}

#[tokio::test]
async fn raising_the_password_cost_rehashes_at_the_next_login() {
    let gw = TestGateway::spawn(&["--password-iterations", "3"]).await;
    // Made with OWASP's minimum (t=2), as an older deployment would have.
    let email = format!("old-{}@example.org", Uuid::new_v4().simple());
    let accounts: Accounts = gw.accounts().await;
    let old_hash = Passwords::new(&PasswordSettings::default())
        .unwrap()
        .hash(PASSWORD)
        .unwrap();
    let id = users::create(
        &accounts,
        &NewUser {
            email: Email::parse(&email).unwrap(),
            role: "user".to_owned(),
            password_hash: Some(old_hash.clone()),
            fields: ProfileFields::default(),
            terms_version: None,
        },
    )
    .await
    .unwrap();
    assert!(old_hash.contains("m=19456,t=2,p=1"), "{old_hash}");
    gw.log_in(&email, PASSWORD).await.unwrap();
    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users WHERE id = $1")
        .bind(id)
        .fetch_one(&accounts.pool)
        .await
        .unwrap();
    assert!(
        stored.starts_with("$argon2id$v=19$m=19456,t=3,p=1$"),
        "{stored}"
    );
    // And the new hash still lets the user in.
    gw.log_in(&email, PASSWORD).await.unwrap();
}

#[tokio::test]
async fn erasure_ends_logins_empties_the_export_and_queues_the_clickhouse_deletion() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw.sign_up("user", 30).await;
    let practitioner = gw.sign_up("practitioner", 50).await;
    gw.relate(&practitioner, &ada, "practitioner_patient").await;
    let (session, _) = gw.session_with_points(&ada, &[60.0, 61.0]).await;

    // A wrong password erases nothing.
    let erase = |password: &str| {
        gw.as_person(reqwest::Method::DELETE, &ada, "/v1/me")
            .json(&json!({ "password": password }))
    };
    send_expecting(erase("not my password"), 403).await;
    let erased: Value = send_expecting(erase(PASSWORD), 200)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        (
            erased["sessions"].as_u64(),
            erased["relationships"].as_u64()
        ),
        (Some(1), Some(1))
    );

    // Login fails, the old token is dead, the practitioner sees nothing.
    assert_eq!(gw.log_in(&ada.email, PASSWORD).await.unwrap_err().0, 401);
    assert_eq!(gw.read(&ada, "/v1/me").await.0, 401);
    assert_eq!(
        gw.read(&practitioner, &format!("/v1/sessions/{session}"))
            .await
            .0,
        404
    );

    // The erasure list has the user, with the ClickHouse deletion still pending for the jobs runner.
    let pool = gw.accounts().await.pool;
    let pending: Option<Option<chrono::DateTime<Utc>>> =
        sqlx::query_scalar("SELECT clickhouse_deleted_at FROM erased_users WHERE user_id = $1")
            .bind(ada.id)
            .fetch_optional(&pool)
            .await
            .unwrap();
    assert_eq!(pending, Some(None));
    // No key, no PII: the row is a tombstone.
    let (keys, pii): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM user_data_keys WHERE user_id = $1),
                (SELECT email_ct IS NOT NULL OR email_blind_index IS NOT NULL OR birth_date_ct IS NOT NULL FROM users WHERE id = $1)",
    )
    .bind(ada.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((keys, pii), (0, false));

    // The operator's export of the user is empty: a header saying erased, and zero counts.
    let export = gw
        .stores
        .biofeed(&[
            "admin",
            "user",
            "export",
            &ada.id.to_string(),
            "--master-key",
            &gw.keys.master_key().to_base64(),
            "--blind-index-key",
            &gw.keys.blind_index_key.to_base64(),
        ])
        .await;
    assert_eq!(export.code, 0, "{export:?}");
    let lines = json_lines(&export.stdout);
    let types: Vec<&str> = lines
        .iter()
        .map(|l| l["type"].as_str().unwrap())
        .filter(|t| *t != "access")
        .collect();
    assert_eq!(types, ["export", "end"], "{}", export.stdout);
    assert_eq!(lines[0]["erased"], true);
    let end = lines.last().unwrap();
    assert_eq!(
        (
            end["sessions"].as_u64(),
            end["points"].as_u64(),
            end["profile"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
}

#[tokio::test]
async fn people_register_and_revoke_only_their_own_devices() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw.sign_up("user", 30).await;
    let bob = gw.sign_up("user", 30).await;
    let (status, registered) = gw
        .send(&ada, "/v1/me/devices", json!({ "model": "Polar H10" }))
        .await;
    assert_eq!(status, 201, "{registered}");
    let device = registered["device_id"].as_str().unwrap().to_owned();
    let token = registered["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("bfd_"));
    assert_eq!(gw.open_with(&token).await.0, 201, "the token works");
    let (_, listed) = gw.read(&ada, "/v1/me/devices").await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert!(
        !listed.to_string().contains(&token),
        "tokens are never listed"
    );
    assert_eq!(gw.read(&bob, "/v1/me/devices").await.1, json!([]));

    // Bad input: a model too long or with control characters; ids that are not a device of yours.
    for model in ["x".repeat(201), "a\u{7}b".to_owned()] {
        let (status, problem) = gw
            .send(&ada, "/v1/me/devices", json!({ "model": model }))
            .await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["field"], "model", "{problem}");
    }
    let (status, problem) = gw
        .send(&ada, "/v1/me/devices", json!({ "brand": "x" }))
        .await;
    assert_eq!(status, 400, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field"),
        "{problem}"
    );
    for path in [
        format!("/v1/me/devices/{device}/revoke"),
        "/v1/me/devices/not-a-uuid/revoke".to_owned(),
    ] {
        let (status, problem) = gw.send(&bob, &path, json!({})).await;
        assert_eq!(status, 404, "{path}: {problem}");
    }
    assert_eq!(
        gw.open_with(&token).await.0,
        201,
        "someone else cannot revoke it"
    );
    let (status, _) = gw
        .send(&ada, &format!("/v1/me/devices/{device}/revoke"), json!({}))
        .await;
    assert_eq!(status, 204);
    assert_eq!(gw.open_with(&token).await.0, 401, "revoked at once");
}

/// A sign-up through the API: status, content type and body.
async fn sign_up_as(gw: &TestGateway, email: &str, password: &str) -> (u16, String, Value) {
    let response = gw
        .http
        .post(format!("{}/v1/users", gw.url))
        .json(&json!({
            "email": email, "password": password, "accept_terms": "2026-11-01",
            "profile": { "birth_date": born_years_ago(30), "country": "DE" },
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (
        status,
        content_type,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// A request as a person with a JSON body: status and body.
async fn send_as(
    gw: &TestGateway,
    method: reqwest::Method,
    person: &Person,
    path: &str,
    body: Value,
) -> (u16, Value, Option<String>) {
    let response = gw
        .as_person(method, person, path)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    (
        status,
        response.json().await.unwrap_or(Value::Null),
        retry_after,
    )
}

#[tokio::test]
async fn one_live_account_per_email_a_taken_email_creates_nothing_and_erasure_frees_it() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw.sign_up("user", 30).await;
    let accounts = gw.accounts().await;
    let live_with_email = |email: String| {
        let accounts = accounts.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM users WHERE email_blind_index = $1 AND deleted_at IS NULL",
            )
            .bind(accounts.keys.email_blind_index(&email))
            .fetch_one(&accounts.pool)
            .await
            .unwrap()
        }
    };

    // The same email again, in other letters' case and with another password: 409, nothing made.
    let (status, content_type, problem) =
        sign_up_as(&gw, &ada.email.to_uppercase(), "another long passphrase").await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(content_type, "application/problem+json");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("email already registered"),
        "{problem}"
    );
    let local_part = ada.email.split('@').next().unwrap();
    assert!(
        !problem.to_string().to_lowercase().contains(local_part),
        "the answer repeats the address: {problem}"
    );
    assert_eq!(live_with_email(ada.email.clone()).await, 1);
    // Logins still reach ada's account alone, with ada's password alone.
    assert_eq!(
        gw.log_in(&ada.email, "another long passphrase")
            .await
            .unwrap_err()
            .0,
        401
    );
    gw.log_in(&ada.email, PASSWORD).await.unwrap();

    // The database refuses a second live row too, whoever writes it.
    let copied = sqlx::query(
        "INSERT INTO users (role_id, email_blind_index, email_ct)
         SELECT role_id, email_blind_index, email_ct FROM users WHERE id = $1",
    )
    .bind(ada.id)
    .execute(&accounts.pool)
    .await
    .unwrap_err();
    assert_eq!(
        copied.as_database_error().and_then(|e| e.constraint()),
        Some("users_one_live_account_per_email"),
        "{copied}"
    );

    // Nor can another person move onto the email with a profile change.
    let bob = gw.sign_up("user", 30).await;
    let (status, problem, _) = send_as(
        &gw,
        reqwest::Method::PATCH,
        &bob,
        "/v1/me",
        json!({ "email": ada.email }),
    )
    .await;
    assert_eq!(status, 409, "{problem}");
    assert_eq!(gw.read(&bob, "/v1/me").await.1["email"], bob.email);
    assert_eq!(live_with_email(ada.email.clone()).await, 1);

    // An erased account holds no email: it may be signed up again.
    let (status, erased, _) = send_as(
        &gw,
        reqwest::Method::DELETE,
        &ada,
        "/v1/me",
        json!({ "password": PASSWORD }),
    )
    .await;
    assert_eq!(status, 200, "{erased}");
    let (status, _, created) = sign_up_as(&gw, &ada.email, PASSWORD).await;
    assert_eq!(status, 201, "{created}");
    assert_ne!(created["user_id"], ada.id.to_string());
}

#[tokio::test]
async fn password_checks_of_patch_and_delete_me_count_against_the_login_throttle() {
    let gw = TestGateway::spawn(&[
        "--login-max-failures",
        "3",
        "--login-max-failures-per-address",
        "5",
    ])
    .await;
    let ada = gw.sign_up("user", 30).await;
    let bob = gw.sign_up("user", 30).await;
    let change = |current: &str| json!({ "password": "a brand new passphrase", "current_password": current });

    // Three wrong passwords on ada's account, through the profile and the erasure.
    for _ in 0..2 {
        let (status, problem, _) = send_as(
            &gw,
            reqwest::Method::PATCH,
            &ada,
            "/v1/me",
            change("not my password"),
        )
        .await;
        assert_eq!(status, 403, "{problem}");
    }
    let (status, problem, _) = send_as(
        &gw,
        reqwest::Method::DELETE,
        &ada,
        "/v1/me",
        json!({ "password": "not my password" }),
    )
    .await;
    assert_eq!(status, 403, "{problem}");

    // Now the account waits, even with the right password: no change, no erasure, no login.
    let (status, problem, retry_after) = send_as(
        &gw,
        reqwest::Method::PATCH,
        &ada,
        "/v1/me",
        change(PASSWORD),
    )
    .await;
    assert_eq!(status, 429, "{problem}");
    let retry: u64 = retry_after.unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 900, "{retry}");
    let (status, problem, retry_after) = send_as(
        &gw,
        reqwest::Method::DELETE,
        &ada,
        "/v1/me",
        json!({ "password": PASSWORD }),
    )
    .await;
    assert_eq!(status, 429, "{problem}");
    assert!(retry_after.is_some());
    assert_eq!(gw.log_in(&ada.email, PASSWORD).await.unwrap_err().0, 429);
    assert_eq!(gw.read(&ada, "/v1/me").await.0, 200, "ada is not erased");

    // The address counts too: two wrong guesses on bob's account make five from this address,
    // and bob (two failures, under his own limit of three) now waits as well.
    for _ in 0..2 {
        let (status, problem, _) = send_as(
            &gw,
            reqwest::Method::PATCH,
            &bob,
            "/v1/me",
            change("not my password"),
        )
        .await;
        assert_eq!(status, 403, "{problem}");
    }
    let (status, problem, _) = send_as(
        &gw,
        reqwest::Method::PATCH,
        &bob,
        "/v1/me",
        change(PASSWORD),
    )
    .await;
    assert_eq!(status, 429, "{problem}");
}

#[tokio::test]
async fn a_password_change_logs_out_the_other_login_tokens_and_keeps_its_own() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw.sign_up("user", 30).await;
    let elsewhere = Person {
        token: gw.log_in(&ada.email, PASSWORD).await.unwrap(),
        ..ada.clone()
    };
    assert_eq!(gw.read(&elsewhere, "/v1/me").await.0, 200);
    let new_password = "a brand new passphrase";
    let (status, body, _) = send_as(
        &gw,
        reqwest::Method::PATCH,
        &ada,
        "/v1/me",
        json!({ "password": new_password, "current_password": PASSWORD }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        gw.read(&elsewhere, "/v1/me").await.0,
        401,
        "the other token is revoked"
    );
    assert_eq!(
        gw.read(&ada, "/v1/me").await.0,
        200,
        "the changing token stays"
    );
    assert_eq!(gw.log_in(&ada.email, PASSWORD).await.unwrap_err().0, 401);
    gw.log_in(&ada.email, new_password).await.unwrap();
}

#[tokio::test]
async fn the_operators_export_is_in_the_subjects_access_log() {
    let gw = TestGateway::spawn(&[]).await;
    let ada = gw.sign_up("user", 30).await;
    let exports_in_log = |log: &Value| {
        log.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["action"] == "data.export" && r["actor_id"].is_null())
            .count()
    };
    let (status, log) = gw
        .read(&ada, &format!("/v1/users/{}/access-log", ada.id))
        .await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(exports_in_log(&log), 0, "{log}");

    let export = gw
        .stores
        .biofeed(&[
            "admin",
            "user",
            "export",
            &ada.id.to_string(),
            "--master-key",
            &gw.keys.master_key().to_base64(),
            "--blind-index-key",
            &gw.keys.blind_index_key.to_base64(),
        ])
        .await;
    assert_eq!(export.code, 0, "{export:?}");
    assert!(
        export.stdout.contains(&ada.email),
        "the profile was exported"
    );

    let (status, log) = gw
        .read(&ada, &format!("/v1/users/{}/access-log", ada.id))
        .await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(exports_in_log(&log), 1, "{log}");
    let record = log
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "data.export")
        .unwrap();
    assert_eq!(
        (record["resource"].as_str(), record["allowed"].as_bool()),
        (Some("export"), Some(true)),
        "{record}"
    );
}
