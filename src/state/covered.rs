//! Which sealed segments the published batch views cover: what the speed layer need not read
//! at start and what maintenance may touch (DESIGN.md §4).

use super::{Cutoff, Publication, Segment, State, StateError};
use crate::spec::Pipeline;

impl State {
    /// Per partition, the first position NOT covered by every view's current publication;
    /// `None` when some view has none (then nothing is covered). A pipeline without views
    /// covers everything sealed.
    pub async fn covered(&self, pipeline: &Pipeline) -> Result<Option<Cutoff>, StateError> {
        self.covered_where(pipeline, |_, _| true).await
    }

    /// [`State::covered`], counting only the current publications `accept(view index,
    /// publication)` takes (the speed layer takes only those computed by the views' current
    /// logic).
    pub async fn covered_where(
        &self,
        pipeline: &Pipeline,
        accept: impl Fn(usize, &Publication) -> bool,
    ) -> Result<Option<Cutoff>, StateError> {
        if pipeline.views.is_empty() {
            return Ok(Some(self.checkpoints(&pipeline.name).await?));
        }
        let mut lowest: Option<Cutoff> = None;
        for (i, view) in pipeline.views.iter().enumerate() {
            let current = self.current_publication(&pipeline.name, &view.name).await?;
            let Some(current) = current.filter(|p| accept(i, p)) else {
                return Ok(None);
            };
            lowest = Some(match lowest {
                None => current.cutoff,
                // A partition missing from either cutoff is covered by neither.
                Some(low) => low
                    .into_iter()
                    .filter_map(|(p, pos)| current.cutoff.get(&p).map(|c| (p, pos.min(*c))))
                    .collect(),
            });
        }
        Ok(lowest)
    }
}

/// Whether `cutoff` covers all of segment `s`.
pub fn is_covered(cutoff: &Cutoff, s: &Segment) -> bool {
    cutoff.get(&s.partition).is_some_and(|c| s.hi <= *c)
}
