//! Privacy end to end, with the real binary: seeded PII appears nowhere but in its ciphertexts
//! (not in a `pg_dump`, the Kafka topics, ClickHouse or any service's log); tampered ciphertext is
//! an error; and the operator's tools: key rotation, audited PII reveal, relationships, erasure.

use std::process::Stdio;
use std::time::Duration;

use biofeed_accounts::crypto::{Key32, PreviousKeys};
use biofeed_accounts::{users, AccountKeys, Accounts};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::consumers::{consumer_env, wait_for_points, ConsumerProcess};
use crate::gateway_app::{now_us, read_messages};
use crate::helpers::{free_port, send_expecting, send_json, Isolated, ServerProcess};
use crate::people::PASSWORD;

fn key_env(keys: &AccountKeys) -> Vec<(&'static str, String)> {
    vec![
        ("BIOFEED_MASTER_KEY", keys.master_key().to_base64()),
        ("BIOFEED_BLIND_INDEX_KEY", keys.blind_index_key.to_base64()),
        (
            "BIOFEED_MASTER_KEY_VERSION",
            keys.master_key_version.to_string(),
        ),
    ]
}

async fn migrated() -> Isolated {
    Isolated::migrated().await
}

/// Everything ClickHouse holds in this test's database, as text.
async fn clickhouse_text(stores: &Isolated) -> String {
    let ch = stores.settings.stores.clickhouse.connect().await.unwrap();
    let tables: Vec<String> = ch
        .client()
        .query("SELECT name FROM system.tables WHERE database = currentDatabase() AND engine NOT LIKE '%View'")
        .fetch_all()
        .await
        .unwrap();
    assert!(tables.contains(&"points".to_owned()), "{tables:?}");
    let settings = &stores.settings.stores.clickhouse;
    let mut text = String::new();
    for table in tables {
        let dump = crate::helpers::http_client()
            .post(settings.url.first().as_str())
            .header("X-ClickHouse-User", &settings.user)
            .header("X-ClickHouse-Key", settings.password())
            .query(&[("database", settings.database.as_str())])
            .body(format!("SELECT * FROM {table} FORMAT TSV"))
            .send()
            .await
            .unwrap();
        assert!(dump.status().is_success());
        text.push_str(&dump.text().await.unwrap());
    }
    text
}

