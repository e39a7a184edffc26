//! What every service's settings share beyond Kafka: defaults written once (in the clap
//! definitions), and secrets given either as a value or as a mounted file.
use std::path::Path;

use secrecy::SecretString;

/// The settings `T` holds when nothing is given: each field's clap `default_value` — the one
/// place a default is written — with neither the command line nor the environment read.
/// What each service's `Config::new` starts from, so that tests and the embedded platform
/// run with the defaults `--help` shows.
pub fn clap_defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults").no_binary_name(true))
        .mut_args(|arg| arg.env(None));
    let parsed = command
        .try_get_matches_from(std::iter::empty::<String>())
        .and_then(|matches| T::from_arg_matches(&matches));
    match parsed {
        Ok(settings) => settings,
        // Only a required field without a default gets here: a mistake in the settings'
        // definition, which every test building them shows at once.
        Err(error) => panic!("settings without a default for a required field: {error}"),
    }
}

/// clap's value parser for a secret: kept wrapped so that it is never printed.
pub fn parse_secret(raw: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(raw.to_string()))
}

/// Reads a secret mounted as a file (a Kubernetes or Docker secret). A trailing line break
/// is not part of the secret. An error names `variable` and the path.
pub fn read_secret_file(path: &Path, variable: &str) -> Result<SecretString, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{variable} {}: {e}", path.display()))?;
    Ok(SecretString::from(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// The secret given as a value or, failing that, in a file (`<variable>` and
/// `<variable>_FILE`); `None` when neither is.
pub fn secret_or_file(
    value: Option<&SecretString>,
    file: Option<&Path>,
    variable: &str,
) -> Result<Option<SecretString>, String> {
    match (value, file) {
        (Some(secret), _) => Ok(Some(secret.clone())),
        (None, Some(path)) => read_secret_file(path, &format!("{variable}_FILE")).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_secret_comes_from_its_value_or_else_its_file_without_the_line_break() -> Result<(), String>
    {
        let dir = std::env::temp_dir().join(format!("topup-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let file = dir.join("secret");
        std::fs::write(&file, "from the file\n").map_err(|e| e.to_string())?;
        let value = SecretString::from("the value".to_string());
        let shown = |s: Option<SecretString>| s.map(|s| s.expose_secret().to_string());
        assert_eq!(
            shown(secret_or_file(Some(&value), Some(&file), "X")?),
            Some("the value".into())
        );
        assert_eq!(shown(secret_or_file(None, Some(&file), "X")?), Some("from the file".into()));
        assert_eq!(shown(secret_or_file(None, None, "X")?), None);
        let missing = secret_or_file(None, Some(&dir.join("none")), "X").err().unwrap_or_default();
        assert!(missing.starts_with("X_FILE ") && missing.contains("none"), "{missing}");
        std::fs::remove_dir_all(&dir).map_err(|e| e.to_string())?;
        Ok(())
    }
}
