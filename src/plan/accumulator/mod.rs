//! The in-memory form of a view's partials: a hash map from group to merged states.
//!
//! This is where partials merge — for `Plan::merge`, for `Plan::finish`, and for the speed
//! layer, which keeps one accumulator per segment and absorbs each micro-batch's partials into
//! it at a cost proportional to the micro-batch, not to the segment. There is exactly one
//! merge implementation, so every layer combines partials by the same rules.
//!
//! Here: the group map (windows, panes and sessions) and its way out (the canonical partial
//! frame, the finished rows). Each metric's mergeable state, by aggregate, is `state`'s; the
//! state columns of the partial frame, read and written, `frame`'s.

mod frame;
mod state;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use polars::prelude::*;

use super::layout::{ROWS, ViewLayout, WINDOW_END, WINDOW_START, WindowLayout};
use super::value::{Value, datetime_column};
use frame::{columns, key_columns, read_state, state_column};
use state::{State, finish_column};

/// Mergeable partials of one view, held in memory.
#[derive(Debug, Clone)]
pub struct Accumulator {
    layout: Arc<ViewLayout>,
    /// Tumbling, hopping (per pane) and all-time groups.
    groups: HashMap<GroupKey, Group>,
    /// Session views: per key, sessions by start. Invariant: no two sessions of a key come
    /// within `gap` of each other (they would have been merged).
    sessions: HashMap<Box<[Value]>, BTreeMap<i64, Session>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    /// Window start (tumbling), pane start (hopping), `None` for all-time.
    start: Option<i64>,
    keys: Box<[Value]>,
}

#[derive(Debug, Clone)]
struct Group {
    rows: u64,
    states: Vec<State>,
}

#[derive(Debug, Clone)]
struct Session {
    last: i64,
    group: Group,
}

impl Group {
    fn merge(&mut self, other: Group) {
        // Saturating: partials read from files are not trusted to be sane.
        self.rows = self.rows.saturating_add(other.rows);
        for (a, b) in self.states.iter_mut().zip(other.states) {
            a.merge(b);
        }
    }
}

/// One group on its way out: start, session last event, keys, states.
type Row<'a> = (Option<i64>, Option<i64>, &'a [Value], &'a Group);

impl Accumulator {
    pub(crate) fn new(layout: Arc<ViewLayout>) -> Accumulator {
        Accumulator {
            layout,
            groups: HashMap::new(),
            sessions: HashMap::new(),
        }
    }

    /// Number of groups (sessions for session views) held.
    pub fn len(&self) -> usize {
        self.groups.len() + self.sessions.values().map(BTreeMap::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Merges a partial frame of this view (from `Plan::partials`, `Plan::merge`,
    /// `to_partials` or a partials Parquet file) into this accumulator.
    pub fn absorb(&mut self, frame: &DataFrame) -> PolarsResult<()> {
        let layout = Arc::clone(&self.layout);
        let schema = layout.partial_schema();
        let mut series = Vec::with_capacity(schema.len());
        for (name, dtype) in schema.iter() {
            let s = frame
                .column(name)
                .map_err(|_| {
                    polars_err!(ColumnNotFound: "partials of view `{}` have no column `{name}` (format v{})", layout.view, super::PARTIALS_FORMAT_VERSION)
                })?
                .as_materialized_series()
                .rechunk();
            if s.dtype() != dtype {
                polars_bail!(SchemaMismatch: "partials of view `{}`: column `{name}` is {} where format v{} has {dtype}", layout.view, s.dtype(), super::PARTIALS_FORMAT_VERSION);
            }
            series.push(s);
        }
        let cols = columns(&layout, &series)?;
        for r in 0..frame.height() {
            let rows = cols.rows.get(r).unwrap_or(0);
            if rows == 0 {
                continue;
            }
            let keys: Box<[Value]> = cols.keys.iter().map(|k| k.get(r)).collect();
            let states = layout
                .metrics
                .iter()
                .zip(&cols.states)
                .map(|(m, c)| read_state(m, c, r))
                .collect::<PolarsResult<Vec<_>>>()?;
            let group = Group { rows, states };
            match layout.window {
                WindowLayout::Session { gap } => {
                    let (Some(start), Some(last)) = (cols.window[0].get(r), cols.window[1].get(r))
                    else {
                        polars_bail!(ComputeError: "partials of view `{}`: a session without start or end", layout.view);
                    };
                    self.add_session(gap, keys, start, last, group);
                }
                WindowLayout::All => self.add(GroupKey { start: None, keys }, group),
                _ => self.add(
                    GroupKey {
                        start: cols.window[0].get(r),
                        keys,
                    },
                    group,
                ),
            }
        }
        Ok(())
    }

    /// Merges another accumulator of the same view into this one.
    pub fn merge(&mut self, other: Accumulator) {
        for (key, group) in other.groups {
            self.add(key, group);
        }
        if let WindowLayout::Session { gap } = self.layout.window {
            for (keys, sessions) in other.sessions {
                for (start, s) in sessions {
                    self.add_session(gap, keys.clone(), start, s.last, s.group);
                }
            }
        }
    }

    fn add(&mut self, key: GroupKey, group: Group) {
        match self.groups.entry(key) {
            Entry::Occupied(mut e) => e.get_mut().merge(group),
            Entry::Vacant(e) => {
                e.insert(group);
            }
        }
    }

    /// Adds a session `[start, last + gap)`, merging every held session it overlaps.
    fn add_session(&mut self, gap: i64, keys: Box<[Value]>, start: i64, last: i64, group: Group) {
        let sessions = self.sessions.entry(keys).or_default();
        let (mut start, mut last, mut group) = (start, last, group);
        // Held sessions are disjoint, so ordered by start they are ordered by end too: walk
        // back from the last one starting before our end while they reach past our start.
        let overlapping: Vec<i64> = sessions
            .range(..last.saturating_add(gap))
            .rev()
            .take_while(|(_, s)| s.last.saturating_add(gap) > start)
            .map(|(k, _)| *k)
            .collect();
        for k in overlapping {
            if let Some(s) = sessions.remove(&k) {
                start = start.min(k);
                last = last.max(s.last);
                group.merge(s.group);
            }
        }
        sessions.insert(start, Session { last, group });
    }

    /// Groups in output order: window start, then keys (null last).
    fn sorted(&self) -> Vec<Row<'_>> {
        let mut out: Vec<_> = self
            .groups
            .iter()
            .map(|(k, g)| (k.start, None, &k.keys[..], g))
            .chain(self.sessions.iter().flat_map(|(keys, sessions)| {
                sessions
                    .iter()
                    .map(move |(start, s)| (Some(*start), Some(s.last), &keys[..], &s.group))
            }))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.2.cmp(b.2)));
        out
    }