#[tokio::test]
async fn seeded_pii_appears_nowhere_but_in_its_ciphertexts() {
    let stores = migrated().await;
    let keys = AccountKeys::generate();
    let port = free_port();
    let url = crate::helpers::gateway_url(port);
    let mut env = stores.env();
    env.extend(key_env(&keys));
    env.retain(|(k, _)| *k != "BIOFEED_LOG");
    env.push(("BIOFEED_LOG", "debug".to_owned()));

    // The gateway as a real process, logging at debug level into a file.
    let mut gateway = ServerProcess::new("gateway-log");
    let log_path = gateway.dir.join("gateway.log");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_biofeed"));
    command
        .arg("gateway")
        .env("BIOFEED_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::from(
            std::fs::File::create(gateway.dir.join("gateway.out")).unwrap(),
        ))
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()));
    for (k, v) in &env {
        command.env(k, v);
    }
    gateway.spawn(&mut command);
    let http = crate::helpers::http_client();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let consumer = ConsumerProcess::start(&consumer_env(
        &stores,
        &[("BIOFEED_LOG", "debug".to_owned())],
    ));

    // Unique PII, so that any copy of it anywhere is found.
    let tag = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let email = format!("pii.{tag}@example.org");
    let twin_email = format!("pii.twin.{tag}@example.org");
    let secrets = [
        email.clone(),
        format!("Zephyrine{tag}"),
        format!("Quillfeather{tag}"),
        format!("Lighthouse Lane {tag}"),
        format!("Harbour Street {tag}"),
        format!("gender{tag}"),
        format!("Cartographer{tag}"),
        format!("Observatory {tag}"),
        "1961-07-29".to_owned(),
        twin_email.clone(),
    ];
    let profile = json!({
        "first_name": secrets[1], "last_name": secrets[2], "location": secrets[3],
        "gender": secrets[5], "demographics": { "occupation": secrets[6] },
        "birth_date": secrets[8], "country": "DE",
    });
    let sign_up = |address: &str, password: &str| {
        http.post(format!("{url}/v1/users"))
            .json(&json!({ "email": address, "password": password, "accept_terms": "2026-11-01", "profile": profile }))
    };
    let log_in = |address: &str, password: &str| {
        http.post(format!("{url}/v1/auth/login"))
            .json(&json!({ "email": address, "password": password }))
    };
    let mut ids = Vec::new();
    // The same profile under two people (twins, say), each with their own email.
    for address in [&email, &twin_email] {
        let body: Value = send_expecting(sign_up(address, PASSWORD), 201)
            .await
            .json()
            .await
            .unwrap();
        ids.push(body["user_id"].as_str().unwrap().parse::<Uuid>().unwrap());
    }
    // Refused input that carries the PII: the refusals must not repeat it either (a taken
    // email, a short password).
    let taken = send_expecting(sign_up(&email, PASSWORD), 409).await;
    let taken_text = taken.text().await.unwrap();
    let refused = send_expecting(sign_up(&email, "short"), 422).await;
    let refused_text = format!("{taken_text}{}", refused.text().await.unwrap());
    send_expecting(log_in(&email, "a wrong password"), 401).await;
    let login = send_json(log_in(&email, PASSWORD)).await;
    let token = login["token"].as_str().unwrap().to_owned();
    let user: Uuid = login["user_id"].as_str().unwrap().parse().unwrap();
    let patch = http
        .patch(format!("{url}/v1/me"))
        .bearer_auth(&token)
        .json(&json!({ "profile": { "location": secrets[4] } }));
    send_expecting(patch, 200).await;
    let me = send_json(http.get(format!("{url}/v1/me")).bearer_auth(&token)).await;
    // Stored for real: the owner reads it all back.
    assert_eq!(
        (
            me["first_name"].as_str(),
            me["location"].as_str(),
            me["birth_date"].as_str()
        ),
        (
            Some(secrets[1].as_str()),
            Some(secrets[4].as_str()),
            Some("1961-07-29")
        )
    );

    // A device streams a session with a location, then completes it.
    let device = stores
        .biofeed(&[
            "admin",
            "device",
            "create",
            "--user-id",
            &user.to_string(),
            "--model",
            "strap",
            "--master-key",
            &keys.master_key().to_base64(),
            "--blind-index-key",
            &keys.blind_index_key.to_base64(),
        ])
        .await;
    assert_eq!(device.code, 0, "{device:?}");
    let device_token = device.stdout.trim().to_owned();
    let open = http
        .post(format!("{url}/v1/sessions"))
        .bearer_auth(&device_token)
        .json(&json!({ "exercise": "hrv_biofeedback", "data_types": ["heart_rate"], "location": secrets[7] }));
    let opened = send_json(open).await;
    let session = opened["session_id"].as_str().unwrap().to_owned();
    let end = now_us();
    let frame = json!({
        "frame_id": Uuid::new_v4(),
        "data_type": "heart_rate",
        "timestamps_us": (0..10).map(|i| end - (10 - i) * 1_000).collect::<Vec<i64>>(),
        "values": (0..10).map(|i| [60.0 + f64::from(i)]).collect::<Vec<_>>(),
    });
    let as_device = |path: &str| {
        http.post(format!("{url}/v1/sessions/{session}/{path}"))
            .bearer_auth(&device_token)
    };
    send_expecting(as_device("points").json(&frame), 202).await;
    let complete = as_device("complete").json(&json!({ "feedback": { "feeling": "calm" } }));
    send_expecting(complete, 200).await;
    wait_for_points(&stores, 10).await;
    let (_, consumer_log) = consumer.stop().await;
    gateway.kill();
    let gateway_log = std::fs::read_to_string(&log_path).unwrap();
    drop(gateway);
    assert!(
        gateway_log.contains("opened session"),
        "debug logs were written: {gateway_log}"
    );

    // Postgres: a whole dump of the database.
    let mut pg_dump = tokio::process::Command::new("pg_dump");
    pg_dump.arg(stores.settings.stores.postgres.url.as_str());
    if let Some(password) = &stores.settings.stores.postgres.password_file {
        pg_dump.env("PGPASSWORD", password.expose());
    }
    let dump = pg_dump.output().await.unwrap();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains(&user.to_string()), "the dump has the users");
    // Kafka: every message of both topics, keys, values and headers.
    let mut kafka = Vec::new();
    for topic in [
        &stores.settings.stores.topics.points,
        &stores.settings.stores.topics.dlq,
    ] {
        for m in read_messages(&stores.settings.stores.kafka, topic).await {
            kafka.extend_from_slice(m.key.as_bytes());
            kafka.extend_from_slice(&m.payload);
            for (k, v) in m.headers {
                kafka.extend_from_slice(k.as_bytes());
                kafka.extend_from_slice(v.as_bytes());
            }
        }
    }
    assert!(!kafka.is_empty());
    let kafka = String::from_utf8_lossy(&kafka).into_owned();
    let clickhouse = clickhouse_text(&stores).await;
    assert!(
        clickhouse.contains(&session),
        "ClickHouse has the session's points"
    );
    let places = [
        ("pg_dump", &dump),
        ("kafka", &kafka),
        ("clickhouse", &clickhouse),
        ("gateway log", &gateway_log),
        ("consumer log", &consumer_log),
        ("a refusal", &refused_text),
        (
            "admin device create",
            &format!("{}{}", device.stdout, device.stderr),
        ),
    ];
    for secret in &secrets {
        for (place, text) in &places {
            assert!(
                !text.contains(secret.as_str()),
                "{secret:?} found in {place}"
            );
        }
    }

    // The same plaintext under two users: different ciphertexts, so equal values are not
    // linkable; the blind index finds the one live account of an email.
    let accounts = Accounts {
        pool: stores.settings.stores.postgres.connect().await.unwrap(),
        keys: keys.clone(),
    };
    let ciphertexts: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT first_name_ct FROM users WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&accounts.pool)
            .await
            .unwrap();
    assert_eq!(ciphertexts.len(), 2);
    assert_ne!(ciphertexts[0], ciphertexts[1]);
    let found = users::find_by_email(&accounts, &users::Email::parse(&email).unwrap())
        .await
        .unwrap();
    assert_eq!(found, Some(ids[0]));

    // A tampered ciphertext is an error, never garbage.
    sqlx::query("UPDATE users SET first_name_ct = set_byte(first_name_ct, 20, get_byte(first_name_ct, 20) # 1) WHERE id = $1")
        .bind(user)
        .execute(&accounts.pool)
        .await
        .unwrap();
    let err = users::profile(&accounts, user)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("users.first_name_ct") && err.contains("altered"),
        "{err}"
    );
}

