//! How every arbor binary (`arbor`, `arbor-worker`) writes its log: the filter, the format and
//! whether lines carry colour. Each `main` flattens [`LogFlags`] into its command line and calls
//! [`init`] once; processes that spawn others (`arbor launch`, `--nproc`) hand their settings on
//! with [`child_env`].
//!
//! - **Filter:** `ARBOR_LOG`, else `RUST_LOG` (tracing-subscriber's `EnvFilter` syntax), else the
//!   binary's default level.
//! - **Format:** `--log-format text|json` (a global flag) or `ARBOR_LOG_FORMAT`; `json` writes one
//!   JSON object per line (`timestamp`, `level`, `fields`, `target`) for log collectors.
//! - **Colour** (text only), decided for stderr, the stream the log goes to: `ARBOR_LOG_COLOR`
//!   `always` or `never` if set (an explicit choice, as `CLICOLOR_FORCE` is elsewhere); otherwise
//!   none when `NO_COLOR` is set to anything non-empty (<https://no-color.org>), and else colour
//!   only when stderr is a terminal. Piped, redirected or collected output is plain text.
//! - **Children:** a parent that reads its children's output through pipes passes its own
//!   decision down (`ARBOR_LOG_FORMAT`, and `ARBOR_LOG_COLOR=always|never`), so a child's lines
//!   are coloured exactly when the parent's would be, and JSON when the parent's are.

use std::fmt::Display;
use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;

use thiserror::Error;

/// The variable (and flag) choosing the format.
pub const FORMAT_ENV: &str = "ARBOR_LOG_FORMAT";
/// The variable forcing colour on or off.
pub const COLOR_ENV: &str = "ARBOR_LOG_COLOR";
/// The filter variable; `RUST_LOG` is read when it is unset.
pub const FILTER_ENV: &str = "ARBOR_LOG";

/// A log setting that cannot be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LoggingError {
    #[error("invalid log format `{0}`: expected `text` or `json`")]
    Format(String),
    #[error("invalid {COLOR_ENV} `{0}`: expected `auto`, `always` or `never`")]
    Color(String),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing-subscriber's full format).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = LoggingError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(LoggingError::Format(value.to_string())),
        }
    }
}

impl Display for LogFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// `ARBOR_LOG_COLOR`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ColorChoice {
    /// `NO_COLOR`, then whether stderr is a terminal.
    #[default]
    Auto,
    Always,
    Never,
}

impl FromStr for ColorChoice {
    type Err = LoggingError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(ColorChoice::Auto),
            "always" => Ok(ColorChoice::Always),
            "never" => Ok(ColorChoice::Never),
            _ => Err(LoggingError::Color(value.to_string())),
        }
    }
}

/// The log flags every binary takes (global: accepted before or after the subcommand).
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LogFlags {
    /// Log format on stderr: `text`, or `json` for one JSON object per line. Colour is used only
    /// when stderr is a terminal and `NO_COLOR` is unset (`ARBOR_LOG_COLOR=always|never` forces
    /// it); the filter comes from `ARBOR_LOG` (else `RUST_LOG`).
    #[arg(
        long,
        global = true,
        env = FORMAT_ENV,
        default_value = "text",
        value_parser = parse_format,
    )]
    pub log_format: LogFormat,
}

fn parse_format(value: &str) -> Result<LogFormat, LoggingError> {
    value.parse()
}

/// What [`init`] decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Whether text lines carry ANSI colour (never with JSON).
    pub color: bool,
}

impl LogSettings {
    /// The decision for `format`, the values of `ARBOR_LOG_COLOR` and `NO_COLOR`, and whether
    /// stderr is a terminal.
    pub fn decide(
        format: LogFormat,
        color_env: Option<&str>,
        no_color_env: Option<&str>,
        stderr_is_terminal: bool,
    ) -> Result<Self, LoggingError> {
        let choice = color_env.map(str::parse).transpose()?.unwrap_or_default();
        let color = format == LogFormat::Text
            && match choice {
                ColorChoice::Always => true,
                ColorChoice::Never => false,
                ColorChoice::Auto => no_color_env.is_none_or(str::is_empty) && stderr_is_terminal,
            };
        Ok(Self { format, color })
    }

    /// The decision for this process (its environment and its stderr).
    pub fn from_environment(format: LogFormat) -> Result<Self, LoggingError> {
        let color_env = std::env::var(COLOR_ENV).ok();
        let no_color = std::env::var("NO_COLOR").ok();
        Self::decide(
            format,
            color_env.as_deref(),
            no_color.as_deref(),
            std::io::stderr().is_terminal(),
        )
    }
}

static SETTINGS: OnceLock<LogSettings> = OnceLock::new();

/// Installs the global tracing subscriber on stderr: the filter of `ARBOR_LOG` (else `RUST_LOG`,
/// else `default_filter`), the format of `flags`, colour as decided by
/// [`LogSettings::from_environment`]. Returns the settings, also kept for [`settings`].
pub fn init(flags: &LogFlags, default_filter: &str) -> Result<LogSettings, LoggingError> {
    let settings = LogSettings::from_environment(flags.log_format)?;
    let filter = tracing_subscriber::EnvFilter::try_from_env(FILTER_ENV)
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Text => builder.with_ansi(settings.color).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    let _ = SETTINGS.set(settings);
    Ok(settings)
}

/// The settings [`init`] installed (plain text without colour when it was not called).
pub fn settings() -> LogSettings {
    SETTINGS.get().copied().unwrap_or_default()
}

