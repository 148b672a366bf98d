//! Loading flags and a TOML config file into one clap-parsed struct.
//!
//! The file's keys are the flags' long names (`data-dir = "/var/lib/tern"`).
//! They are rewritten as `--data-dir=/var/lib/tern` and placed before the
//! real command-line arguments; with `args_override_self` the later
//! occurrence wins, so flags override the file without a merge step that
//! would have to list every field twice. A list (`listen-client-urls`)
//! would be appended to rather than replaced, so a key also given as a
//! flag is left out of the file's arguments altogether.

use std::ffi::OsString;

use clap::{CommandFactory, FromArgMatches};

use crate::ConfigError;

/// The flag that names the config file; it may itself not appear in a file.
pub const CONFIG_FILE_FLAG: &str = "config-file";

/// Parse `args` (program name first) and the config file they name, if any.
pub fn load<T>(args: impl IntoIterator<Item = OsString>) -> Result<T, ConfigError>
where
    T: CommandFactory + FromArgMatches,
{
    let args: Vec<OsString> = args.into_iter().collect();
    let mut command = T::command().args_override_self(true);
    let mut full = Vec::with_capacity(args.len() + 16);
    full.extend(args.first().cloned());
    if let Some(path) = config_file_arg(&args) {
        let known: Vec<String> = command
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .filter(|l| l != CONFIG_FILE_FLAG)
            .collect();
        let given: Vec<String> = args.iter().skip(1).filter_map(flag_name).collect();
        full.extend(
            file_args(&path, &known)?
                .into_iter()
                .map(OsString::from)
                .filter(|a| flag_name(a).is_none_or(|name| !given.contains(&name))),
        );
    }
    full.extend(args.into_iter().skip(1));
    let matches = command.try_get_matches_from_mut(full)?;
    Ok(T::from_arg_matches(&matches)?)
}

/// `key` of an argument `--key` or `--key=value`.
fn flag_name(arg: &OsString) -> Option<String> {
    let arg = arg.to_str()?.strip_prefix("--")?;
    Some(arg.split_once('=').map_or(arg, |(k, _)| k).to_string())
}

/// Find `--config-file PATH` or `--config-file=PATH` before clap runs.
fn config_file_arg(args: &[OsString]) -> Option<String> {
    let flag = format!("--{CONFIG_FILE_FLAG}");
    let mut it = args.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(arg) = it.next() {
        if arg == flag {
            return it.next().map(|v| v.into_owned());
        }
        if let Some(v) = arg.strip_prefix(&format!("{flag}=")) {
            return Some(v.to_string());
        }
    }
    None
}

/// Turn a TOML file into `--key=value` arguments.
pub fn file_args(path: &str, known_flags: &[String]) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_string(),
        source,
    })?;
    toml_args(path, &text, known_flags)
}

fn toml_args(path: &str, text: &str, known_flags: &[String]) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml {
            path: path.to_string(),
            message: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (key, value) in table {
        if !known_flags.contains(&key) {
            return Err(ConfigError::UnknownKey {
                path: path.to_string(),
                key,
            });
        }
        let values = match value {
            toml::Value::Array(items) => items,
            single => vec![single],
        };
        for item in values {
            let text = scalar(&item).map_err(|kind| ConfigError::UnsupportedValue {
                path: path.to_string(),
                key: key.clone(),
                kind,
            })?;
            out.push(format!("--{key}={text}"));
        }
    }
    Ok(out)
}

fn scalar(value: &toml::Value) -> Result<String, &'static str> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) => Err("nested array"),
        toml::Value::Table(_) => Err("table"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        [
            "name",
            "listen-client-urls",
            "client-cert-auth",
            "quota-backend-bytes",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn scalars_and_arrays_become_flags() {
        let args = toml_args(
            "t.toml",
            "name = \"n1\"\nquota-backend-bytes = 1024\nclient-cert-auth = true\nlisten-client-urls = [\"http://127.0.0.1:1\", \"http://127.0.0.1:2\"]\n",
            &known(),
        )
        .unwrap();
        assert!(args.contains(&"--name=n1".to_string()));
        assert!(args.contains(&"--quota-backend-bytes=1024".to_string()));
        assert!(args.contains(&"--client-cert-auth=true".to_string()));
        assert!(args.contains(&"--listen-client-urls=http://127.0.0.1:1".to_string()));
        assert!(args.contains(&"--listen-client-urls=http://127.0.0.1:2".to_string()));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = toml_args("t.toml", "nmae = \"x\"\n", &known()).unwrap_err();
        assert_eq!(err.to_string(), "unknown key 'nmae' in config file t.toml");
    }

    #[test]
    fn tables_are_refused() {
        let err = toml_args("t.toml", "[name]\na = 1\n", &known()).unwrap_err();
        assert!(err.to_string().contains("key 'name'"), "{err}");
    }

    #[test]
    fn bad_toml_names_the_file() {
        let err = toml_args("t.toml", "name = \n", &known()).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("config file t.toml is not valid TOML"));
    }
}