#[tokio::test]
async fn keys_rotate_under_a_new_master_key_without_losing_a_user() {
    let stores = migrated().await;
    let old = AccountKeys::generate();
    let accounts = Accounts {
        pool: stores.settings.stores.postgres.connect().await.unwrap(),
        keys: old.clone(),
    };
    let mut ids = Vec::new();
    for i in 0..3 {
        let email = users::Email::parse(&format!("rotate-{i}@example.org")).unwrap();
        ids.push(users::create_user(&accounts, &email, "user").await.unwrap());
    }
    let new_master = Key32::random();
    let previous = PreviousKeys::to_setting(&[(1, old.master_key())]);
    let mut env = vec![
        ("BIOFEED_MASTER_KEY", new_master.to_base64()),
        ("BIOFEED_MASTER_KEY_VERSION", "2".to_owned()),
        ("BIOFEED_MASTER_KEYS_PREVIOUS", previous),
        ("BIOFEED_BLIND_INDEX_KEY", old.blind_index_key.to_base64()),
    ];
    env.extend(stores.env());
    let run = crate::helpers::run_biofeed(&["admin", "keys", "rotate"], &env).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stderr
            .contains("re-wrapped 3 data keys under master key version 2"),
        "{run:?}"
    );
    // Again: nothing left to do.
    let again = crate::helpers::run_biofeed(&["admin", "keys", "rotate"], &env).await;
    assert!(again.stderr.contains("re-wrapped 0 data keys"), "{again:?}");

    let versions: Vec<i32> = sqlx::query_scalar("SELECT master_key_version FROM user_data_keys")
        .fetch_all(&accounts.pool)
        .await
        .unwrap();
    assert_eq!(versions, [2, 2, 2]);
    // The new key alone reads every user; the old key alone reads none.
    let new_only = Accounts {
        pool: accounts.pool.clone(),
        keys: AccountKeys::new(
            new_master,
            2,
            old.blind_index_key.clone(),
            PreviousKeys::default(),
        ),
    };
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            users::email_of(&new_only, *id).await.unwrap(),
            format!("rotate-{i}@example.org")
        );
        assert!(users::email_of(&accounts, *id).await.is_err());
    }
    // Without the previous key, rotation of a key under version 1 fails naming the version.
    let other = users::create_user(
        &accounts,
        &users::Email::parse("late@example.org").unwrap(),
        "user",
    )
    .await
    .unwrap();
    env.retain(|(k, _)| *k != "BIOFEED_MASTER_KEYS_PREVIOUS");
    let refused = crate::helpers::run_biofeed(&["admin", "keys", "rotate"], &env).await;
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("master key version 1"),
        "{refused:?}"
    );
    assert!(
        users::email_of(&accounts, other).await.is_ok(),
        "nothing half-done"
    );
}