/// The variables that make a child process whose output this one reads through a pipe log as
/// this one does.
pub fn child_env(settings: LogSettings) -> [(&'static str, &'static str); 2] {
    [
        (FORMAT_ENV, settings.format.name()),
        (COLOR_ENV, if settings.color { "always" } else { "never" }),
    ]
}

/// A command's final error on stderr: `error: …` in text, an `ERROR` record in JSON (so every
/// line stays JSON).
pub fn report_error(error: &dyn Display) {
    match settings().format {
        LogFormat::Text => eprintln!("error: {error}"),
        LogFormat::Json => tracing::error!(error = %error, "command failed"),
    }
}

/// A line a child process wrote, as this process passes it on: `[label] line` in text; in JSON,
/// the child's JSON object with a `"process": label` member first (a line that is not a JSON
/// object becomes `{"process": label, "level": "INFO", "fields": {"message": line}}`, so the
/// output stays one object per line).
pub fn child_line(label: &str, line: &str, format: LogFormat) -> String {
    match format {
        LogFormat::Text => format!("[{label}] {line}"),
        LogFormat::Json => {
            let label = serde_json::Value::from(label);
            let trimmed = line.trim();
            match trimmed.strip_prefix('{') {
                Some(rest) if serde_json::from_str::<serde_json::Value>(trimmed).is_ok() => {
                    let separator = if rest.trim_start().starts_with('}') {
                        ""
                    } else {
                        ","
                    };
                    format!("{{\"process\":{label}{separator}{rest}")
                }
                _ => serde_json::json!({
                    "process": label,
                    "level": "INFO",
                    "fields": {"message": line},
                })
                .to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decide(
        format: LogFormat,
        color: Option<&str>,
        no_color: Option<&str>,
        terminal: bool,
    ) -> bool {
        LogSettings::decide(format, color, no_color, terminal)
            .unwrap()
            .color
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(decide(LogFormat::Text, None, None, true));
        assert!(!decide(LogFormat::Text, None, None, false));
        assert!(!decide(LogFormat::Text, None, Some("1"), true));
        // An empty NO_COLOR does not count (no-color.org).
        assert!(decide(LogFormat::Text, None, Some(""), true));
        assert!(decide(LogFormat::Text, Some("auto"), None, true));
    }

    #[test]
    fn arbor_log_color_forces_the_choice_and_json_is_never_coloured() {
        assert!(decide(LogFormat::Text, Some("always"), None, false));
        assert!(decide(LogFormat::Text, Some("ALWAYS"), Some("1"), false));
        assert!(!decide(LogFormat::Text, Some("never"), None, true));
        assert!(!decide(LogFormat::Json, Some("always"), None, true));
        let error = LogSettings::decide(LogFormat::Text, Some("sometimes"), None, true)
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "invalid ARBOR_LOG_COLOR `sometimes`: expected `auto`, `always` or `never`"
        );
    }

    #[test]
    fn formats_parse_and_unknown_ones_are_refused_naming_both() {
        assert_eq!("json".parse::<LogFormat>(), Ok(LogFormat::Json));
        assert_eq!(" Text".parse::<LogFormat>(), Ok(LogFormat::Text));
        let error = "yaml".parse::<LogFormat>().unwrap_err().to_string();
        assert_eq!(
            error,
            "invalid log format `yaml`: expected `text` or `json`"
        );
    }

    #[test]
    fn the_flag_and_the_variable_choose_the_format() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            log: LogFlags,
        }
        let cli = Cli::try_parse_from(["arbor", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log.log_format, LogFormat::Json);
        let cli = Cli::try_parse_from(["arbor"]).unwrap();
        // The default, unless the test's environment sets the variable.
        if std::env::var_os(FORMAT_ENV).is_none() {
            assert_eq!(cli.log.log_format, LogFormat::Text);
        }
        let error = Cli::try_parse_from(["arbor", "--log-format", "xml"])
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("invalid log format `xml`: expected `text` or `json`"),
            "{error}"
        );
    }

    #[test]
    fn child_env_passes_the_decision_down() {
        let settings = LogSettings {
            format: LogFormat::Json,
            color: false,
        };
        assert_eq!(
            child_env(settings),
            [(FORMAT_ENV, "json"), (COLOR_ENV, "never")]
        );
        let coloured = LogSettings {
            format: LogFormat::Text,
            color: true,
        };
        assert_eq!(
            child_env(coloured),
            [(FORMAT_ENV, "text"), (COLOR_ENV, "always")]
        );
    }

    #[test]
    fn child_lines_are_prefixed_in_text_and_tagged_in_json() {
        assert_eq!(
            child_line("worker 0", "INFO step", LogFormat::Text),
            "[worker 0] INFO step"
        );
        let tagged = child_line(
            "worker 0",
            r#"{"level":"INFO","fields":{"message":"step"}}"#,
            LogFormat::Json,
        );
        let value: serde_json::Value = serde_json::from_str(&tagged).unwrap();
        assert_eq!(value["process"], "worker 0");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["fields"]["message"], "step");
        let empty: serde_json::Value =
            serde_json::from_str(&child_line("local 1", "{}", LogFormat::Json)).unwrap();
        assert_eq!(empty, serde_json::json!({"process": "local 1"}));
        let wrapped: serde_json::Value = serde_json::from_str(&child_line(
            "local 1",
            "thread 'main' panicked at \"x\"",
            LogFormat::Json,
        ))
        .unwrap();
        assert_eq!(wrapped["process"], "local 1");
        assert_eq!(
            wrapped["fields"]["message"],
            "thread 'main' panicked at \"x\""
        );
    }
}
