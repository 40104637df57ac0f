//! The access policy: one function, [`Policy::authorize`], decides whether an actor may do an
//! action on a subject's data. Every path that reads or changes someone's data asks it; no
//! handler decides by itself. Every decision about someone else's data is written to the audit
//! log, allowed or not.
//!
//! The rules:
//! - everyone may read and manage their own data and profile (with the role's permissions);
//! - a guardian reads the data of a child they lead in a consented, unrevoked `parent_child` or
//!   `guardian_ward` relationship; a practitioner that of a patient in a consented, unrevoked
//!   `practitioner_patient` or `coach_athlete` relationship. Nobody else's, and never the other
//!   way round (a child does not read their guardian's data);
//! - admins read anyone's access log (`audit.read`) but no one's health data; analysts read no
//!   individual's data through the API;
//! - a user younger than their country's consent age may open sessions only once a guardian
//!   relationship with the guardian's consent exists;
//! - a relationship is accepted by the party who did not invite; where the follower of a
//!   practitioner relationship is a minor, by the follower's guardian instead.
//!
//! Where the actor may not know the thing exists, a refusal is `NotFound`, not `Forbidden`.

use std::collections::HashMap;

use chrono::Utc;
use sqlx::PgPool;
use uuid::Uuid;

use crate::audit::{self, Entry};
use crate::users::{age_on, ProfileFields};
use crate::{Accounts, AccountsError};

/// Relationship kinds whose lead is a guardian.
pub const GUARDIAN_KINDS: [&str; 2] = ["parent_child", "guardian_ward"];
/// Relationship kinds whose lead is a practitioner (or coach).
pub const CARE_KINDS: [&str; 2] = ["practitioner_patient", "coach_athlete"];

/// The consent age settings.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsentSettings {
    /// Age below which a user needs a guardian's consent to record sessions, where their
    /// country has no age of its own in BIOFEED_CONSENT_AGE_BY_COUNTRY.
    #[arg(long = "consent-age", id = "consent_age", value_name = "YEARS", env = "BIOFEED_CONSENT_AGE",
          default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=25))]
    pub default_age: u32,

    /// Consent ages by country (ISO 3166-1 alpha-2), `CC=YEARS,…`; the default lists the ages
    /// EU member states chose under GDPR article 8, the UK's and the US's (COPPA).
    #[arg(long = "consent-age-by-country", id = "consent_age_by_country", value_name = "CC=YEARS,…",
          env = "BIOFEED_CONSENT_AGE_BY_COUNTRY",
          default_value = "AT=14,BE=13,BG=14,CY=14,CZ=15,DK=13,EE=13,ES=14,FI=13,FR=15,GR=15,IT=14,LT=14,LV=13,MT=13,PT=13,SE=13,SI=15,GB=13,US=13",
          value_parser = parse_country_ages)]
    pub by_country: CountryAges,
}

impl Default for ConsentSettings {
    fn default() -> Self {
        Self {
            default_age: 16,
            by_country: CountryAges::default(),
        }
    }
}

/// Consent ages by country code.
#[derive(Debug, Clone, Default)]
pub struct CountryAges(HashMap<String, u32>);

fn parse_country_ages(value: &str) -> Result<CountryAges, String> {
    let mut ages = HashMap::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (country, age) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not CC=YEARS"))?;
        let country = country.trim();
        if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "'{country}' is not an ISO 3166-1 alpha-2 code such as DE"
            ));
        }
        let age: u32 = age
            .trim()
            .parse()
            .ok()
            .filter(|a| (1..=25).contains(a))
            .ok_or_else(|| {
                format!("the age of {country} must be a number of years from 1 to 25")
            })?;
        ages.insert(country.to_owned(), age);
    }
    Ok(CountryAges(ages))
}

impl ConsentSettings {
    /// The consent age in `country` (or the default).
    pub fn age_for(&self, country: Option<&str>) -> u32 {
        country
            .and_then(|c| self.by_country.0.get(c))
            .copied()
            .unwrap_or(self.default_age)
    }

    /// Whether a person with these profile fields is below the consent age today. Without a
    /// birth date (accounts an admin created) the person is taken to be of age.
    pub fn is_minor(&self, fields: &ProfileFields) -> bool {
        fields.birth_date.is_some_and(|born| {
            age_on(born, Utc::now().date_naive()) < self.age_for(fields.country.as_deref())
        })
    }
}