#[tokio::test]
async fn the_admin_cli_lists_without_pii_unless_asked_and_audits_the_reveal() {
    let stores = migrated().await;
    let keys = AccountKeys::generate();
    let mut env = stores.env();
    env.extend(key_env(&keys));
    let run = |args: Vec<String>| {
        let env = env.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            crate::helpers::run_biofeed(&args, &env).await
        }
    };
    let args = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let guardian = run(args(
        "admin user create --email guard@example.org --role guardian",
    ))
    .await;
    assert_eq!(guardian.code, 0, "{guardian:?}");
    let child = run(args(
        "admin user create --email kid@example.org --birth-date 2016-05-01 --country DE",
    ))
    .await;
    assert_eq!(child.code, 0, "{child:?}");
    let (guardian, child) = (
        guardian.stdout.trim().to_owned(),
        child.stdout.trim().to_owned(),
    );
    // One live account per email, whatever its case: a taken email is refused until the
    // operator acts (exit 4), names no address, and creates nothing (the listings below hold
    // two users).
    let taken = run(args(
        "admin user create --email GUARD@Example.org --role guardian",
    ))
    .await;
    assert_eq!(taken.code, 4, "{taken:?}");
    assert!(
        taken.stderr.contains("already has an account")
            && !taken.stderr.to_lowercase().contains("guard@")
            && taken.stdout.is_empty(),
        "{taken:?}"
    );

    let list = run(args("admin user list")).await;
    assert_eq!(list.code, 0, "{list:?}");
    assert!(list.stdout.contains(&guardian) && list.stdout.contains(&child));
    assert!(!list.stdout.contains("@example.org"), "{list:?}");
    let pool = stores.settings.stores.postgres.connect().await.unwrap();
    let reveals = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM audit_log WHERE action = 'pii.reveal' AND actor_id IS NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    assert_eq!(reveals().await, 0);
    let shown = run(args("admin user list --show-pii --json")).await;
    assert_eq!(shown.code, 0, "{shown:?}");
    assert!(shown.stdout.contains("guard@example.org") && shown.stdout.contains("kid@example.org"));
    assert_eq!(reveals().await, 2);

    // Relationships: add (consent recorded by the operator), list, revoke.
    let wrong_way = run(args(&format!(
        "admin relationship add --lead {child} --follower {guardian} --type parent_child"
    )))
    .await;
    assert_eq!(wrong_way.code, 2, "{wrong_way:?}");
    assert!(
        wrong_way.stderr.contains("must have the role guardian"),
        "{wrong_way:?}"
    );
    let added = run(args(&format!(
        "admin relationship add --lead {guardian} --follower {child} --type parent_child"
    )))
    .await;
    assert_eq!(added.code, 0, "{added:?}");
    let link = added.stdout.trim().to_owned();
    let listed = run(args(&format!("admin relationship list --user-id {child}"))).await;
    assert!(
        listed.stdout.contains(&link) && listed.stdout.contains("yes"),
        "{listed:?}"
    );
    let revoked = run(args(&format!("admin relationship revoke {link}"))).await;
    assert_eq!(revoked.code, 0, "{revoked:?}");
    let twice = run(args(&format!("admin relationship revoke {link}"))).await;
    assert_eq!(twice.code, 1, "{twice:?}");
    assert!(twice.stderr.contains("already revoked"), "{twice:?}");

    // Erase asks for --yes and does nothing without it.
    let unconfirmed = run(args(&format!("admin user erase {child}"))).await;
    assert_eq!(unconfirmed.code, 2, "{unconfirmed:?}");
    assert!(unconfirmed.stderr.contains("--yes"));
    let erased = run(args(&format!("admin user erase {child} --yes"))).await;
    assert_eq!(erased.code, 0, "{erased:?}");
    let on_list: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM erased_users WHERE user_id = $1::uuid)")
            .bind(&child)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(on_list);
    let again = run(args(&format!("admin user erase {child} --yes"))).await;
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("no such user"), "{again:?}");
    // An erased account holds no email: it may be used again.
    let anew = run(args("admin user create --email kid@example.org")).await;
    assert_eq!(anew.code, 0, "{anew:?}");
    // Bad arguments name the problem and never echo a key.
    let bad = run(args("admin user create --email not-an-email")).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("email"), "{bad:?}");
}
