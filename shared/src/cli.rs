//! Command-line and environment parsing helpers both binaries use with `clap`.
//!
//! A setting's range is declared once, at the field (`#[arg(value_parser = millis(100..))]`),
//! and a duration is a [`Duration`] from there on. clap's own message for a bad value names
//! the flag; an operator who set the environment variable is told its name as well by
//! [`parse`].

use std::ops::RangeBounds;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::error::{ContextKind, ContextValue, ErrorKind};

/// Whole milliseconds within `range`, as a [`Duration`].
pub fn millis(range: impl RangeBounds<u64> + 'static) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64)
        .range(range)
        .map(Duration::from_millis)
}

/// Whole seconds within `range`, as a [`Duration`].
pub fn secs(range: impl RangeBounds<u64> + 'static) -> impl TypedValueParser<Value = Duration> {
    clap::value_parser!(u64)
        .range(range)
        .map(Duration::from_secs)
}

/// Parses the process's arguments and environment, or exits with a message that names
/// the environment variable of a bad value next to its flag.
pub fn parse<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| naming_env(e, &mut T::command()).exit())
}

/// clap's error for a bad value, rewritten to lead with the setting's environment
/// variable. A value of a setting whose values are hidden (a secret) is not repeated.
/// Other errors are returned unchanged.
pub fn naming_env(err: clap::Error, cmd: &mut clap::Command) -> clap::Error {
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return err;
    }
    let Some(ContextValue::String(shown)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    // clap shows the argument as `--flag-name <VALUE>`.
    let flag = shown
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_start_matches('-');
    let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(flag)) else {
        return err;
    };
    let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
        return err;
    };
    let hidden = arg.is_hide_env_values_set();
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !hidden => format!(" `{v}`"),
        _ => String::new(),
    };
    let why = match (err.kind(), std::error::Error::source(&err)) {
        // The parser's reason may quote the value ("0 is not in 1..=10").
        (ErrorKind::ValueValidation, _) if hidden => "see --help for what it accepts".into(),
        (ErrorKind::ValueValidation, Some(source)) => plain_range(&source.to_string()),
        _ => {
            let names: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|p| p.get_name().to_owned())
                .collect();
            format!("must be one of {}", names.join(", "))
        }
    };
    let message = format!("{env} (--{flag}): invalid value{value}: {why}");
    cmd.error(err.kind(), message)
}

/// clap's "5 is not in 100..18446744073709551615" as "must be at least 100", and
/// "0 is not in 1..=3600" as "must be 1 to 3600"; other reasons unchanged.
fn plain_range(reason: &str) -> String {
    let Some((_, range)) = reason.split_once(" is not in ") else {
        return reason.to_owned();
    };
    let Some((low, high)) = range.split_once("..") else {
        return reason.to_owned();
    };
    let inclusive = high.starts_with('=');
    let high = high.trim_start_matches('=');
    let unbounded = [
        u64::MAX.to_string(),
        i64::MAX.to_string(),
        u32::MAX.to_string(),
        i32::MAX.to_string(),
    ];
    match high.parse::<u64>() {
        _ if unbounded.iter().any(|m| m == high) => format!("must be at least {low}"),
        Ok(h) if inclusive => format!("must be {low} to {h}"),
        Ok(h) => format!("must be {low} to {}", h.saturating_sub(1)),
        Err(_) => reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser, Debug)]
    struct Settings {
        /// A timeout.
        #[arg(long = "timeout-ms", env = "TEST_TIMEOUT_MS", default_value = "5000",
              value_parser = millis(100..=60_000))]
        timeout: Duration,
        #[arg(long = "grace-secs", env = "TEST_GRACE_SECS", default_value = "25",
              value_parser = secs(1..))]
        grace: Duration,
        #[arg(long, env = "TEST_SECRET", hide_env_values = true, default_value = "0",
              value_parser = clap::value_parser!(u32).range(1..))]
        secret: u32,
        #[arg(long, env = "TEST_MODE", value_enum, default_value = "on")]
        mode: Mode,
    }

    #[derive(Clone, Copy, Debug, clap::ValueEnum)]
    enum Mode {
        On,
        Off,
    }

    fn error_of(args: &[&str]) -> String {
        let err = Settings::try_parse_from(args).expect_err("a bad value");
        naming_env(err, &mut Settings::command()).to_string()
    }

    #[test]
    fn durations_arrive_as_durations_within_their_range() {
        let s = Settings::try_parse_from(["t", "--secret", "7"]).expect("parses");
        assert_eq!(s.timeout, Duration::from_millis(5000));
        assert_eq!(s.grace, Duration::from_secs(25));
        assert!(matches!(s.mode, Mode::On));
        let s = Settings::try_parse_from(["t", "--timeout-ms", "100", "--secret", "1"])
            .expect("the lower bound is allowed");
        assert_eq!(s.timeout, Duration::from_millis(100));
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_range() {
        let msg = error_of(&["t", "--timeout-ms", "99"]);
        assert!(
            msg.contains(
                "TEST_TIMEOUT_MS (--timeout-ms): invalid value `99`: must be 100 to 60000"
            ),
            "{msg}"
        );
        let msg = error_of(&["t", "--grace-secs", "0"]);
        assert!(
            msg.contains("TEST_GRACE_SECS (--grace-secs): invalid value `0`: must be at least 1"),
            "{msg}"
        );
        let msg = error_of(&["t", "--timeout-ms", "soon"]);
        assert!(
            msg.contains("TEST_TIMEOUT_MS (--timeout-ms): invalid value `soon`"),
            "{msg}"
        );
        let msg = error_of(&["t", "--mode", "maybe"]);
        assert!(
            msg.contains("TEST_MODE (--mode): invalid value `maybe`: must be one of on, off"),
            "{msg}"
        );
    }

    #[test]
    fn a_hidden_value_is_not_repeated() {
        let msg = error_of(&["t", "--secret", "0"]);
        assert!(
            msg.contains("TEST_SECRET (--secret): invalid value: "),
            "{msg}"
        );
        assert!(!msg.contains('0'), "{msg}");
    }

    #[test]
    fn other_errors_are_left_as_clap_wrote_them() {
        let err = Settings::try_parse_from(["t", "--unknown"]).expect_err("unknown flag");
        let before = err.to_string();
        assert_eq!(
            naming_env(err, &mut Settings::command()).to_string(),
            before
        );
    }
}