/// The query that reads live users as actors: `$from` names `users u` (joined to whatever
/// finds them), `$filter` picks them; the role and its permissions are joined here, once.
macro_rules! actor_query {
    ($from:literal, $filter:literal) => {
        concat!(
            "SELECT u.id AS user_id, r.name AS role,
                    coalesce(array_agg(p.name) FILTER (WHERE p.name IS NOT NULL), '{}') AS permissions ",
            $from,
            " JOIN roles r ON r.id = u.role_id
             LEFT JOIN role_permissions rp ON rp.role_id = r.id
             LEFT JOIN permissions p ON p.id = rp.permission_id
             WHERE u.deleted_at IS NULL AND ",
            $filter,
            " GROUP BY u.id, r.name"
        )
    };
}
pub(crate) use actor_query;

/// Who is acting: a person, with their role's permissions.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Actor {
    /// Their user id.
    pub user_id: Uuid,
    /// Their role's name.
    pub role: String,
    /// Their role's permissions.
    pub permissions: Vec<String>,
}

impl Actor {
    /// Loads a live user as an actor.
    pub async fn load(pool: &PgPool, user: Uuid) -> Result<Self, AccountsError> {
        sqlx::query_as(actor_query!("FROM users u", "u.id = $1"))
            .bind(user)
            .fetch_optional(pool)
            .await?
            .ok_or(AccountsError::NoSuchUser)
    }

    /// Whether the actor's role has `permission`.
    pub fn can(&self, permission: &str) -> bool {
        self.permissions.iter().any(|p| p == permission)
    }
}

/// What an actor wants to do to a subject's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read health data: sessions, points, metrics. `resource` names what, for the audit log.
    ReadData {
        /// What is read.
        resource: &'static str,
    },
    /// Read who accessed the subject's data.
    ReadAccessLog,
    /// Read, change, export or erase the subject's own profile.
    ManageProfile {
        /// What is done.
        resource: &'static str,
    },
    /// Open a recording session (devices act for their user).
    OpenSession,
    /// Propose a relationship in which the subject is the other party.
    InviteRelationship,
    /// Accept (consent to) a relationship with `group` id, whose follower is the subject.
    AcceptRelationship {
        /// The relationship.
        group: Uuid,
    },
    /// Revoke a relationship with `group` id, whose follower is the subject.
    RevokeRelationship {
        /// The relationship.
        group: Uuid,
    },
}

impl Action {
    fn names(&self) -> (&'static str, &'static str) {
        match self {
            Action::ReadData { resource } => ("data.read", resource),
            Action::ReadAccessLog => ("audit.read", "audit_log"),
            Action::ManageProfile { resource } => ("profile.manage", resource),
            Action::OpenSession => ("sessions.open", "sessions"),
            Action::InviteRelationship => ("relationships.invite", "groups"),
            Action::AcceptRelationship { .. } => ("relationships.accept", "groups"),
            Action::RevokeRelationship { .. } => ("relationships.revoke", "groups"),
        }
    }
}

/// Why the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The actor may not know the thing exists: answer 404 naming `what`.
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The actor knows it exists but may not do this; the reason is safe to show.
    #[error("{0}")]
    Forbidden(String),
}

/// The policy, with its settings.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Consent ages.
    pub consent: ConsentSettings,
}

/// A relationship as the policy sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct GroupFacts {
    lead_id: Uuid,
    follower_id: Uuid,
    relationship_type: String,
    invited_by: Option<Uuid>,
    consented_at: Option<chrono::DateTime<Utc>>,
    revoked_at: Option<chrono::DateTime<Utc>>,
}

impl Policy {
    /// Decides whether `actor` may do `action` on `subject`'s data. Decisions about someone
    /// else's data are written to the audit log, allowed or not; an `Err(AccountsError)` means
    /// the decision could not be made (the caller answers 5xx, never "allowed").
    pub async fn authorize(
        &self,
        accounts: &Accounts,
        actor: &Actor,
        action: Action,
        subject: Uuid,
    ) -> Result<Result<(), Denied>, AccountsError> {
        let decision = self.decide(accounts, actor, action, subject).await?;
        if actor.user_id != subject {
            let (action_name, resource) = action.names();
            let mut detail = serde_json::json!({ "actor_role": actor.role });
            if let Action::AcceptRelationship { group } | Action::RevokeRelationship { group } =
                action
            {
                detail["group"] = serde_json::json!(group);
            }
            audit::record(
                &accounts.pool,
                &Entry {
                    actor: Some(actor.user_id),
                    subject,
                    action: action_name,
                    resource,
                    allowed: decision.is_ok(),
                    detail,
                },
            )
            .await?;
        }
        if let Err(denied) = &decision {
            tracing::info!(actor = %actor.user_id, subject = %subject, action = ?action,
                           denied = %denied, "access refused");
        }
        Ok(decision)
    }

