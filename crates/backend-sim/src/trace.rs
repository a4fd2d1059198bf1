//! A timeline of everything the machine charged, written as Chrome trace-event JSON (the
//! format ui.perfetto.dev and chrome://tracing open): complete events (`"ph": "X"`) with `ts`
//! and `dur` in microseconds at the cost model's clock.

use serde::Serialize;

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

    /// Write the Chrome trace-event JSON document to `out`; `clock_hz` converts cycles to
    /// microseconds. The document is serialized as it is written, from the recorded spans: a
    /// full timeline (a quarter million spans) costs no tree of JSON values beside it.
    pub fn write_chrome_json(&self, clock_hz: f64, out: impl std::io::Write) -> serde_json::Result<()> {
        let mut tids: Vec<u32> = self.events.iter().map(|e| e.tid).collect();
        tids.sort_unstable();
        tids.dedup();
        serde_json::to_writer(
            out,
            &ChromeTrace {
                trace_events: ChromeEvents {
                    trace: self,
                    clock_hz,
                    tids,
                },
                display_time_unit: "ns",
                other_data: OtherData {
                    clock_hz,
                    dropped_events: self.dropped,
                },
            },
        )
    }
}

/// The document: <https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU>
/// (the Trace Event Format), as Perfetto reads it.
#[derive(Serialize)]
struct ChromeTrace<'a> {
    #[serde(rename = "traceEvents")]
    trace_events: ChromeEvents<'a>,
    #[serde(rename = "displayTimeUnit")]
    display_time_unit: &'static str,
    #[serde(rename = "otherData")]
    other_data: OtherData,
}

#[derive(Serialize)]
struct OtherData {
    clock_hz: f64,
    dropped_events: u64,
}

/// The event array: the process's and each track's name (metadata events, `"ph": "M"`), then
/// every span as a complete event (`"ph": "X"`).
struct ChromeEvents<'a> {
    trace: &'a Trace,
    clock_hz: f64,
    tids: Vec<u32>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChromeEvent<'a> {
    Meta {
        name: &'static str,
        ph: &'static str,
        pid: u32,
        tid: u32,
        args: MetaArgs,
    },
    Span {
        name: &'a str,
        cat: &'static str,
        ph: &'static str,
        ts: f64,
        dur: f64,
        pid: u32,
        tid: u32,
        args: SpanArgs<'a>,
    },
}

#[derive(Serialize)]
struct MetaArgs {
    name: String,
}

#[derive(Serialize)]
struct SpanArgs<'a> {
    cycles: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<&'a str>,
    /// A charged operation carries where its cost comes from.
    #[serde(skip_serializing_if = "Option::is_none")]
    basis: Option<crate::cost::Basis>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'static str>,
}

impl Serialize for ChromeEvents<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let us = |c: u64| c as f64 * 1e6 / self.clock_hz;
        let meta = |name, tid, label| ChromeEvent::Meta {
            name,
            ph: "M",
            pid: 1,
            tid,
            args: MetaArgs { name: label },
        };
        let process = std::iter::once(meta("process_name", 0, "backend-sim machine".to_owned()));
        let tracks = self.tids.iter().map(|&t| {
            let label = if t == 0 {
                "host / platform".to_owned()
            } else {
                format!("guest ASID {t}")
            };
            meta("thread_name", t, label)
        });
        let spans = self.trace.events.iter().map(|e| {
            let op = crate::cost::CostOp::from_name(&e.name);
            ChromeEvent::Span {
                name: &e.name,
                cat: e.cat,
                ph: "X",
                ts: us(e.start),
                dur: us(e.dur),
                pid: 1,
                tid: e.tid,
                args: SpanArgs {
                    cycles: e.dur,
                    detail: e.detail.as_deref(),
                    basis: op.map(|o| o.basis()),
                    source: op.map(|o| o.source()),
                },
            }
        });
        s.collect_seq(process.chain(tracks).chain(spans))
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
        let mut bytes = Vec::new();
        t.write_chrome_json(2.7e9, &mut bytes).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["otherData"]["dropped_events"], 2);
        assert_eq!(v["traceEvents"][0]["args"]["name"], "backend-sim machine");
        assert_eq!(v["traceEvents"][1]["args"]["name"], "guest ASID 5");
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
