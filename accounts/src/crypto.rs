//! PII encryption: AES-256-GCM under a data key per user, the data keys wrapped by a versioned
//! master key, and a keyed blind index (HMAC-SHA256) for looking a user up by email.
//!
//! Every ciphertext binds its place through the associated data `table/column/row id`, so a
//! value copied to another row or column fails to decrypt instead of passing as that row's. A
//! fresh random 96-bit nonce is drawn for every value; the stored form is `nonce || ciphertext`.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use biofeed_backends::secret::Refusing;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use uuid::Uuid;

const NONCE_LEN: usize = 12;

/// A key problem. Messages never contain key material.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    /// A key setting is not base64 of 32 bytes.
    #[error(
        "{setting} must be base64 of exactly 32 random bytes (e.g. `openssl rand -base64 32`)"
    )]
    Malformed {
        /// The environment variable.
        setting: &'static str,
    },
    /// The previous master keys setting is not a list of `VERSION:BASE64`.
    #[error(
        "BIOFEED_MASTER_KEYS_PREVIOUS must be a comma-separated list of VERSION:BASE64 \
         (a positive version, a colon, base64 of 32 bytes)"
    )]
    PreviousMalformed,
    /// A ciphertext did not authenticate: tampered, moved, or under another key.
    #[error("a {what} failed to decrypt: it was altered, moved or sealed under another key")]
    Tampered {
        /// What was being opened, e.g. `users.email_ct`.
        what: String,
    },
    /// A data key was wrapped under a master key version this process does not have.
    #[error("data key wrapped under master key version {0}, which this process was not given")]
    UnknownMasterVersion(i32),
}

/// The keys of the accounts crate, from settings.
#[derive(Clone, clap::Args)]
pub struct AccountKeys {
    /// Master key wrapping every user's data key: base64 of 32 random bytes. Keep it in a
    /// secret store; losing it loses every user's PII. Or give BIOFEED_MASTER_KEY_FILE.
    #[arg(
        long = "master-key",
        id = "master_key",
        value_name = "BASE64",
        env = "BIOFEED_MASTER_KEY",
        hide_env_values = true,
        required_unless_present = "master_key_file",
        value_parser = secret_key("BIOFEED_MASTER_KEY")
    )]
    master_key_value: Option<Key32>,

    /// A file holding the master key (base64 of 32 bytes, e.g. a mounted secret) instead of
    /// BIOFEED_MASTER_KEY.
    #[arg(
        long = "master-key-file",
        id = "master_key_file",
        value_name = "PATH",
        env = "BIOFEED_MASTER_KEY_FILE",
        conflicts_with = "master_key",
        value_parser = Refusing(key_file)
    )]
    master_key_file: Option<Key32>,

    /// Version number of the master key, stored beside each wrapped data key so keys can rotate.
    #[arg(
        long = "master-key-version",
        id = "master_key_version",
        value_name = "N",
        env = "BIOFEED_MASTER_KEY_VERSION",
        default_value_t = 1,
        value_parser = clap::value_parser!(i32).range(1..)
    )]
    pub master_key_version: i32,

    /// Key of the email blind index (HMAC-SHA256): base64 of 32 random bytes, distinct from the
    /// master key.
    #[arg(
        long = "blind-index-key",
        id = "blind_index_key",
        value_name = "BASE64",
        env = "BIOFEED_BLIND_INDEX_KEY",
        hide_env_values = true,
        value_parser = secret_key("BIOFEED_BLIND_INDEX_KEY")
    )]
    pub blind_index_key: Key32,

    /// Earlier master keys, still needed to read data keys wrapped under them until
    /// `biofeed admin keys rotate` has re-wrapped those: `VERSION:BASE64[,VERSION:BASE64…]`.
    #[arg(
        long = "master-keys-previous",
        id = "master_keys_previous",
        value_name = "VERSION:BASE64,…",
        env = "BIOFEED_MASTER_KEYS_PREVIOUS",
        hide_env_values = true,
        default_value = "",
        hide_default_value = true,
        value_parser = Refusing(previous_keys)
    )]
    pub previous_master_keys: PreviousKeys,
}

