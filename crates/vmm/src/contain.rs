//! A boundary around third-party code fed with outside input: a panic inside it becomes an
//! error the caller prints as one line (exit code 2), instead of ending the process with a
//! backtrace (exit code 101). The panic hook stays silent for a contained panic and reports
//! every other one, on this thread or another, as before.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// How many [`contain`] calls this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// The message and location of the last panic contained on this thread.
    static CAUGHT: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Run `f`; if it panics, return the panic's message and location instead.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if DEPTH.with(Cell::get) == 0 {
                return previous(info);
            }
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("a panic without a message");
            // The file's last three components (`igvm-0.5.0/src/lib.rs`), not the whole path
            // into the cargo registry.
            let at = info
                .location()
                .map(|l| {
                    let file: Vec<&str> = l.file().rsplit('/').take(3).collect();
                    let file: Vec<&str> = file.into_iter().rev().collect();
                    format!(" at {}:{}", file.join("/"), l.line())
                })
                .unwrap_or_default();
            CAUGHT.with(|c| *c.borrow_mut() = Some(format!("{message}{at}")));
        }));
    });
    DEPTH.with(|d| d.set(d.get() + 1));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    DEPTH.with(|d| d.set(d.get() - 1));
    result.map_err(|_| {
        CAUGHT
            .with(|c| c.borrow_mut().take())
            .unwrap_or_else(|| "a panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_returned_and_a_value_passes_through() {
        assert_eq!(contain(|| 7), Ok(7));
        let e = contain(|| -> u8 { panic!("bad offset {}", 3) }).unwrap_err();
        assert!(e.starts_with("bad offset 3 at "), "{e}");
        assert!(e.contains("contain.rs:"), "{e}");
        // Nested: the inner panic is the inner call's; the outer goes on.
        assert_eq!(
            contain(|| contain(|| -> u8 { panic!("inner") }).is_err()),
            Ok(true)
        );
    }

    #[test]
    fn a_panic_outside_still_panics() {
        let _ = contain(|| 1);
        assert!(std::thread::spawn(|| panic!("outside")).join().is_err());
    }
}
