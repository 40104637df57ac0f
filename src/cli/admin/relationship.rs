//! `biofeed admin relationship …`.

use biofeed_accounts::relationships;
use biofeed_backends::postgres::PostgresSettings;
use clap::Subcommand;
use uuid::Uuid;

use crate::cli::{print_rows, utc_or_dash, AFTER_HELP};

/// `biofeed admin relationship …`.
#[derive(Debug, Subcommand)]
pub enum RelationshipCommand {
    /// Record a relationship; prints its id. By default it is live at once (the operator
    /// records consent given outside biofeed); with --pending it waits for acceptance in the API.
    #[command(after_help = AFTER_HELP)]
    Add {
        /// The lead: the guardian or practitioner.
        #[arg(long)]
        lead: Uuid,
        /// The follower: the child or patient.
        #[arg(long)]
        follower: Uuid,
        /// parent_child, guardian_ward, practitioner_patient or coach_athlete.
        #[arg(long = "type", value_name = "TYPE")]
        kind: String,
        /// Leave it pending until the other party accepts.
        #[arg(long)]
        pending: bool,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// Revoke a relationship: it stops granting access on the next request.
    #[command(after_help = AFTER_HELP)]
    Revoke {
        /// The relationship's id.
        id: Uuid,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
    /// List relationships (ids, types, dates; no PII).
    #[command(after_help = AFTER_HELP)]
    List {
        /// Only this user's relationships.
        #[arg(long)]
        user_id: Option<Uuid>,
        /// Where Postgres is.
        #[command(flatten, next_help_heading = "Postgres")]
        postgres: PostgresSettings,
    },
}

pub(crate) async fn run(command: RelationshipCommand) -> anyhow::Result<()> {
    match command {
        RelationshipCommand::Add {
            lead,
            follower,
            kind,
            pending,
            postgres,
        } => {
            let pool = postgres.connect().await?;
            let id = relationships::create(&pool, lead, follower, &kind, None, !pending).await?;
            println!("{id}");
        }
        RelationshipCommand::Revoke { id, postgres } => {
            relationships::revoke(&postgres.connect().await?, id, None).await?;
            eprintln!("relationship {id} revoked");
        }
        RelationshipCommand::List { user_id, postgres } => {
            let rows = relationships::list(&postgres.connect().await?, user_id).await?;
            print_rows(
                &rows,
                None,
                &format!(
                    "{:<36}  {:<20}  {:<36}  {:<36}  {:<9}  revoked",
                    "relationship", "type", "lead", "follower", "consented"
                ),
                |r| {
                    format!(
                        "{:<36}  {:<20}  {:<36}  {:<36}  {:<9}  {}",
                        r.id,
                        r.relationship_type,
                        r.lead_id,
                        r.follower_id,
                        if r.consented_at.is_some() {
                            "yes"
                        } else {
                            "pending"
                        },
                        utc_or_dash(r.revoked_at)
                    )
                },
            )?;
        }
    }
    Ok(())
}