/// Earlier master keys by version.
#[derive(Clone, Default)]
pub struct PreviousKeys(Vec<(i32, Key32)>);

impl PreviousKeys {
    fn parse(value: &str) -> Result<Self, KeyError> {
        let malformed = KeyError::Malformed {
            setting: "BIOFEED_MASTER_KEYS_PREVIOUS",
        };
        let mut keys = Vec::new();
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (version, key) = item.split_once(':').ok_or(KeyError::PreviousMalformed)?;
            let version: i32 = version
                .trim()
                .parse()
                .ok()
                .filter(|v| *v > 0)
                .ok_or(KeyError::PreviousMalformed)?;
            let key =
                Key32::parse(key, "BIOFEED_MASTER_KEYS_PREVIOUS").map_err(|_| malformed.clone())?;
            keys.push((version, key));
        }
        Ok(Self(keys))
    }

    /// Settings text for these keys (tests, `compose/local`).
    pub fn to_setting(keys: &[(i32, &Key32)]) -> String {
        keys.iter()
            .map(|(v, k)| format!("{v}:{}", k.to_base64()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl std::fmt::Debug for AccountKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKeys")
            .field("master_key_version", &self.master_key_version)
            .finish_non_exhaustive()
    }
}

/// 32 bytes of key material. Debug output shows nothing of it.
#[derive(Clone)]
pub struct Key32([u8; 32]);

impl std::fmt::Debug for Key32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key32(…)")
    }
}

impl Key32 {
    /// A fresh random key.
    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self(key)
    }

    /// The key as base64, for generating settings (tests, `compose/local`).
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    fn parse(value: &str, setting: &'static str) -> Result<Self, KeyError> {
        STANDARD
            .decode(value.trim())
            .ok()
            .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(Self)
            .ok_or(KeyError::Malformed { setting })
    }
}

/// A key setting: base64 of 32 bytes; a refusal names the setting.
fn secret_key(
    setting: &'static str,
) -> Refusing<impl Fn(&std::ffi::OsStr) -> Result<Key32, KeyError> + Clone + Send + Sync + 'static>
{
    Refusing(move |value: &std::ffi::OsStr| {
        value
            .to_str()
            .ok_or(KeyError::Malformed { setting })
            .and_then(|v| Key32::parse(v, setting))
    })
}

/// Reads a key file: base64 of 32 bytes, surrounding whitespace ignored. Errors name the path,
/// never the content.
fn key_file(value: &std::ffi::OsStr) -> Result<Key32, String> {
    let path = std::path::Path::new(value);
    match std::fs::read_to_string(path) {
        Ok(text) => Key32::parse(&text, "BIOFEED_MASTER_KEY_FILE").map_err(|_| {
            format!(
                "BIOFEED_MASTER_KEY_FILE: {} must hold base64 of exactly 32 random bytes",
                path.display()
            )
        }),
        Err(e) => Err(format!(
            "BIOFEED_MASTER_KEY_FILE: cannot read {}: {e}",
            path.display()
        )),
    }
}

/// The previous master keys setting.
fn previous_keys(value: &std::ffi::OsStr) -> Result<PreviousKeys, KeyError> {
    value
        .to_str()
        .ok_or(KeyError::PreviousMalformed)
        .and_then(PreviousKeys::parse)
}

/// Where a sealed value lives; bound into its ciphertext as associated data.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// The table.
    pub table: &'a str,
    /// The column.
    pub column: &'a str,
    /// The row's id.
    pub row: Uuid,
}

impl Place<'_> {
    fn aad(&self) -> Vec<u8> {
        format!("{}/{}/{}", self.table, self.column, self.row).into_bytes()
    }

    fn name(&self) -> String {
        format!("{}.{}", self.table, self.column)
    }
}

/// A user's own data key, unwrapped, in memory only while it is used.
pub struct DataKey(Key32);

impl AccountKeys {
    /// Fresh random keys (tests and first set-up).
    pub fn generate() -> Self {
        Self::new(Key32::random(), 1, Key32::random(), PreviousKeys::default())
    }

