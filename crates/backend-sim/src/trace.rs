//! A timeline of everything the machine charged, written as Chrome trace-event JSON (the
//! format ui.perfetto.dev and chrome://tracing open): complete events (`"ph": "X"`) with `ts`
//! and `dur` in microseconds at the cost model's clock.

use serde_json::{Value, json};

/// One span on the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceEvent {
    /// What ran (the cost operation's name, or a phase name).
    pub name: String,
    /// Category: `rmp`, `firmware`, `host`, `guest`, `phase`, ...
    pub cat: &'static str,
    /// Start in cycles.
    pub start: u64,
    /// Duration in cycles.
    pub dur: u64,
    /// Track: the guest's ASID (0 for the host/platform).
    pub tid: u32,
    /// Details (a frame, a page type, a status code).
    pub detail: Option<String>,
}

/// The recorded timeline, bounded so long runs stay small.
#[derive(Clone, Debug)]
pub struct Trace {
    enabled: bool,
    cap: usize,
    events: Vec<TraceEvent>,
    dropped: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Self::new(true, 1 << 20)
    }
}

impl Trace {
    /// A timeline that keeps at most `cap` events when `enabled`.
    pub fn new(enabled: bool, cap: usize) -> Self {
        Self {
            enabled,
            cap,
            events: Vec::new(),
            dropped: 0,
        }
    }

    /// Record the span `make` builds, building it only if it will be kept.
    pub fn record_with(&mut self, make: impl FnOnce() -> TraceEvent) {
        if !self.enabled {
            return;
        }
        if self.events.len() >= self.cap {
            self.dropped += 1;
            return;
        }
        self.events.push(make());
    }

    /// Record one span.
    pub fn record(&mut self, event: TraceEvent) {
        if !self.enabled {
            return;
        }
        if self.events.len() >= self.cap {
            self.dropped += 1;
            return;
        }
        self.events.push(event);
    }

    /// The spans kept.
    pub fn events(&self) -> &[TraceEvent] {
        &self.events
    }

    /// Spans not kept because the cap was reached.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The Chrome trace-event JSON document; `clock_hz` converts cycles to microseconds.
    pub fn to_chrome_json(&self, clock_hz: f64) -> Value {
        let us = |c: u64| c as f64 * 1e6 / clock_hz;
        let mut events: Vec<Value> = vec![json!({
            "name": "process_name", "ph": "M", "pid": 1, "tid": 0,
            "args": {"name": "backend-sim machine"}
        })];
        let mut tids: Vec<u32> = self.events.iter().map(|e| e.tid).collect();
        tids.sort_unstable();
        tids.dedup();
        for t in tids {
            let name = if t == 0 {
                "host / platform".to_string()
            } else {
                format!("guest ASID {t}")
            };
            events
                .push(json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": name}}));
        }
        for e in &self.events {
            let mut args = serde_json::Map::new();
            args.insert("cycles".into(), json!(e.dur));
            if let Some(d) = &e.detail {
                args.insert("detail".into(), json!(d));
            }
            // A charged operation carries where its cost comes from.
            if let Some(op) = crate::cost::CostOp::from_name(&e.name) {
                args.insert("basis".into(), json!(op.basis()));
                args.insert("source".into(), json!(op.source()));
            }
            events.push(json!({
                "name": e.name, "cat": e.cat, "ph": "X",
                "ts": us(e.start), "dur": us(e.dur),
                "pid": 1, "tid": e.tid, "args": Value::Object(args),
            }));
        }
        json!({
            "traceEvents": events,
            "displayTimeUnit": "ns",
            "otherData": {"clock_hz": clock_hz, "dropped_events": self.dropped},
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chrome_json_has_complete_events_in_microseconds() {
        let mut t = Trace::new(true, 2);
        for i in 0..3 {
            t.record(TraceEvent {
                name: "rmpupdate_4k".into(),
                cat: "rmp",
                start: i * 2_700,
                dur: 2_700,
                tid: 5,
                detail: Some("pfn 0x1".into()),
            });
        }
        assert_eq!(t.dropped(), 1);
        t.record_with(|| unreachable!("not built when it would be dropped"));
        assert_eq!(t.dropped(), 2);
        let v = t.to_chrome_json(2.7e9);
        let evs = v["traceEvents"].as_array().unwrap();
        let x: Vec<_> = evs.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(x.len(), 2);
        assert_eq!(x[1]["ts"].as_f64().unwrap(), 1.0);
        assert_eq!(x[1]["dur"].as_f64().unwrap(), 1.0);
        for k in ["name", "cat", "ph", "ts", "dur", "pid", "tid", "args"] {
            assert!(x[0].get(k).is_some(), "{k}");
        }
        let mut off = Trace::new(false, 10);
        off.record(x_event());
        assert!(off.events().is_empty());
    }

    fn x_event() -> TraceEvent {
        TraceEvent {
            name: "a".into(),
            cat: "host",
            start: 0,
            dur: 1,
            tid: 0,
            detail: None,
        }
    }
}
