//! Passwords: argon2id with at least OWASP's parameters (19 MiB, 2 iterations, 1 lane), a hash
//! upgraded on the next login when the parameters are raised, and the same work for an unknown
//! email as for a wrong password.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::AccountsError;

/// OWASP's minimum memory for argon2id, in KiB.
pub const OWASP_MEMORY_KIB: u32 = 19 * 1024;
/// OWASP's minimum iterations at that memory.
pub const OWASP_ITERATIONS: u32 = 2;

/// Shortest accepted password, in characters (NIST SP 800-63B asks for at least 8).
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest accepted password, in bytes (bounds the hashing work an attacker can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The argon2id cost parameters, from settings.
#[derive(Debug, Clone, clap::Args)]
pub struct PasswordSettings {
    /// argon2id memory per password hash, in KiB (at least OWASP's 19456). Raising it rehashes
    /// each password at its owner's next login.
    #[arg(long = "password-memory-kib", id = "password_memory_kib", value_name = "KIB",
          env = "BIOFEED_PASSWORD_MEMORY_KIB", default_value_t = OWASP_MEMORY_KIB,
          value_parser = clap::value_parser!(u32).range(i64::from(OWASP_MEMORY_KIB)..=4 * 1024 * 1024))]
    pub memory_kib: u32,

    /// argon2id iterations per password hash (at least OWASP's 2).
    #[arg(long = "password-iterations", id = "password_iterations", value_name = "N",
          env = "BIOFEED_PASSWORD_ITERATIONS", default_value_t = OWASP_ITERATIONS,
          value_parser = clap::value_parser!(u32).range(i64::from(OWASP_ITERATIONS)..=100))]
    pub iterations: u32,
}

impl Default for PasswordSettings {
    fn default() -> Self {
        Self {
            memory_kib: OWASP_MEMORY_KIB,
            iterations: OWASP_ITERATIONS,
        }
    }
}

/// Hashes and verifies passwords with the configured parameters.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    /// A hash of a random password, verified against when the email is unknown, so that the
    /// answer takes as long as for a known email with a wrong password.
    decoy: String,
}

/// What verifying a password found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Wrong password (or no such account).
    No,
    /// Right password, hashed with the current parameters.
    Yes,
    /// Right password, but hashed with other parameters: store a new hash.
    YesRehash,
}

impl Passwords {
    /// Hashing with these settings.
    pub fn new(settings: &PasswordSettings) -> Result<Self, AccountsError> {
        let params =
            Params::new(settings.memory_kib, settings.iterations, 1, None).map_err(|e| {
                AccountsError::Invalid {
                    field: "password parameters",
                    reason: e.to_string(),
                }
            })?;
        let mut passwords = Self {
            params,
            decoy: String::new(),
        };
        let mut random = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut random);
        passwords.decoy = passwords.hash_unchecked(&random)?;
        Ok(passwords)
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// Checks a new password's length and hashes it (PHC string). CPU-heavy: call it from a
    /// blocking thread.
    pub fn hash(&self, password: &str) -> Result<String, AccountsError> {
        check_new_password(password)?;
        self.hash_unchecked(password.as_bytes())
    }

    /// [`hash`](Self::hash) on a blocking thread, for async callers: argon2 would stall the
    /// async threads for the whole hash.
    pub async fn hash_off_thread(&self, password: String) -> Result<String, AccountsError> {
        let hasher = self.clone();
        tokio::task::spawn_blocking(move || hasher.hash(&password))
            .await
            .map_err(|e| AccountsError::Invalid {
                field: "password",
                reason: format!("hashing did not finish: {e}"),
            })?
    }

    fn hash_unchecked(&self, password: &[u8]) -> Result<String, AccountsError> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon2()
            .hash_password(password, &salt)
            .map(|h| h.to_string())
            .map_err(|e| AccountsError::Invalid {
                field: "password",
                reason: format!("cannot be hashed: {e}"),
            })
    }

    /// Verifies `password` against `stored`, or against the decoy when there is no stored hash.
    /// CPU-heavy: call it from a blocking thread.
    pub fn verify(&self, password: &str, stored: Option<&str>) -> Verified {
        let password = &password.as_bytes()[..password.len().min(MAX_PASSWORD_BYTES)];
        let hash = stored.unwrap_or(&self.decoy);
        let Ok(parsed) = PasswordHash::new(hash) else {
            // A stored hash we cannot read: still spend the work, then refuse.
            let _ = self.check_decoy(password);
            return Verified::No;
        };
        if self.argon2().verify_password(password, &parsed).is_err() || stored.is_none() {
            return Verified::No;
        }
        let current = parsed.algorithm.as_str() == "argon2id"
            && Params::try_from(&parsed).is_ok_and(|p| {
                p.m_cost() == self.params.m_cost()
                    && p.t_cost() == self.params.t_cost()
                    && p.p_cost() == self.params.p_cost()
            });
        if current {
            Verified::Yes
        } else {
            Verified::YesRehash
        }
    }

    fn check_decoy(&self, password: &[u8]) -> bool {
        PasswordHash::new(&self.decoy)
            .is_ok_and(|parsed| self.argon2().verify_password(password, &parsed).is_ok())
    }
}

/// A new password's rules: 10 characters or more, at most 1024 bytes.
pub fn check_new_password(password: &str) -> Result<(), AccountsError> {
    let invalid = |reason: &str| AccountsError::Invalid {
        field: "password",
        reason: reason.to_owned(),
    };
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(invalid("must be at least 10 characters long"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(invalid("must be at most 1024 bytes long"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_ask_for_a_rehash_when_parameters_rise() {
        let owasp = Passwords::new(&PasswordSettings::default()).unwrap();
        let hash = owasp.hash("correct horse battery").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert_eq!(
            owasp.verify("correct horse battery", Some(&hash)),
            Verified::Yes
        );
        assert_eq!(
            owasp.verify("wrong horse battery", Some(&hash)),
            Verified::No
        );
        assert_eq!(owasp.verify("correct horse battery", None), Verified::No);
        assert_eq!(owasp.verify("x", Some("not a hash")), Verified::No);
        let stronger = Passwords::new(&PasswordSettings {
            memory_kib: OWASP_MEMORY_KIB,
            iterations: 3,
        })
        .unwrap();
        assert_eq!(
            stronger.verify("correct horse battery", Some(&hash)),
            Verified::YesRehash
        );
        assert!(owasp.hash("short").is_err());
    }
}