    /// The same decision as `authorize`, not audited again: for a read that `authorize` allowed
    /// (and audited) and that goes on — a live feed re-asks every second, so that a revoked
    /// relationship or a changed role ends it at once. `Ok(false)` when it is no longer allowed.
    pub async fn still_allows(
        &self,
        accounts: &Accounts,
        actor: &Actor,
        action: Action,
        subject: Uuid,
    ) -> Result<bool, AccountsError> {
        Ok(self.decide(accounts, actor, action, subject).await?.is_ok())
    }

    /// The decision table behind `authorize`: one arm per action; the relationship arms, which
    /// first load the relationship, are worked out in `may_accept` and `may_revoke`.
    async fn decide(
        &self,
        accounts: &Accounts,
        actor: &Actor,
        action: Action,
        subject: Uuid,
    ) -> Result<Result<(), Denied>, AccountsError> {
        let own = actor.user_id == subject;
        Ok(match action {
            Action::ReadData { resource } => {
                if (own && actor.can("data.read_own"))
                    || (actor.can("data.read_followers")
                        && leads(&accounts.pool, actor, subject).await?)
                {
                    Ok(())
                } else {
                    Err(Denied::NotFound(resource))
                }
            }
            Action::ReadAccessLog => {
                if (own && actor.can("profile.manage_own")) || actor.can("audit.read") {
                    Ok(())
                } else {
                    Err(Denied::NotFound("user"))
                }
            }
            Action::ManageProfile { resource } => {
                if own && actor.can("profile.manage_own") {
                    Ok(())
                } else {
                    Err(Denied::NotFound(resource))
                }
            }
            Action::OpenSession => {
                if !(own && actor.can("sessions.manage_own")) {
                    Err(Denied::Forbidden(format!(
                        "the role {} does not record sessions",
                        actor.role
                    )))
                } else if self.is_minor(accounts, subject).await?
                    && !has_guardian(&accounts.pool, subject).await?
                {
                    Err(Denied::Forbidden(
                        "the user is below the consent age and no guardian has consented yet: \
                         a guardian must accept a parent_child or guardian_ward relationship first"
                            .to_owned(),
                    ))
                } else {
                    Ok(())
                }
            }
            Action::InviteRelationship => {
                if own || !actor.can("relationships.manage") {
                    Err(Denied::Forbidden(
                        "you may not invite this relationship".to_owned(),
                    ))
                } else {
                    Ok(())
                }
            }
            Action::AcceptRelationship { group } => {
                self.may_accept(accounts, actor, group, subject).await?
            }
            Action::RevokeRelationship { group } => {
                may_revoke(&accounts.pool, actor, group, subject).await?
            }
        })
    }

    /// Decides an `AcceptRelationship`: only a party or the follower's guardian learns the
    /// relationship exists, and a minor's care relationship is accepted by their guardian,
    /// any other by the party who did not invite.
    async fn may_accept(
        &self,
        accounts: &Accounts,
        actor: &Actor,
        group: Uuid,
        subject: Uuid,
    ) -> Result<Result<(), Denied>, AccountsError> {
        let Some(facts) = group_facts(&accounts.pool, group).await? else {
            return Ok(Err(Denied::NotFound("relationship")));
        };
        let party = actor.user_id == facts.lead_id || actor.user_id == facts.follower_id;
        let guardian_of_follower =
            has_guardian_actor(&accounts.pool, actor.user_id, facts.follower_id).await?;
        Ok(
            if facts.follower_id != subject || !(party || guardian_of_follower) {
                Err(Denied::NotFound("relationship"))
            } else if facts.revoked_at.is_some() {
                Err(Denied::Forbidden("the relationship was revoked".to_owned()))
            } else if facts.consented_at.is_some() {
                Err(Denied::Forbidden(
                    "the relationship is already accepted".to_owned(),
                ))
            } else if CARE_KINDS.contains(&facts.relationship_type.as_str())
                && self.is_minor(accounts, facts.follower_id).await?
            {
                if guardian_of_follower {
                    Ok(())
                } else {
                    Err(Denied::Forbidden(
                        "the follower is below the consent age: their guardian accepts".to_owned(),
                    ))
                }
            } else if party && facts.invited_by != Some(actor.user_id) {
                Ok(())
            } else {
                Err(Denied::Forbidden(
                    "the relationship is accepted by the party who did not invite".to_owned(),
                ))
            },
        )
    }

    /// Whether `user` is below their consent age.
    pub async fn is_minor(&self, accounts: &Accounts, user: Uuid) -> Result<bool, AccountsError> {
        let fields = crate::users::profile(accounts, user).await?.fields;
        Ok(self.consent.is_minor(&fields))
    }
}

