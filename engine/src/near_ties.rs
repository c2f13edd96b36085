//! Routing near-ties: how close each token of a forward pass is to being sent to other experts.
//!
//! Reduced precision (bf16 activations) moves router logits by a few thousandths; a token whose
//! f32 routing decision is closer than that to a tie may legitimately go to other experts, and its
//! logits then differ from an f32 reference far more than rounding alone explains. Checks against
//! f32 references use these margins to tell such positions apart from real errors.

use crate::experts::{Experts, PendingExperts};
use crate::generate::InProcessEngine;
use crate::model::FeedForward;
use crate::router::Routing;
use crate::{Result, Tensor};

/// For every position of `ids`, the smallest routing decision margin (see
/// [`Router::decision_margin`](crate::router::Router::decision_margin), in router-logit units)
/// over the MoE layers, from one full-sequence forward through `engine`. Meaningful for an f32
/// engine: the margins are those of the exact computation.
pub fn routing_margins(engine: &InProcessEngine, ids: &[u32]) -> Result<Vec<f32>> {
    let recorder = MarginRecorder {
        engine,
        margins: std::sync::Mutex::new(vec![f32::INFINITY; ids.len()]),
    };
    engine.model.forward_sequence(ids, &recorder, |_, _| {})?;
    Ok(recorder
        .margins
        .into_inner()
        .unwrap_or_else(|e| e.into_inner()))
}

/// An [`Experts`] that notes each token's routing margin before passing the call on. The router's
/// input is the normed activations that `dispatch` receives, so the margin is computed from the
/// same values the routing was.
struct MarginRecorder<'a> {
    engine: &'a InProcessEngine,
    margins: std::sync::Mutex<Vec<f32>>,
}

impl Experts for MarginRecorder<'_> {
    fn dispatch(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<PendingExperts> {
        if let Some(FeedForward::Moe(moe)) = self.engine.model.layers().get(layer).map(|l| &l.mlp) {
            let m = moe.router.margins(x)?;
            let mut all = self.margins.lock().unwrap_or_else(|e| e.into_inner());
            for (a, b) in all.iter_mut().zip(m) {
                *a = a.min(b);
            }
        }
        self.engine.experts.dispatch(layer, x, routing)
    }
}
