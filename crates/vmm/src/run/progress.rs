//! A progress bar for long runs: shown on a terminal, silent otherwise (pipes, `--json`, CI).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Progress of one run, phase by phase: a bar for a phase whose steps are known (the launch's
/// pages and VMSAs), a count for one whose are not (the guest's vCPU exits).
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

/// A phase of known length: `  launch [=====>    ] 3/8 VMSAs`.
const BAR: &str = "{prefix:>8} [{bar:40}] {pos}/{len} {msg}";
/// A phase of unknown length: `   guest 65 vCPU exits`; `{unit}` is replaced by the phase's.
const COUNT: &str = "{prefix:>8} {pos} {unit} {msg}";

impl Progress {
    /// A bar drawn on stderr if `visible` and stderr is a terminal; hidden otherwise.
    pub fn new(visible: bool) -> Self {
        if visible && std::io::stderr().is_terminal() {
            let p = Self::drawn_to(ProgressDrawTarget::stderr());
            p.bar.enable_steady_tick(Duration::from_millis(200));
            p
        } else {
            Self {
                bar: ProgressBar::hidden(),
            }
        }
    }

    fn drawn_to(target: ProgressDrawTarget) -> Self {
        Self {
            bar: ProgressBar::with_draw_target(None, target),
        }
    }

    /// A hidden bar.
    pub fn hidden() -> Self {
        Self::new(false)
    }

    /// Start a phase of `len` steps, drawn as a bar.
    pub fn phase(&self, name: &str, len: u64) {
        self.start(name, BAR, Some(len));
    }

    /// Start a phase whose steps are not known in advance, drawn as a count of `unit`.
    pub fn counted_phase(&self, name: &str, unit: &str) {
        self.start(name, &COUNT.replace("{unit}", unit), None);
    }

    fn start(&self, name: &str, template: &str, len: Option<u64>) {
        if let Ok(style) = ProgressStyle::with_template(template) {
            self.bar.set_style(style.progress_chars("=> "));
        }
        // What the phase before said is cleared, and the name is set last, so that the new
        // name is never drawn beside the old phase's numbers.
        self.bar.set_message("");
        self.bar.set_position(0);
        match len {
            Some(n) => self.bar.set_length(n),
            None => self.bar.unset_length(),
        }
        self.bar.set_prefix(name.to_owned());
    }

    /// `n` more steps done.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Say what is happening now.
    pub fn message(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use indicatif::TermLike;

    use super::*;

    /// A terminal that keeps the last line drawn.
    #[derive(Debug, Default, Clone)]
    struct Screen(Arc<Mutex<String>>);

    impl TermLike for Screen {
        fn width(&self) -> u16 {
            100
        }
        fn move_cursor_up(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> io::Result<()> {
            self.write_str(s)
        }
        fn write_str(&self, s: &str) -> io::Result<()> {
            if !s.trim().is_empty() {
                *self.0.lock().unwrap() = s.trim_end().to_owned();
            }
            Ok(())
        }
        fn clear_line(&self) -> io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_phase_of_unknown_length_is_a_count_and_forgets_the_last_message() {
        let screen = Screen::default();
        let p = Progress::drawn_to(ProgressDrawTarget::term_like(Box::new(screen.clone())));
        let shown = |p: &Progress| {
            p.bar.tick();
            screen.0.lock().unwrap().clone()
        };
        p.phase("launch", 3);
        p.inc(1);
        p.message("VMSAs");
        assert_eq!(
            shown(&p),
            "  launch [=============>                          ] 1/3 VMSAs"
        );
        // It was a full bar "65/0" still saying "VMSAs".
        p.counted_phase("guest", "vCPU exits");
        p.inc(65);
        assert_eq!(shown(&p), "   guest 65 vCPU exits");
        p.message("teardown");
        assert_eq!(shown(&p), "   guest 65 vCPU exits teardown");
    }
}