    /// The canonical partial frame (format v1), sorted by window then keys.
    pub fn to_partials(&self) -> PolarsResult<DataFrame> {
        let layout = &self.layout;
        let rows = self.sorted();
        let n = rows.len();
        let mut cols: Vec<Column> = Vec::new();
        let window_names = layout.window_columns();
        if let Some(name) = window_names.first() {
            cols.push(datetime_column(name, rows.iter().map(|r| r.0).collect()));
        }
        if let Some(name) = window_names.get(1) {
            cols.push(datetime_column(name, rows.iter().map(|r| r.1).collect()));
        }
        cols.extend(key_columns(layout, &rows));
        cols.push(Column::new(
            ROWS.into(),
            rows.iter().map(|r| r.3.rows).collect::<Vec<u64>>(),
        ));
        for (i, m) in layout.metrics.iter().enumerate() {
            for s in m.states() {
                cols.push(state_column(m, *s, rows.iter().map(|r| &r.3.states[i]))?);
            }
        }
        DataFrame::new(n, cols)
    }

    /// Finished rows: window_start, window_end, group_by columns, then the metrics.
    pub fn finish(&self) -> PolarsResult<DataFrame> {
        let layout = &self.layout;
        let expanded;
        let source = match layout.window {
            WindowLayout::Hopping { size, every } => {
                // Each pane belongs to the size/every windows that start at or before it.
                let mut windows = Accumulator::new(Arc::clone(&self.layout));
                for (key, group) in &self.groups {
                    let Some(pane) = key.start else { continue };
                    for j in 0..size / every {
                        windows.add(
                            GroupKey {
                                start: Some(pane.saturating_sub(j.saturating_mul(every))),
                                keys: key.keys.clone(),
                            },
                            group.clone(),
                        );
                    }
                }
                expanded = windows;
                &expanded
            }
            _ => self,
        };
        let rows = source.sorted();
        let n = rows.len();
        let (starts, ends): (Vec<Option<i64>>, Vec<Option<i64>>) = rows
            .iter()
            .map(|r| match layout.window {
                WindowLayout::Tumbling { size } | WindowLayout::Hopping { size, .. } => {
                    (r.0, r.0.map(|s| s.saturating_add(size)))
                }
                WindowLayout::Session { gap } => (r.0, r.1.map(|l| l.saturating_add(gap))),
                WindowLayout::All => (None, None),
            })
            .unzip();
        let mut cols = vec![
            datetime_column(WINDOW_START, starts),
            datetime_column(WINDOW_END, ends),
        ];
        cols.extend(key_columns(layout, &rows));
        for (i, m) in layout.metrics.iter().enumerate() {
            cols.push(finish_column(
                m,
                rows.iter().map(|r| (r.3.rows, &r.3.states[i])),
            ));
        }
        DataFrame::new(n, cols)
    }
}
