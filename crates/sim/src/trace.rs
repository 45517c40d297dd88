//! The run's trace: one line per step, kept as the last lines (a ring) so
//! a failing seed can show what led to it, or whole when asked for
//! (`GM_SIM_TRACE=1`).

use std::collections::VecDeque;

#[derive(Debug)]
pub struct Trace {
    lines: VecDeque<String>,
    keep: usize,
    /// Steps so far; every line carries it.
    pub step: u64,
}

impl Trace {
    /// Keeps the last `keep` lines (`usize::MAX`: all).
    pub fn new(keep: usize) -> Trace {
        Trace {
            lines: VecDeque::new(),
            keep,
            step: 0,
        }
    }

    pub fn line(&mut self, text: String) {
        if self.keep == 0 {
            return;
        }
        if self.lines.len() == self.keep {
            self.lines.pop_front();
        }
        self.lines.push_back(format!("{:>6} {text}", self.step));
    }

    pub fn lines(&self) -> impl Iterator<Item = &String> {
        self.lines.iter()
    }
}