    /// Keys from their parts.
    pub fn new(
        master_key: Key32,
        master_key_version: i32,
        blind_index_key: Key32,
        previous_master_keys: PreviousKeys,
    ) -> Self {
        Self {
            master_key_value: Some(master_key),
            master_key_file: None,
            master_key_version,
            blind_index_key,
            previous_master_keys,
        }
    }

    /// The current master key, from BIOFEED_MASTER_KEY or BIOFEED_MASTER_KEY_FILE.
    pub fn master_key(&self) -> &Key32 {
        #[allow(clippy::expect_used)] // clap requires one of the two; `new` sets the value
        self.master_key_value
            .as_ref()
            .or(self.master_key_file.as_ref())
            .expect("a master key is required by the command line")
    }

    /// The blind-index key's bytes, for other keyed hashes of this crate.
    pub(crate) fn blind_index_key_bytes(&self) -> [u8; 32] {
        self.blind_index_key.0
    }

    /// The master key of `version`: the current one or a previous one.
    fn master_key_of(&self, version: i32) -> Result<&Key32, KeyError> {
        if version == self.master_key_version {
            return Ok(self.master_key());
        }
        self.previous_master_keys
            .0
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, k)| k)
            .ok_or(KeyError::UnknownMasterVersion(version))
    }

    /// Re-wraps a data key stored under master key `version` under the current master key.
    pub fn rewrap_data_key(
        &self,
        user: Uuid,
        wrapped: &[u8],
        version: i32,
    ) -> Result<Vec<u8>, KeyError> {
        let key = self.unwrap_data_key(user, wrapped, version)?;
        Ok(seal(self.master_key(), &wrap_place(user), &(key.0).0))
    }

    /// The blind index of an email: HMAC-SHA256 of its trimmed, lowercased form.
    pub fn email_blind_index(&self, email: &str) -> Vec<u8> {
        #[allow(clippy::expect_used)] // HMAC takes keys of any length
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.blind_index_key.0)
            .expect("hmac accepts 32-byte keys");
        mac.update(email.trim().to_lowercase().as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// A new data key for `user`, and its wrapped form for `user_data_keys`.
    pub fn new_data_key(&self, user: Uuid) -> (DataKey, Vec<u8>) {
        let key = Key32::random();
        let wrapped = seal(self.master_key(), &wrap_place(user), &key.0);
        (DataKey(key), wrapped)
    }

    /// Unwraps a stored data key.
    pub fn unwrap_data_key(
        &self,
        user: Uuid,
        wrapped: &[u8],
        version: i32,
    ) -> Result<DataKey, KeyError> {
        let bytes = open(self.master_key_of(version)?, &wrap_place(user), wrapped)?;
        let key = <[u8; 32]>::try_from(bytes).map_err(|_| KeyError::Tampered {
            what: "user_data_keys.wrapped_key".to_owned(),
        })?;
        Ok(DataKey(Key32(key)))
    }
}

impl DataKey {
    /// Encrypts a value for its place.
    pub fn seal(&self, place: Place<'_>, plaintext: &[u8]) -> Vec<u8> {
        seal(&self.0, &place, plaintext)
    }

    /// Decrypts a value sealed for this place; anything else is [`KeyError::Tampered`].
    pub fn open(&self, place: Place<'_>, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        open(&self.0, &place, sealed)
    }
}

fn wrap_place(user: Uuid) -> Place<'static> {
    Place {
        table: "user_data_keys",
        column: "wrapped_key",
        row: user,
    }
}

fn seal(key: &Key32, place: &Place<'_>, plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new((&key.0).into());
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = place.aad();
    #[allow(clippy::expect_used)] // encryption fails only beyond 64 GiB per value
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .expect("AES-GCM encrypts values below 64 GiB");
    let mut out = Vec::with_capacity(NONCE_LEN + ciphertext.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ciphertext);
    out
}

