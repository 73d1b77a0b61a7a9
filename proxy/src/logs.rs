//! The sidecar's log filter: `RUST_LOG` at start, `POST /logging` after.
//!
//! `target=level` directives, comma-separated, and a bare level for the
//! rest. Not EnvFilter: its span and field filters bring a regex engine, a
//! quarter of a megabyte of code resident in every sidecar.

use anyhow::{Result, bail};
use tracing_subscriber::filter::Targets;

/// Parses a filter, refusing what would silently log nothing useful: an
/// empty filter, or a directive whose level is not a level.
pub fn parse(text: &str) -> Result<Targets> {
    if text.trim().is_empty() {
        bail!("an empty log filter; e.g. info, or weft_proxy=debug,info");
    }
    for directive in text.split(',') {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if level.trim().parse::<tracing::Level>().is_err()
            && !level.trim().eq_ignore_ascii_case("off")
        {
            bail!("{directive:?}: {level:?} is not a level (trace, debug, info, warn, error, off)");
        }
    }
    Ok(text.parse::<Targets>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing::Level;

    #[test]
    fn levels_per_target_and_for_the_rest() {
        let filter = parse("weft_proxy=debug,h2=off,warn").unwrap();
        assert!(filter.would_enable("weft_proxy::xds", &Level::DEBUG));
        assert!(!filter.would_enable("weft_proxy::xds", &Level::TRACE));
        assert!(!filter.would_enable("h2::codec", &Level::ERROR));
        assert!(filter.would_enable("hyper", &Level::WARN));
        assert!(!filter.would_enable("hyper", &Level::INFO));
        assert!(parse("INFO").unwrap().would_enable("any", &Level::INFO));
    }

    #[test]
    fn what_is_not_a_filter_is_refused() {
        for bad in ["", " ", "x!", "weft_proxy=loud", "debug,", "=debug=x"] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
