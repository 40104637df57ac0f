//! Secrets (passwords) from settings or files: never shown in `Debug`, errors or logs.

use std::path::Path;

/// A password or similar secret. Its `Debug` output is `Secret(***)`; the value is reachable
/// only through [`Secret::expose`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for handing to a client library.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty (no password).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// A clap value parser for a `…_FILE` setting: reads the secret from the file named (a mounted
/// secret, say), without its trailing line break. Errors name the setting and the path, never
/// the content.
pub fn secret_file(
    setting: &'static str,
) -> impl Fn(&str) -> Result<Secret, String> + Clone + Send + Sync + 'static {
    move |value: &str| read_secret_file(setting, Path::new(value))
}

fn read_secret_file(setting: &str, path: &Path) -> Result<Secret, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let secret = text.trim_end_matches(['\r', '\n']);
    if secret.is_empty() {
        return Err(format!("{setting}: {} is empty", path.display()));
    }
    Ok(Secret(secret.to_owned()))
}

/// A clap value parser for a setting naming a file that must exist and be readable now (a CA
/// certificate, a client key), so that a typo fails at start with the setting's name.
pub fn readable_file(
    setting: &'static str,
) -> impl Fn(&str) -> Result<std::path::PathBuf, String> + Clone + Send + Sync + 'static {
    move |value: &str| {
        let path = Path::new(value);
        std::fs::File::open(path)
            .map(|_| path.to_path_buf())
            .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))
    }
}

/// A value parser for settings that may hold secrets (keys, URLs with a password). Unlike
/// clap's usual "invalid value '…'" error, a refusal never repeats the value (a mistyped key is
/// still mostly key, a bad URL may carry its password): it says only what `F` says.
#[derive(Clone, Copy)]
pub struct Refusing<F>(pub F);

impl<T, E, F> clap::builder::TypedValueParser for Refusing<F>
where
    T: Clone + Send + Sync + 'static,
    E: std::fmt::Display,
    F: Fn(&std::ffi::OsStr) -> Result<T, E> + Clone + Send + Sync + 'static,
{
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        (self.0)(value).map_err(|e| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("{e}\n"))
                .with_cmd(cmd)
        })
    }
}

/// [`Refusing`] for a URL setting: `parse` checks the text; its refusal is prefixed with the
/// setting's variable and flag and never shows the URL (which may carry a password).
pub fn refusing_url<T: Clone + Send + Sync + 'static>(
    setting: &'static str,
    flag: &'static str,
    parse: fn(&str) -> Result<T, String>,
) -> Refusing<impl Fn(&std::ffi::OsStr) -> Result<T, String> + Clone + Send + Sync + 'static> {
    Refusing(move |value: &std::ffi::OsStr| {
        let text = value
            .to_str()
            .ok_or_else(|| format!("{setting} ({flag}): not UTF-8"))?;
        parse(text).map_err(|reason| format!("{setting} ({flag}): {reason}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let secret = Secret::from("hunter2".to_owned());
        assert_eq!(format!("{secret:?}"), "Secret(***)");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn secret_files_lose_their_line_break_and_errors_name_the_path_only() {
        let dir = std::env::temp_dir().join(format!("biofeed-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let parse = secret_file("BIOFEED_X_PASSWORD_FILE");
        assert_eq!(parse(file.to_str().unwrap()).unwrap().expose(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        let empty = parse(file.to_str().unwrap()).unwrap_err();
        assert!(empty.contains("BIOFEED_X_PASSWORD_FILE") && empty.contains("empty"));
        let missing = parse("/nonexistent/pw").unwrap_err();
        assert!(missing.contains("BIOFEED_X_PASSWORD_FILE: cannot read /nonexistent/pw"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