fn open(key: &Key32, place: &Place<'_>, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
    let tampered = || KeyError::Tampered { what: place.name() };
    if sealed.len() < NONCE_LEN {
        return Err(tampered());
    }
    let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new((&key.0).into());
    cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad: &place.aad(),
            },
        )
        .map_err(|_| tampered())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(row: u128) -> Place<'static> {
        Place {
            table: "users",
            column: "email_ct",
            row: Uuid::from_u128(row),
        }
    }

    #[test]
    fn sealed_values_open_only_in_their_place() {
        let keys = AccountKeys::generate();
        let (key, wrapped) = keys.new_data_key(Uuid::from_u128(1));
        let sealed = key.seal(place(1), b"ada@example.org");
        assert_eq!(key.open(place(1), &sealed).unwrap(), b"ada@example.org");
        // Moved to another row: refused, not garbage.
        assert!(matches!(
            key.open(place(2), &sealed),
            Err(KeyError::Tampered { .. })
        ));
        // Flipped bit: refused.
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            key.open(place(1), &flipped),
            Err(KeyError::Tampered { .. })
        ));
        // The same value sealed twice differs (fresh nonce).
        assert_ne!(key.seal(place(1), b"x"), key.seal(place(1), b"x"));
        // The wrapped key unwraps for its user only.
        let again = keys
            .unwrap_data_key(Uuid::from_u128(1), &wrapped, 1)
            .unwrap();
        assert_eq!(again.open(place(1), &sealed).unwrap(), b"ada@example.org");
        assert!(keys
            .unwrap_data_key(Uuid::from_u128(2), &wrapped, 1)
            .is_err());
        assert!(matches!(
            keys.unwrap_data_key(Uuid::from_u128(1), &wrapped, 2),
            Err(KeyError::UnknownMasterVersion(2))
        ));
    }

    #[test]
    fn previous_master_keys_still_unwrap_and_rewrap_under_the_current_one() {
        let old = AccountKeys::generate();
        let user = Uuid::from_u128(7);
        let (key, wrapped) = old.new_data_key(user);
        let sealed = key.seal(place(7), b"x");
        let setting = PreviousKeys::to_setting(&[(1, old.master_key())]);
        let new = AccountKeys::new(
            Key32::random(),
            2,
            old.blind_index_key.clone(),
            PreviousKeys::parse(&setting).unwrap(),
        );
        let rewrapped = new.rewrap_data_key(user, &wrapped, 1).unwrap();
        let opened = new.unwrap_data_key(user, &rewrapped, 2).unwrap();
        assert_eq!(opened.open(place(7), &sealed).unwrap(), b"x");
        // The old key alone can no longer read the re-wrapped key.
        assert!(old.unwrap_data_key(user, &rewrapped, 1).is_err());
        for bad in ["1", "0:AAAA", "x:y", "1:c2hvcnQ="] {
            let err = PreviousKeys::parse(bad).err().unwrap().to_string();
            assert!(err.contains("BIOFEED_MASTER_KEYS_PREVIOUS"), "{err}");
            assert!(!err.contains("c2hvcnQ"), "{err}");
        }
    }

    #[test]
    fn the_blind_index_is_keyed_and_normalised() {
        let keys = AccountKeys::generate();
        assert_eq!(
            keys.email_blind_index(" Ada@Example.org"),
            keys.email_blind_index("ada@example.org")
        );
        assert_ne!(
            keys.email_blind_index("ada@example.org"),
            keys.email_blind_index("bob@example.org")
        );
        let other = AccountKeys::generate();
        assert_ne!(
            keys.email_blind_index("ada@example.org"),
            other.email_blind_index("ada@example.org")
        );
    }

    #[test]
    fn malformed_keys_name_the_setting_and_show_no_material() {
        use clap::builder::TypedValueParser;
        let cmd = clap::Command::new("test");
        let parser = secret_key("BIOFEED_MASTER_KEY");
        let err = parser
            .parse_ref(&cmd, None, "c2hvcnQ=".as_ref())
            .unwrap_err()
            .to_string();
        assert!(err.contains("BIOFEED_MASTER_KEY"), "{err}");
        assert!(!err.contains("c2hvcnQ"), "{err}");
        let key = Key32::random().to_base64();
        assert!(parser.parse_ref(&cmd, None, key.as_ref()).is_ok());
    }
}
