//! Which log lines a command writes to stderr, and refusing a filter that
//! would silently log nothing (or everything).
//!
//! Precedence: `--log FILTER`, then `-v`, then `FEDMESH_LOG`, then
//! `RUST_LOG`, then the command's default: daemons say what they do
//! (`info`, without the per-connection access log); the demo and drills
//! print a report and log nothing unless asked; other commands print their
//! result and warnings.

use std::fmt;

use tracing_subscriber::EnvFilter;

/// The levels a directive may name, as `tracing` spells them.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// How loud a command is when nobody asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loudness {
    /// gateway, sidecar, controller: long-running, their logs are their
    /// story.
    Daemon,
    /// demo, drill: a report on stdout and progress on stderr only.
    Report,
    /// everything else: a result on stdout, warnings on stderr.
    Command,
}

impl Loudness {
    fn filter(self) -> &'static str {
        match self {
            Self::Daemon => QUIET_INFO,
            Self::Report => "off",
            Self::Command => "warn",
        }
    }
}

/// Where a filter came from, so a refusal names what to fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Flag,
    Verbose,
    FedmeshLog,
    RustLog,
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "--log",
            Self::Verbose => "-v",
            Self::FedmeshLog => "FEDMESH_LOG",
            Self::RustLog => "RUST_LOG",
            Self::Default => "the default filter",
        })
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin} `{filter}`: {why}")]
pub struct FilterError {
    origin: Origin,
    filter: String,
    why: String,
}

/// A checked filter: its text (blanks around directives removed) and the
/// parsed form the subscriber takes.
#[derive(Debug)]
pub struct Filter {
    pub text: String,
    parsed: EnvFilter,
}

/// `info`, but the access log (a line per connection, target
/// `fedmesh::access`) stays opt-in, as in other meshes.
const QUIET_INFO: &str = "info,fedmesh::access=warn";

/// The filter a verbosity count asks for: `-v` info, `-vv` debug for
/// fedmesh's own crates (access log included), `-vvv` and more trace for
/// them and debug for the rest.
fn verbose(count: u8) -> &'static str {
    match count {
        0 | 1 => QUIET_INFO,
        2 => "info,fedmesh=debug",
        _ => "debug,fedmesh=trace",
    }
}

/// Picks the filter by the precedence above; `env` reads a variable.
pub fn choose(
    flag: Option<&str>,
    verbosity: u8,
    default: Loudness,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Filter, FilterError> {
    let (origin, filter) = if let Some(f) = flag {
        (Origin::Flag, f.to_owned())
    } else if verbosity > 0 {
        (Origin::Verbose, verbose(verbosity).to_owned())
    } else if let Some(f) = env("FEDMESH_LOG").filter(|f| !f.trim().is_empty()) {
        (Origin::FedmeshLog, f)
    } else if let Some(f) = env("RUST_LOG").filter(|f| !f.trim().is_empty()) {
        (Origin::RustLog, f)
    } else {
        (Origin::Default, default.filter().to_owned())
    };
    check(&filter).map_err(|why| FilterError {
        origin,
        // The filter may come from anywhere; keep the message one line.
        filter: filter.chars().take(120).collect(),
        why,
    })
}

/// Refuses what `EnvFilter` would quietly take to mean something else: a
/// bare word is a *target* to `RUST_LOG` (`--log verbose` would enable
/// every level of a module called `verbose` and nothing else), and an
/// unknown level after `=` is a syntax error only sometimes. Returns the
/// filter without the blanks around directives, which `EnvFilter` refuses.
fn check(filter: &str) -> Result<Filter, String> {
    let mut directives = Vec::new();
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        directives.push(directive);
        let level = match directive.rsplit_once('=') {
            // `target[span{field=value}]` without a level has its last
            // `=` inside the braces.
            Some((target, level)) if !level.contains([']', '}']) => {
                if target.trim().is_empty() {
                    return Err(format!("`{directive}` names no target before `=`"));
                }
                level
            }
            _ => directive,
        };
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level.trim())) {
            return Err(format!(
                "unknown log level `{}`; use one of {} or TARGET=LEVEL (e.g. fedmesh_gateway=debug)",
                level.trim().chars().take(40).collect::<String>(),
                LEVELS.join(", ")
            ));
        }
    }
    if directives.is_empty() {
        return Err("empty filter; use `off` to log nothing".into());
    }
    let text = directives.join(",");
    let parsed = EnvFilter::builder()
        .parse(&text)
        .map_err(|e| e.to_string())?;
    Ok(Filter { text, parsed })
}

/// Installs the subscriber: text or JSON lines, on stderr, so stdout
/// carries only a command's result.
pub fn init(filter: Filter, json: bool) {
    use std::io::IsTerminal;
    let Filter { text, parsed } = filter;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(parsed)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    tracing::debug!(filter = %text, "log filter");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn none(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn levels_and_targets_are_taken() {
        for f in [
            "info",
            "WARN",
            "off",
            "warn,fedmesh_gateway=debug",
            "fedmesh_gateway::pool=trace, quinn=warn",
            "fedmesh[conn{peer=west}]=debug",
        ] {
            let want = f.replace(", ", ",");
            let got = choose(Some(f), 0, Loudness::Command, none).map(|f| f.text);
            assert_eq!(got, Ok(want), "{f}");
        }
    }

    #[test]
    fn unknown_levels_and_bare_words_are_refused() {
        for (f, says) in [
            ("verbose", "unknown log level `verbose`"),
            ("fedmesh_gateway=loud", "unknown log level `loud`"),
            ("info,debugg", "unknown log level `debugg`"),
            ("=debug", "names no target"),
            (" , ", "empty filter"),
        ] {
            let e = choose(Some(f), 0, Loudness::Command, none).unwrap_err();
            assert!(e.to_string().contains(says), "{f}: {e}");
            assert!(e.to_string().starts_with("--log"), "{e}");
        }
    }

    #[test]
    fn precedence_flag_then_verbose_then_env_then_default() {
        let env = |k: &str| match k {
            "FEDMESH_LOG" => Some("debug".to_owned()),
            "RUST_LOG" => Some("trace".to_owned()),
            _ => None,
        };
        let rust_only = |k: &str| (k == "RUST_LOG").then(|| "error".to_owned());
        assert_eq!(
            choose(Some("warn"), 2, Loudness::Report, env).unwrap().text,
            "warn"
        );
        assert_eq!(
            choose(None, 1, Loudness::Report, env).unwrap().text,
            QUIET_INFO
        );
        assert_eq!(
            choose(None, 0, Loudness::Report, env).unwrap().text,
            "debug"
        );
        assert_eq!(
            choose(None, 0, Loudness::Report, rust_only).unwrap().text,
            "error"
        );
        assert_eq!(choose(None, 0, Loudness::Report, none).unwrap().text, "off");
        assert_eq!(
            choose(None, 0, Loudness::Daemon, none).unwrap().text,
            QUIET_INFO
        );
        assert_eq!(
            choose(None, 3, Loudness::Daemon, none).unwrap().text,
            "debug,fedmesh=trace"
        );
        let bad = |k: &str| (k == "RUST_LOG").then(|| "chatty".to_owned());
        let e = choose(None, 0, Loudness::Daemon, bad).unwrap_err();
        assert!(e.to_string().starts_with("RUST_LOG `chatty`"), "{e}");
    }
}
