//! The access decision, as both halves ask it: the accounts policy decides
//! ([`Policy::authorize`], which also audits), and the decision is counted and mapped to its
//! answer (404 or 403). Nothing here decides anything itself.

use std::sync::Arc;

use biofeed_accounts::policy::{Action, Actor, Denied, Policy};
use biofeed_accounts::Accounts;
use uuid::Uuid;

use crate::metrics::{Metrics, OutcomeLabels};
use crate::problem::ApiError;

/// The policy with what it needs, shared by the device half (may this person record?) and the
/// people half (may this person read or change that?).
#[derive(Clone)]
pub(crate) struct Access {
    accounts: Accounts,
    policy: Policy,
    metrics: Arc<Metrics>,
}

impl Access {
    /// The policy over these accounts, counting its decisions in `metrics`.
    pub(crate) fn new(accounts: Accounts, policy: Policy, metrics: Arc<Metrics>) -> Self {
        Self {
            accounts,
            policy,
            metrics,
        }
    }

    /// Asks the policy, and maps a refusal to its answer (404 or 403).
    pub(crate) async fn allow(
        &self,
        actor: &Actor,
        action: Action,
        subject: Uuid,
    ) -> Result<(), ApiError> {
        let decision = self
            .policy
            .authorize(&self.accounts, actor, action, subject)
            .await?;
        let outcome = match &decision {
            Ok(()) => "allowed",
            Err(Denied::NotFound(_)) => "not_found",
            Err(Denied::Forbidden(_)) => "forbidden",
        };
        self.metrics
            .access_decisions
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        Ok(decision?)
    }

    /// Whether `user` is below their consent age, as the policy counts it.
    pub(crate) async fn is_minor(&self, user: Uuid) -> Result<bool, ApiError> {
        Ok(self.policy.is_minor(&self.accounts, user).await?)
    }

    /// Whether a read that was allowed is still allowed (the policy's `still_allows`: the same
    /// decision, not audited again).
    pub(crate) async fn still_allows(
        &self,
        actor: &Actor,
        action: Action,
        subject: Uuid,
    ) -> Result<bool, ApiError> {
        Ok(self
            .policy
            .still_allows(&self.accounts, actor, action, subject)
            .await?)
    }
}
