//! `biofeed admin …`: users, relationships, devices and keys.

mod relationship;
mod session;
mod user;

use biofeed_accounts::{devices, rotation, users, AccountKeys, Accounts};
use biofeed_backends::postgres::PostgresSettings;
use clap::{Args, Subcommand};
use uuid::Uuid;

pub use self::relationship::RelationshipCommand;
pub use self::session::SessionCommand;
pub use self::user::UserCommand;

use crate::cli::{print_rows, progress_bar, AFTER_HELP};

/// `biofeed admin …`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Users: create, list, export, erase.
    #[command(subcommand)]
    User(UserCommand),
    /// Relationships (guardian–child, practitioner–patient, …) and their consent.
    #[command(subcommand)]
    Relationship(RelationshipCommand),
    /// Devices and their tokens.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Sessions: export one in CSV, EDF+ or RR text, or a person's all (BIDS too).
    #[command(subcommand)]
    Session(SessionCommand),
    /// The PII keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// Postgres and the PII keys: what most admin commands need.
#[derive(Debug, Args)]
pub struct AccountStore {
    /// Where Postgres is.
    #[command(flatten, next_help_heading = "Postgres")]
    pub postgres: PostgresSettings,
    /// PII keys.
    #[command(flatten, next_help_heading = "Keys")]
    pub keys: AccountKeys,
}

impl AccountStore {
    async fn connect(self) -> anyhow::Result<Accounts> {
        Ok(Accounts {
            pool: self.postgres.connect().await?,
            keys: self.keys,
        })
    }
}

/// `biofeed admin keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Re-wrap every user's data key under the current master key (BIOFEED_MASTER_KEY, version
    /// BIOFEED_MASTER_KEY_VERSION), reading older ones with BIOFEED_MASTER_KEYS_PREVIOUS.
    ///
    /// Without downtime: first give every service the new key as current and the old one as
    /// previous, then run this, then drop the old key from the previous list. Safe to interrupt
    /// and to run again.
    #[command(after_help = AFTER_HELP)]
    Rotate {
        /// Postgres and keys.
        #[command(flatten)]
        store: AccountStore,
    },
}

/// `biofeed admin device …`.
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Register a device for a user and print its bearer token. The token is shown this once:
    /// only its hash is stored.
    #[command(after_help = AFTER_HELP)]
    Create {
        /// The user, by email.
        #[arg(long, conflicts_with = "user_id", required_unless_present = "user_id")]
        user: Option<String>,
        /// The user, by id.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// The device's model, e.g. "Polar H10".
        #[arg(long, default_value = "")]
        model: String,
        /// Postgres and keys (the blind-index key finds the user by email).
        #[command(flatten)]
        store: AccountStore,
    },
    /// Revoke a device: its token stops working (within the gateway's auth cache TTL).
    #[command(after_help = AFTER_HELP)]
    Revoke {
        /// The device's id.
        device_id: Uuid,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// List devices: ids, users, models and dates, no tokens.
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only this user's devices.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
}

pub(crate) async fn run(command: AdminCommand) -> anyhow::Result<()> {
    match command {
        AdminCommand::User(command) => user::run(command).await?,
        AdminCommand::Relationship(command) => relationship::run(command).await?,
        AdminCommand::Session(command) => session::run(command).await?,
        AdminCommand::Keys(KeysCommand::Rotate { store }) => {
            let accounts = store.connect().await?;
            let bar = progress_bar("rotate", "data keys");
            let progress = bar.clone();
            let rotated = rotation::rotate_master_key(&accounts, move |done, total| {
                progress.set_length(total);
                progress.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            eprintln!(
                "re-wrapped {} data keys under master key version {}; {} were already under it",
                rotated.rewrapped, accounts.keys.master_key_version, rotated.already_current
            );
        }
        AdminCommand::Device(DeviceCommand::Create {
            user,
            user_id,
            model,
            store,
        }) => {
            let accounts = store.connect().await?;
            let user_id = match (user_id, user) {
                (Some(id), _) => id,
                (None, Some(email)) => {
                    users::one_by_email(&accounts, &users::Email::parse(&email)?).await?
                }
                (None, None) => anyhow::bail!("name the user with --user or --user-id"),
            };
            let device = devices::create_device(&accounts.pool, user_id, &model).await?;
            eprintln!(
                "device {} created for user {user_id}; its token is shown only now:",
                device.id
            );
            println!("{}", device.token);
        }
        AdminCommand::Device(DeviceCommand::Revoke {
            device_id,
            postgres,
        }) => {
            devices::revoke_device(&postgres.connect().await?, device_id, None).await?;
            eprintln!("device {device_id} revoked");
        }
        AdminCommand::Device(DeviceCommand::List { user_id, postgres }) => {
            let rows = devices::list_devices(&postgres.connect().await?, user_id).await?;
            print_rows(
                &rows,
                None,
                &format!(
                    "{:<36}  {:<36}  {:<20}  {:<20}  {:<20}  model",
                    "device", "user", "created", "last seen", "revoked"
                ),
                |d| {
                    format!(
                        "{:<36}  {:<36}  {:<20}  {:<20}  {:<20}  {}",
                        d.id,
                        d.user_id,
                        d.created_at,
                        d.last_seen_at.as_deref().unwrap_or("-"),
                        d.revoked_at.as_deref().unwrap_or("-"),
                        d.model
                    )
                },
            )?;
        }
    }
    Ok(())
}
