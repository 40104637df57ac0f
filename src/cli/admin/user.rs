//! `biofeed admin user …`.

use biofeed_accounts::{erase, users};
use clap::Subcommand;
use uuid::Uuid;

use crate::cli::{print_rows, utc_or_dash, AccountStore, Refused, AFTER_HELP};

/// `biofeed admin user …`.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; prints the new user's id. The email is stored only encrypted and as a
    /// keyed blind index; the password (read from standard input) only as an argon2id hash.
    ///
    /// One live account per email: an email that already has one is refused (exit 4) and
    /// nothing is created; erase the other account first, or use another email.
    #[command(after_help = AFTER_HELP)]
    Create {
        /// The user's email.
        #[arg(long)]
        email: String,
        /// The role: user, guardian, practitioner, admin or analyst.
        #[arg(long, default_value = "user")]
        role: String,
        /// Read a password from the first line of standard input, so the user can log in.
        #[arg(long)]
        password_stdin: bool,
        /// Date of birth (YYYY-MM-DD): decides whether a guardian must consent.
        #[arg(long, value_name = "YYYY-MM-DD")]
        birth_date: Option<chrono::NaiveDate>,
        /// Country, ISO 3166-1 alpha-2 (decides the consent age).
        #[arg(long, value_name = "CC")]
        country: Option<String>,
        /// Password hashing cost.
        #[command(flatten, next_help_heading = "Logins")]
        passwords: biofeed_accounts::passwords::PasswordSettings,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// List users: ids, roles and dates. No PII unless --show-pii, which decrypts each email
    /// and writes one audit record per user shown.
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only users of this role.
        #[arg(long)]
        role: Option<String>,
        /// Show each live user's email (audited).
        #[arg(long)]
        show_pii: bool,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// Erase a user (GDPR article 17): destroy their data key, delete their PII, sessions,
    /// devices and relationships, put them on the erasure list the consumers honour and queue
    /// the deletion of their points from ClickHouse. Cannot be undone.
    #[command(after_help = AFTER_HELP)]
    Erase {
        /// The user's id.
        user_id: Uuid,
        /// Confirm: without it nothing is erased (exit 2).
        #[arg(long)]
        yes: bool,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
    /// Write everything held about a user (GDPR article 15) to standard output as
    /// newline-delimited JSON (format `biofeed-export/1`, see `GET /v1/me/export`).
    ///
    /// Audited: the export is recorded in the user's access log (action `data.export`, actor
    /// none: an operator) before anything is decrypted.
    #[command(after_help = AFTER_HELP)]
    Export {
        /// The user's id.
        user_id: Uuid,
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
        /// Where ClickHouse is (the points).
        #[command(flatten, next_help_heading = "ClickHouse")]
        clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
    },
}

pub(crate) async fn run(command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Create {
            email,
            role,
            password_stdin,
            birth_date,
            country,
            passwords,
            store,
        } => {
            let profile = users::ProfileFields {
                birth_date,
                country,
                ..Default::default()
            };
            create(email, role, password_stdin, profile, &passwords, store).await
        }
        UserCommand::List {
            role,
            show_pii,
            json,
            store,
        } => list(role, show_pii, json, store).await,
        UserCommand::Erase {
            user_id,
            yes,
            store,
        } => erase_user(user_id, yes, store).await,
        UserCommand::Export {
            user_id,
            store,
            clickhouse,
        } => export(user_id, store, clickhouse).await,
    }
}

async fn create(
    email: String,
    role: String,
    password_stdin: bool,
    profile: users::ProfileFields,
    passwords: &biofeed_accounts::passwords::PasswordSettings,
    store: AccountStore,
) -> anyhow::Result<()> {
    let email = users::Email::parse(&email)?;
    let password = if password_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        // A password the rules refuse is refused before Postgres is reached.
        biofeed_accounts::passwords::check_new_password(&password)?;
        let hasher = biofeed_accounts::passwords::Passwords::new(passwords)?;
        Some((hasher, password))
    } else {
        None
    };
    let accounts = store.connect().await?;
    let user = users::NewUser {
        email,
        role,
        password_hash: None,
        fields: profile,
        terms_version: None,
    };
    let id = match password {
        Some((hasher, password)) => {
            users::create_with_password(&accounts, &hasher, user, password).await?
        }
        None => users::create(&accounts, &user).await?,
    };
    println!("{id}");
    Ok(())
}

async fn list(
    role: Option<String>,
    show_pii: bool,
    json: bool,
    store: AccountStore,
) -> anyhow::Result<()> {
    let accounts = store.connect().await?;
    let listing = users::list_users(&accounts, role.as_deref(), show_pii.then_some(None)).await?;
    if show_pii {
        eprintln!(
            "showing emails of {} users; each reveal is in the audit log",
            listing.len()
        );
    }
    print_rows(
        &listing,
        json.then_some(serde_json::to_string),
        &format!(
            "{:<36}  {:<12}  {:<20}  {:<20}  email",
            "user", "role", "created", "erased"
        ),
        |u| {
            format!(
                "{:<36}  {:<12}  {:<20}  {:<20}  {}",
                u.user_id,
                u.role,
                utc_or_dash(Some(u.created_at)),
                utc_or_dash(u.deleted_at),
                u.email.as_deref().unwrap_or("(hidden: --show-pii)")
            )
        },
    )
}

async fn erase_user(user_id: Uuid, yes: bool, store: AccountStore) -> anyhow::Result<()> {
    if !yes {
        return Err(Refused(format!(
            "erasing user {user_id} cannot be undone: run again with --yes"
        ))
        .into());
    }
    let accounts = store.connect().await?;
    let erased = erase::erase_user(&accounts, user_id, None).await?;
    eprintln!(
        "erased user {user_id}: data key destroyed; {} sessions, {} devices and {} relationships deleted; \
         ClickHouse deletion queued for the jobs runner",
        erased.sessions, erased.devices, erased.relationships
    );
    println!("{}", serde_json::to_string(&erased)?);
    Ok(())
}

async fn export(
    user_id: Uuid,
    store: AccountStore,
    clickhouse: biofeed_backends::clickhouse::ClickHouseSettings,
) -> anyhow::Result<()> {
    use std::io::Write;
    let accounts = store.connect().await?;
    let clickhouse = clickhouse.connect().await?.client();
    users::audit_operator_export(&accounts, user_id).await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let export = tokio::spawn(async move {
        let recordings = biofeed_ingest_gateway::people::recordings::StoredRecordings::new(
            accounts.clone(),
            clickhouse,
        );
        biofeed_accounts::export::export_user(&accounts, &recordings, user_id, tx).await
    });
    let mut stdout = std::io::stdout().lock();
    while let Some(line) = rx.recv().await {
        stdout.write_all(&line)?;
    }
    stdout.flush()?;
    let counts = export.await??;
    eprintln!(
        "exported user {user_id}: {} sessions, {} points, {} relationships, {} access records",
        counts.sessions, counts.points, counts.relationships, counts.access
    );
    Ok(())
}
