//! A one-line progress bar on stderr, redrawn in place, and only on a
//! terminal: piped or redirected runs get the report alone.

use std::io::{IsTerminal, Write};

/// Draws the bar while stderr is a terminal; does nothing otherwise.
#[derive(Clone, Copy)]
pub struct Bar {
    tty: bool,
}

impl Bar {
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// `frac` of the way (0..=1), then `text`; a full bar ends its line.
    pub fn draw(&self, frac: f64, text: &str) {
        if !self.tty {
            return;
        }
        let frac = if frac.is_finite() {
            frac.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let filled = (frac * 30.0) as usize;
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "\r[{}{}] {text}\x1b[K",
            "#".repeat(filled),
            ".".repeat(30 - filled)
        );
        if frac >= 1.0 {
            let _ = writeln!(err);
        }
        let _ = err.flush();
    }
}