/// Decides a `RevokeRelationship`: either party or the follower's guardian may end it; anyone
/// else is told it does not exist.
async fn may_revoke(
    pool: &PgPool,
    actor: &Actor,
    group: Uuid,
    subject: Uuid,
) -> Result<Result<(), Denied>, AccountsError> {
    let Some(facts) = group_facts(pool, group).await? else {
        return Ok(Err(Denied::NotFound("relationship")));
    };
    let party = actor.user_id == facts.lead_id || actor.user_id == facts.follower_id;
    Ok(
        if facts.follower_id == subject
            && (party || has_guardian_actor(pool, actor.user_id, facts.follower_id).await?)
        {
            Ok(())
        } else {
            Err(Denied::NotFound("relationship"))
        },
    )
}

/// Whether the actor leads the subject in a live, consented relationship of a kind the actor's
/// role leads.
async fn leads(pool: &PgPool, actor: &Actor, subject: Uuid) -> Result<bool, AccountsError> {
    let kinds: &[&str] = match actor.role.as_str() {
        "guardian" => &GUARDIAN_KINDS,
        "practitioner" => &CARE_KINDS,
        _ => return Ok(false),
    };
    live_relationship(pool, actor.user_id, subject, kinds).await
}

async fn live_relationship(
    pool: &PgPool,
    lead: Uuid,
    follower: Uuid,
    kinds: &[&str],
) -> Result<bool, AccountsError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM groups g JOIN users u ON u.id = g.lead_id AND u.deleted_at IS NULL
            WHERE g.lead_id = $1 AND g.follower_id = $2 AND g.relationship_type = ANY($3)
              AND g.consented_at IS NOT NULL AND g.revoked_at IS NULL)",
    )
    .bind(lead)
    .bind(follower)
    .bind(kinds)
    .fetch_one(pool)
    .await?)
}

/// Whether `guardian` is a live, consented guardian of `follower`.
async fn has_guardian_actor(
    pool: &PgPool,
    guardian: Uuid,
    follower: Uuid,
) -> Result<bool, AccountsError> {
    live_relationship(pool, guardian, follower, &GUARDIAN_KINDS).await
}

/// Whether `user` has any live, consented guardian.
async fn has_guardian(pool: &PgPool, user: Uuid) -> Result<bool, AccountsError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (
            SELECT 1 FROM groups g JOIN users u ON u.id = g.lead_id AND u.deleted_at IS NULL
            WHERE g.follower_id = $1 AND g.relationship_type = ANY($2)
              AND g.consented_at IS NOT NULL AND g.revoked_at IS NULL)",
    )
    .bind(user)
    .bind(&GUARDIAN_KINDS[..])
    .fetch_one(pool)
    .await?)
}

async fn group_facts(pool: &PgPool, group: Uuid) -> Result<Option<GroupFacts>, AccountsError> {
    Ok(sqlx::query_as(
        "SELECT lead_id, follower_id, relationship_type, invited_by, consented_at, revoked_at
         FROM groups WHERE id = $1",
    )
    .bind(group)
    .fetch_optional(pool)
    .await?)
}

/// The follower of a relationship (the subject its accept and revoke decisions are about).
pub async fn follower_of(pool: &PgPool, group: Uuid) -> Result<Option<Uuid>, AccountsError> {
    Ok(group_facts(pool, group).await?.map(|g| g.follower_id))
}

#[cfg(test)]
mod tests {
    use chrono::{Datelike, NaiveDate};

    use super::*;

    fn born_years_ago(years: i32, country: &str) -> ProfileFields {
        let today = Utc::now().date_naive();
        let born = NaiveDate::from_ymd_opt(today.year() - years, 1, 1)
            .unwrap()
            .min(today);
        ProfileFields {
            birth_date: Some(born),
            country: Some(country.to_owned()),
            ..ProfileFields::default()
        }
    }

    #[test]
    fn consent_age_depends_on_the_country() {
        let settings = ConsentSettings {
            default_age: 16,
            by_country: parse_country_ages("US=13, FR=15").unwrap(),
        };
        assert!(settings.is_minor(&born_years_ago(14, "DE")));
        assert!(!settings.is_minor(&born_years_ago(14, "US")));
        assert!(settings.is_minor(&born_years_ago(14, "FR")));
        assert!(!settings.is_minor(&born_years_ago(30, "DE")));
        assert!(!settings.is_minor(&ProfileFields::default()));
        for bad in ["US", "usa=13", "US=0", "US=x"] {
            assert!(parse_country_ages(bad).is_err(), "{bad}");
        }
    }
}
